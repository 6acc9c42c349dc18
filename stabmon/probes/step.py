"""The step's one read: loss, gradient norms and loss scale, to the host, reduced over ranks.

``StepReader`` holds what is measured on every step (the gradient probe, the loss and
gradient-norm series, the micro-batch losses of the step, the fp16 loss scale and its
overflows) and reads it, right before the optimizer step, in one tensor: one host copy, and
one all-reduce where there are several ranks. ``read()`` returns a ``StepValues`` with the
host values the detectors see. With detection off, ``record()`` keeps the step's values on
the device instead and nothing is read until the next emission.

With several ranks the read also carries the fail-soft flags of every stage (see
``stabmon._failsoft``): its layout never depends on what failed where (a gradient probe
that failed here sends zeros), so the collective always matches, and a stage that failed
on any rank is switched off on every rank right after it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from stabmon._failsoft import STAGES, FailSoft
from stabmon.probes.amp import gradients_scaled, loss_scale
from stabmon.probes.compiled import canonical_name
from stabmon.probes.gradients import GradientProbe
from stabmon.probes.series import StepSeries
from stabmon.signals import AllReduce, SignalSet, active_all_reduce, torch_distributed_all_reduce, world_size

__all__ = ["StepReader", "StepValues"]


@dataclass
class StepValues:
    """One step's values on the host, the same on every rank.

    ``loss``: the step's loss, averaged over ranks; ``grad_norm``: the whole model's gradient
    norm before any clip (None when not read, or when the fp16 GradScaler found an overflow:
    ``overflow``); ``loss_scale``: the scale of fp16 mixed precision, if any; ``listed``: the
    batch holds a row of the skip list, on some rank; ``lr``: the schedule's learning rate (read
    before the monitor scales it).
    """

    loss: float | None = None
    grad_norm: float | None = None
    loss_scale: float | None = None
    overflow: bool = False
    listed: bool = False  # the batch holds a row of the skip list (on any rank)
    lr: float | None = None  # the largest learning rate the schedule set for this step (the same on every rank)

    def for_detectors(self) -> dict[str, float]:
        """The values under the signal names the per-step detectors know."""
        out = {}
        if self.loss is not None:
            out["loss/last"] = self.loss
        if self.grad_norm is not None:
            out["gradients/norm"] = self.grad_norm
        if self.loss_scale is not None:
            out["gradients/loss_scale"] = self.loss_scale
        if self.lr is not None:
            out["optimizer/lr"] = self.lr
        return out


def _scheduled_lr(optimizer: torch.optim.Optimizer | None) -> float | None:
    """The largest learning rate of the optimizer's groups (a host value; a tensor LR is read once)."""
    if optimizer is None or not optimizer.param_groups:
        return None
    try:
        return max(float(g["lr"]) for g in optimizer.param_groups)
    except (KeyError, TypeError, ValueError):
        return None


class StepReader:
    """Reads each step's loss, gradient norms and loss scale.

    Args:
        model: the module whose trainable parameters' gradients are read.
        gradients: read gradient norms (the gradient probe). Default True.
        all_reduce: cross-rank reduction (default: torch.distributed when a group is up).
        guard: the monitor's fail-soft guard.
        grad_scaler: the fp16 ``GradScaler``, if any.

    Example:
        >>> model = torch.nn.Linear(3, 1); reader = StepReader(model, guard=FailSoft())
        >>> loss = model(torch.ones(2, 3)).square().mean(); loss.backward()
        >>> reader.observe_loss(loss)
        >>> values = reader.read(optimizer=None, sampled=True)
        >>> values.loss == loss.item(), round(values.grad_norm, 5) == round(reader.step_grad_norm().item(), 5)
        (True, True)
    """

    def __init__(self, model: torch.nn.Module, *, gradients: bool = True,
                 all_reduce: AllReduce | None = torch_distributed_all_reduce, guard: FailSoft | None = None,
                 grad_scaler: Any = None) -> None:
        self.model = model
        self.guard = guard or FailSoft()
        self.grad_scaler = grad_scaler
        self._all_reduce = all_reduce
        self.gradients = self._gradient_probe() if gradients else None
        self.loss_series = StepSeries({"mean": "loss/mean", "last": "loss/last", "max": "loss/max",
                                "nonfinite_steps": "loss/nonfinite_steps"})
        self.grad_norm_series = StepSeries({"max": "gradients/norm_max", "min": "gradients/norm_min",
                                     "mean": "gradients/norm_mean", "nonfinite_steps": "gradients/nonfinite_steps"})
        self._losses: list[torch.Tensor] = []  # the micro-batches' losses of the current step
        self._total: float | torch.Tensor | None = None  # this step's whole-model gradient norm (None: not read)
        self._scale: float | torch.Tensor | None = None  # the loss scale at the last step read
        self._overflows = 0  # steps of this interval whose scaled gradients overflowed
        self.norms: torch.Tensor | None = None  # this step's per-parameter gradient norms (None: not read)

    # -- the step --------------------------------------------------------------------------------
    def observe_loss(self, loss: torch.Tensor | None) -> None:
        """The loss of this micro-batch (kept by reference: no work on the device here)."""
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    def read(self, *, optimizer: torch.optim.Optimizer | None, sampled: bool, step: int | None = None,
             to_host: bool = True, listed: torch.Tensor | bool | None = None) -> StepValues | None:
        """Read the step (call once, before the optimizer step). With ``to_host`` (detection on):
        one host read and ``StepValues``; without: the values stay on the device (None).
        ``listed``: whether the batch holds a row of the skip list (None: there is no skip list),
        read with the rest."""
        scale = loss_scale(self.grad_scaler) if self.grad_scaler is not None else None  # this step's, one copy
        norms = self.norms = self.guard.run("gradient probe", self._observe, optimizer, scale, sampled)
        loss, self._losses = self._step_loss(), []
        self._total = None  # set below; never a norm left from an earlier step
        flag = None
        if listed is not None:
            device = loss.device if loss is not None else "cpu"
            flag = listed.reshape(1).float() if isinstance(listed, torch.Tensor) else torch.tensor([float(listed)],
                                                                                                  device=device)
        if to_host and "step read" not in self.guard.disabled:  # failed here only: it still joins the collective
            all_reduce = active_all_reduce(self._all_reduce)
            if all_reduce is None or not self.guard.synced:
                values = self.guard.run("step read", self._read_unsynced, loss, norms, scale, all_reduce,
                                        flag) or StepValues(listed=bool(flag is not None and flag.item()))
            else:
                values = self._read_synced(loss, norms, scale, all_reduce, step, flag)
            if values is not None:  # (None: the step's read was switched off at this reduction)
                values.lr = _scheduled_lr(optimizer)
            return values
        self.guard.run("signals", self._record_device, loss, norms, scale)
        return StepValues(listed=True) if flag is not None and flag.item() else None

    def end_step(self, host: bool) -> None:
        """A step without ``read``: keep its loss all the same."""
        if self._losses:
            loss, self._losses = self._step_loss(), []
            if host:
                self.loss_series.add_host(float(loss))
            else:
                self.loss_series.add_device(loss)

    def step_grad_norm(self) -> torch.Tensor | None:
        """This step's gradient norm of the whole model as a 0-dim tensor, once read; else None."""
        value = self._total
        if value is None:
            return None
        return value if isinstance(value, torch.Tensor) else torch.tensor(value)

    def layer_norms(self) -> list[tuple[str, float]]:
        """The step's per-layer gradient norms, largest first (empty unless read to the host)."""
        return self.gradients.layer_norms() if self.gradients is not None else []

    def local_gradients(self) -> list[torch.Tensor]:
        return self.gradients.local_gradients() if self.gradients is not None else []

    def _step_loss(self) -> torch.Tensor | None:
        """The step's loss: the one micro-batch loss, or their mean under gradient accumulation."""
        losses = self._losses
        if not losses:
            return None
        return losses[0] if len(losses) == 1 else torch.stack([x.float() for x in losses]).mean()

    # -- gradients -------------------------------------------------------------------------------
    def _gradient_probe(self) -> GradientProbe:
        named = ((canonical_name(n), p) for n, p in self.model.named_parameters())
        return GradientProbe(named, world=world_size())

    def _refresh_parameters(self) -> bool:
        """Parameters made or replaced after the monitor (``configure_model``, ``fully_shard``):
        follow them. One identity check; True when the probe was rebuilt."""
        first = next((p for p in self.model.parameters() if p.requires_grad), None)
        current = self.gradients.params[0] if self.gradients.params else None
        if first is current:
            return False
        self.gradients = self._gradient_probe()
        return True

    def _observe(self, optimizer: torch.optim.Optimizer | None, scale: torch.Tensor | None,
                 sampled: bool) -> torch.Tensor | None:
        """The gradient probe's per-parameter norms (of the unscaled gradients under fp16 AMP:
        ``scale`` is divided out while ``optimizer``'s gradients carry it). The parameters are
        checked against the model on sampled steps and whenever none of the known ones has a
        gradient (they were replaced): the model's parameter walk stays off ordinary steps."""
        if self.gradients is None:
            return None
        if sampled:
            self._refresh_parameters()
        if scale is not None and not gradients_scaled(self.grad_scaler, optimizer):
            scale = None
        norms = self.gradients.observe(scale) if not self.gradients.empty else None
        if norms is None and not sampled and self._refresh_parameters() and not self.gradients.empty:
            norms = self.gradients.observe(scale)
        return norms

    def _norm_slots(self) -> int:
        """Slots of the per-parameter norms in a synced read: the same on every rank."""
        if self.gradients is None or "gradient probe" in self.guard.disabled:
            return 0
        return len(self.gradients.params)

    # -- the host read ---------------------------------------------------------------------------
    def _read_synced(self, loss: torch.Tensor | None, norms: torch.Tensor | None, scale: torch.Tensor | None,
                     all_reduce: AllReduce, step: int | None, flag: torch.Tensor | None = None) -> StepValues | None:
        """The read where ranks reduce together: the fail-soft flags travel with it, and a rank
        whose read failed sends zeros in the layout every rank uses."""
        parts = None
        if not self.guard.off("step read"):
            parts = self.guard.run("step read", self._parts, loss, norms, scale, all_reduce, True)
        if parts is None:  # the collective happens whatever failed here, in the layout every rank uses
            parts = self._placeholder(loss, scale)
        if flag is not None:
            parts.append(flag.to(parts[0].device if parts else flag.device))
        parts.append(self.guard.flags(parts[0].device if parts else "cpu"))
        host = all_reduce(torch.cat([p.double() for p in parts]), "sum").tolist()
        flags = host[-len(STAGES):]
        del host[-len(STAGES):]
        self.guard.settle(flags, step)
        if self.guard.off("step read"):
            return None
        return self.guard.run("step read", self._unpack, host, loss is not None, True, scale is not None, True,
                              flag is not None)

    def _read_unsynced(self, loss: torch.Tensor | None, norms: torch.Tensor | None, scale: torch.Tensor | None,
                       all_reduce: AllReduce | None, flag: torch.Tensor | None = None) -> StepValues:
        """One host read of the loss, the per-parameter norms and the scale (and one sum where a
        custom reduction is given). The per-parameter norms come along: the gradient probe keeps
        them and the emission needs no device work for them."""
        if all_reduce is None:  # one process: the norms themselves, squared on the host in float64
            parts = [part for part in (loss.reshape(1) if loss is not None else None, norms, scale, flag)
                     if part is not None]
        else:
            parts = self._parts(loss, norms, scale, all_reduce, False)
            if flag is not None:
                parts.append(flag.double())
        if not parts:
            return StepValues()
        if all_reduce is None and parts[0].device.type == "cpu":
            host = [x for part in parts for x in part.tolist()]  # no device to wait for: no concatenation
        else:
            packed = torch.cat(parts) if len(parts) > 1 else parts[0]
            if all_reduce is not None:
                packed = all_reduce(packed, "sum")
            host = packed.tolist()
        return self._unpack(host, loss is not None, norms is not None, scale is not None, all_reduce is not None,
                            flag is not None)

    def _parts(self, loss: torch.Tensor | None, norms: torch.Tensor | None, scale: torch.Tensor | None,
               all_reduce: AllReduce | None, synced: bool) -> list[torch.Tensor]:
        # one sum over ranks: the loss averages, the weighted squares add up to the whole model's
        parts = []
        ranks = world_size()
        if loss is not None:
            parts.append(loss.double().reshape(1) / ranks)
        if norms is not None:
            parts.append(self.gradients.squares(norms))
        elif synced and self._norm_slots():  # no gradient here this step: zeros in the norms' place
            parts.append(torch.zeros(self._norm_slots(), dtype=torch.float64, device=self._device(loss)))
        if scale is not None:  # the same on every rank: its mean
            parts.append(scale.double() / ranks)
        return parts

    def _placeholder(self, loss: torch.Tensor | None, scale: torch.Tensor | None) -> list[torch.Tensor]:
        """The read's layout, in zeros: what a rank whose read failed sends."""
        size = int(loss is not None) + self._norm_slots() + int(scale is not None)
        return [torch.zeros(size, dtype=torch.float64, device=self._device(loss))]

    def _device(self, loss: torch.Tensor | None) -> torch.device:
        if loss is not None:
            return loss.device
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def _unpack(self, host: list[float], has_loss: bool, has_norms: bool, has_scale: bool,
                reduced: bool, has_flag: bool = False) -> StepValues:
        values = StepValues()
        if has_flag:
            values.listed = host.pop() > 0
        if has_loss:
            values.loss = host.pop(0)
            if not values.listed:  # a listed batch's loss is none of the run's
                self.loss_series.add_host(values.loss)
        if has_scale:
            values.loss_scale = self._scale = host.pop()
        if has_norms and self.gradients is not None and "gradient probe" not in self.guard.disabled and host:
            squares = host if reduced else [x * x for x in host]
            norm = self._total = self.gradients.record_host_squares(squares)
            if has_scale and not math.isfinite(norm):
                # fp16 overflow: the GradScaler skips this step and lowers its scale. Routine, not
                # a finding; a scale that keeps falling is (DetectionConfig.min_loss_scale).
                self._overflows += 1
                values.overflow = True
            else:
                values.grad_norm = norm
                if not values.listed:
                    self.grad_norm_series.add_host(norm)
        return values

    def _record_device(self, loss: torch.Tensor | None, norms: torch.Tensor | None,
                       scale: torch.Tensor | None) -> None:
        """Detection off: keep the step's values on the device; nothing is read before emission."""
        if loss is not None:
            self.loss_series.add_device(loss)
        if self.gradients is not None and self.gradients.sharded and self._norm_slots():
            # the shares of the square must meet every step, on every rank
            share = self.gradients.device_norm() if norms is not None else torch.zeros((), device=self._device(loss))
            grad = torch_distributed_all_reduce(share.detach().double(), "sum").sqrt()
        elif norms is not None:
            grad = self.gradients.device_norm()
        else:
            grad = None
        if grad is not None:
            self.grad_norm_series.add_device(grad)  # fp16 overflows count in gradients/nonfinite_steps here
            self._total = grad
        if scale is not None:
            self._scale = scale

    # -- emission ----------------------------------------------------------------------------------
    def signals(self, out: SignalSet, *, sampled: bool, per_layer: bool) -> None:
        """The interval's loss and gradient statistics (with the parameter norms and the update
        ratio on sampled steps) and the loss scale."""
        self.loss_series.signals(out)
        if self.gradients is not None and "gradient probe" not in self.guard.disabled:
            self.gradients.signals(out, prefix="gradients", per_layer=per_layer, parameters=sampled)
            self.grad_norm_series.signals(out)
        if isinstance(self._scale, torch.Tensor):
            out.add_max("gradients/loss_scale", self._scale.reshape(()))
        elif self._scale is not None:  # read this step with the loss: the same on every rank
            out.add_host("gradients/loss_scale", self._scale, op=None)
            out.add_host("gradients/overflow_steps", float(self._overflows), op=None)

    @property
    def empty(self) -> bool:
        """Nothing accumulated since the last emission."""
        return self.loss_series.empty and self.grad_norm_series.empty

    def reset_interval(self) -> None:
        self._overflows = 0
        self.loss_series.reset()
        self.grad_norm_series.reset()
        if self.gradients is not None:
            self.gradients.reset()

    # -- the update ratio (sampled steps) ------------------------------------------------------------
    def snapshot_parameters(self) -> None:
        if self.gradients is not None and not self.gradients.empty:
            self.guard.run("gradient probe", self.gradients.snapshot_parameters)

    def measure_update(self) -> None:
        if self.gradients is not None:
            self.guard.run("gradient probe", self.gradients.measure_update)

    @property
    def has_observed(self) -> bool:
        return self.gradients is not None and self.gradients.has_observed

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return iter(self.gradients.params if self.gradients is not None else ())
