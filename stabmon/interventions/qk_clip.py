"""QK-clip: rescale the query and key weights of the heads whose attention logits run away.

After Kimi K2 (2025): after an optimizer step, for every head ``h`` whose largest
pre-softmax logit over the batch ``S_h`` exceeds ``tau``, multiply the head's query
entries by ``gamma ** alpha`` and its key entries by ``gamma ** (1 - alpha)``, with
``gamma = tau / S_h`` and ``alpha = 1/2``. The head's logits are ``q . k`` times a constant,
so they scale by exactly ``gamma``: ``S_h`` becomes ``tau``. Nothing else changes: the
other heads, the values, every other parameter and the optimizer state stay bit-identical.

Grouped-query attention: a key head serves several query heads, so scaling it would move
its neighbours' logits too. All of ``gamma`` goes on the query entries then (``alpha = 1``),
as Kimi's MLA variant does for its shared rotary key: one head's clip never touches
another head.

The clipper's life cycle (it listens to the forward probes, and the responder drives it):

* on a sampled step it hears the q and k of every SDPA call and locates each layer's
  entries once (``stabmon.interventions.qk_locate``); a layer that cannot be located is
  reported once and left to the LR rungs;
* a layer is **armed** (``arm_above_tau``) when its max logit at a sample passes ``tau``, or
  (``route``) when an attention-logit finding names it; both return the action's details for
  the responder to record. Forward hooks on the armed module then measure its per-head max
  logit on every step (``stabmon.interventions.qk_layer``);
* after every optimizer step the armed layers' per-head maxima are all-reduced (max over
  ranks, in one layout fixed by the layers armed, whatever failed where) and the heads
  above ``tau`` rescaled, all on the device: no host read.

Example:
    >>> model = torch.nn.Linear(4, 8, bias=False)            # fused q, k for 2 heads of 2
    >>> x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
    >>> q, k = (model(x) * 20).view(1, 3, 2, 2, 2).permute(2, 0, 3, 1, 4)
    >>> clipper = QKClipper(model, tau=5.0)
    >>> clipper.capture(q, k, site="")   # in a sampled forward: locates the layer
    >>> clipper.locate_pending()        # after it: nothing to report
    []
    >>> clipper.arm("", step=0, head_max=attention_max_logit(q, k).amax(dim=(0, 2)), why="test")[:14]
    'armed layer ""'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from stabmon.interventions.config import QKClipOverride
from stabmon.interventions.qk_layer import ArmedLayer
from stabmon.interventions.qk_locate import NotClippable, QKLocation, locate_qk
from stabmon.kernels import attention_max_logit  # noqa: F401  (the module docstring's example uses it)
from stabmon.probes.compiled import canonical_name, get_parameter, names_in_forward
from stabmon.signals import AllReduce, SignalSet, active_all_reduce

__all__ = ["QKClipper"]


class QKClipper:
    """Locates, arms, measures and clips the attention layers of one model.

    Args:
        model: the module whose attention layers are clipped.
        tau: the largest allowed per-head max logit.
        alpha: the query's share of ``gamma`` (the key gets ``1 - alpha``) when each query
            head has its own key head. Default 0.5.
        overrides: hand-given locations (``QKClipOverride``) by module name.
        all_reduce: cross-rank reduction (max of the per-head maxima; default none).
        layer_names: maps a call site to its reported layer name (``layer_00``).
        guard: runs the per-step measurement inside the user's forward (the monitor passes its
            fail-soft guard: a fault there switches QK-clip off, never the training step).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tau: float,
        *,
        alpha: float = 0.5,
        overrides: Sequence[QKClipOverride] = (),
        all_reduce: AllReduce | None = None,
        layer_names: Callable[[str], str] | None = None,
        seed: int = 0,
        hooks_between_probes: bool = True,
        guard: Callable[..., Any] | None = None,
    ) -> None:
        self.model, self.tau, self.alpha = model, float(tau), alpha
        # False for a compiled model: the measuring hooks go on only around the eager probe
        # forward (``attach_hooks`` / ``remove_hooks``), never into a compiled graph.
        self.hooks_between_probes = hooks_between_probes
        self.overrides = {o.module: o for o in overrides}
        self._all_reduce = all_reduce
        self.layer_names = layer_names or (lambda site: site)
        self._guard = guard or (lambda _stage, fn, *a, **kw: fn(*a, **kw))
        self.located: dict[str, QKLocation] = {}
        self.refused: dict[str, str] = {}  # site -> why (reported once)
        self.normalized: dict[str, str] = {}  # site -> the norm that bounds its logits
        self.armed: dict[str, ArmedLayer] = {}
        # site -> query heads of every layer armed, in arming order: the layout of the per-step
        # reduction over ranks, set before anything that may fail while arming
        self._armed_heads: dict[str, int] = {}
        self._messages: list[str] = []
        self._generator = torch.Generator().manual_seed(seed)
        self._names: dict[int, str] | None = None
        self._shared: dict[int, list[str]] = {}
        self.reset_interval()

    # -- location (sampled steps) ----------------------------------------------------------
    def wants(self, site: str) -> bool:
        return site not in self.located and site not in self.refused and site not in self.normalized

    def capture(self, q: torch.Tensor, k: torch.Tensor, *, site: str) -> None:
        """Locate an SDPA call's query and key entries from q and k, right away.

        It runs inside the forward, before SDPA: the graph is there, and so are the values
        of the parameters it reaches (FSDP2 frees the unsharded parameters after the forward).
        """
        if not self.wants(site):
            return
        if self._names is None:
            names: dict[int, list[str]] = {}
            for name, param in self.model.named_parameters(remove_duplicate=False):
                names.setdefault(id(param), []).append(canonical_name(name))
            self._names = {pid: ns[0] for pid, ns in names.items()}
            self._shared = {pid: ns for pid, ns in names.items()
                            if len({n.rsplit(".", 2)[0] for n in ns}) > 1}
        self._locate(site, q, k, names_in_forward(self.model, site, self._names))

    def _locate(self, site: str, q: torch.Tensor, k: torch.Tensor, names: dict[int, str]) -> None:
        module = site.partition("#")[0]
        try:
            if module in self.overrides:
                location = self.overrides[module].location()
            else:
                location = locate_qk(q, k, names, module=module, generator=self._generator)
            shared = {n for p in location.params for n in self._shared.get(self._param_id(p.name), [])}
            if shared:
                raise NotClippable(f"its weights are shared with another layer ({', '.join(sorted(shared))})")
            self.located[site] = location
        except NotClippable as err:
            target = self.normalized if err.kind == "normalized" else self.refused
            target[site] = err.reason
            verdict = "needs no clip" if err.kind == "normalized" else "is not clippable"
            self._messages.append(f"stabmon: attention layer {self.layer_names(site)} ({module or 'the model'}) "
                                  f"{verdict}: {err.reason}." + ("" if err.kind == "normalized" else
                                                                 " The LR rungs stay its remedy."))

    def locate_pending(self) -> list[str]:
        """After a sampled forward: check the new locations against each other (weights shared
        between layers) and return the messages of this forward (refusals, once per layer)."""
        self._check_shared_across_layers(self._messages)
        messages, self._messages = self._messages, []
        return messages

    def _param_id(self, name: str) -> int:
        try:
            return id(get_parameter(self.model, name))
        except AttributeError:
            return -1

    def _check_shared_across_layers(self, messages: list[str]) -> None:
        owner: dict[str, str] = {}
        for site, location in list(self.located.items()):
            for name in {p.name for p in location.params}:
                other = owner.setdefault(name, site)
                if other != site:
                    for s in (site, other):
                        if s in self.located:
                            del self.located[s]
                            self.refused[s] = f"its weights are shared with another layer ({name})"
                            messages.append(f"stabmon: attention layer {self.layer_names(s)} is not clippable: "
                                            f"its weights are shared with another layer ({name}).")

    # -- arming and clipping -----------------------------------------------------------------
    def can_arm(self, site: str) -> bool:
        return site in self.located and site not in self._armed_heads

    def arm(self, site: str, step: int, head_max: torch.Tensor | None = None, why: str = "") -> str | None:
        """Start measuring ``site`` every step; clip it now when ``head_max`` (this step's
        per-head max logit) is given. Returns the action's detail, None when it cannot be armed."""
        if not self.can_arm(site):
            return None
        location = self.located[site]
        self._armed_heads[site] = location.query_heads
        layer = self.armed[site] = ArmedLayer(site, location, self.model, self.alpha, self._guard)
        if self.hooks_between_probes:
            layer.attach()
        detail = (f'armed layer "{self.layer_names(site)}" ({location.module or "the model"}): heads above '
                  f"tau={self.tau:g} are rescaled after every step" + (f"; {why}" if why else ""))
        if head_max is not None:
            self._clip([(layer, head_max)])
        return detail

    def route(self, findings: Sequence[Any], site_of_layer: Mapping[str, str], step: int) -> tuple[list[Any], list[str]]:
        """Attention findings of a layer QK-clip can act on go to QK-clip, which targets their
        cause: it arms the layer. Returns the findings left for the LR rungs and the details of
        the layers armed now (each finding's ``layer`` names the reported layer: ``layer_02``)."""
        rest, details = [], []
        for finding in findings:
            layer = getattr(finding, "layer", None)
            family = finding.signal.split("/", 1)[0]
            site = site_of_layer.get(layer) if family == "attention" and layer else None
            if site is None or not (site in self._armed_heads or self.can_arm(site)):
                rest.append(finding)
                continue
            if site not in self._armed_heads:
                detail = self.arm(site, step, why=finding.message)
                if detail is not None:
                    details.append(detail)
        return rest, details

    def arm_above_tau(self, step: int, maxima: Mapping[str, tuple[float, torch.Tensor]]) -> list[str]:
        """At a sample: arm (and clip now) every located layer whose max logit passed tau.
        ``maxima`` maps a call site to its max logit over ranks and its per-head maxima."""
        details = []
        for site, (value, head_max) in maxima.items():
            if value > self.tau and self.can_arm(site):
                detail = self.arm(site, step, head_max=head_max, why=f"its max logit is {value:.4g}")
                if detail is not None:
                    details.append(detail)
        return details

    def discard(self) -> None:
        """Forget this step's measurements (a skipped step: nothing is rescaled)."""
        for layer in self.armed.values():
            layer.step_max = None

    def apply(self) -> None:
        """After the optimizer step: clip every armed layer with this step's per-head maxima.

        With several ranks the maxima of every armed layer are reduced in one fixed layout
        (a layer not measured here, after a fault, sends ``-inf``): every rank clips with the
        same values and calls the same collective, whatever failed where.
        """
        if active_all_reduce(self._all_reduce) is None:
            measured = [(layer, layer.step_max) for layer in self.armed.values() if layer.step_max is not None]
        else:
            measured = [(self.armed.get(site), self._step_max_or_empty(site, heads))
                        for site, heads in self._armed_heads.items()]
        for layer in self.armed.values():
            layer.step_max = None
        if measured:
            self._clip(measured)

    def _step_max_or_empty(self, site: str, heads: int) -> torch.Tensor:
        layer = self.armed.get(site)
        if layer is not None and layer.step_max is not None:
            return layer.step_max
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return torch.full((heads,), -math.inf, device=device)

    def _clip(self, measured: list[tuple[ArmedLayer | None, torch.Tensor]]) -> None:
        all_reduce = active_all_reduce(self._all_reduce)
        maxima = [m.float() for _, m in measured]
        if all_reduce is not None:  # every rank clips with the same S_h: weights stay identical
            packed = all_reduce(torch.cat(maxima), "max")
            maxima = list(packed.split([m.numel() for m in maxima]))
        for (layer, _), head_max in zip(measured, maxima):
            if layer is None:
                continue
            gamma = layer.rescale(head_max, self.tau)
            clipped = (gamma < 1).sum().float()
            site = layer.site
            self._count[site] = self._count.get(site, 0) + clipped
            self._min_gamma = gamma.min() if self._min_gamma is None else torch.minimum(self._min_gamma, gamma.min())
            self._clipped = self._clipped + clipped

    @property
    def clipped_heads(self) -> torch.Tensor | float:
        """Head clips since the last ``reset_interval`` (a device tensor once a clip ran)."""
        return self._clipped

    def attach_hooks(self) -> None:
        for layer in self.armed.values():
            layer.attach()

    def remove_hooks(self) -> None:
        """Take the measuring hooks off the model (end of a fit); the armed layers stay on record."""
        for layer in self.armed.values():
            layer.remove()

    def disarm_all(self) -> None:
        self.remove_hooks()
        self.armed.clear()
        self._armed_heads.clear()

    # -- metrics -------------------------------------------------------------------------------
    def reset_interval(self) -> None:
        self._count: dict[str, torch.Tensor] = {}
        self._clipped: torch.Tensor | float = 0.0
        self._min_gamma: torch.Tensor | None = None

    def signals(self, out: SignalSet) -> None:
        """``actions/qk_clip_count`` (head clips in the interval), ``actions/qk_clip_min_gamma``
        (smallest factor, when a head was clipped), ``actions/qk_clip_armed`` and per-layer counts."""
        if not self._armed_heads:
            return
        out.add_host("actions/qk_clip_armed", float(len(self._armed_heads)), op=None)
        if not self._count:
            out.add_host("actions/qk_clip_count", 0.0, op=None)
            return
        total = self._clipped if isinstance(self._clipped, torch.Tensor) else torch.zeros(())
        out.add_max("actions/qk_clip_count", total)  # every rank clips the same heads
        out.add_min("actions/qk_clip_min_gamma", self._min_gamma, defined=total)
        sites = list(self._count)
        out.add_max([f"actions/qk_clip_count/{self.layer_names(s)}" for s in sites],
                    torch.stack([self._count[s] for s in sites]))

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"armed": {site: layer.location.to_dict() for site, layer in self.armed.items()},
                "refused": dict(self.refused), "normalized": dict(self.normalized)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.disarm_all()
        self.refused = dict(state.get("refused", {}))
        self.normalized = dict(state.get("normalized", {}))
        for site, loc in state.get("armed", {}).items():
            location = QKLocation.from_dict(loc)
            self.located[site] = location
            self._armed_heads[site] = location.query_heads
            self.armed[site] = ArmedLayer(site, location, self.model, self.alpha, self._guard)
            if self.hooks_between_probes:
                self.armed[site].attach()
