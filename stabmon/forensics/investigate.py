"""The investigation of one spike or non-finite step, run before its optimizer step.

At that moment the weights are still those the step started from and its batch is held (by
reference), so the step can be looked at again:

* **rows**: one replay forward under the step's RNG state gives every row's loss (read from the
  model's ``cross_entropy`` call, or, without one, row by row for up to ``scan_rows`` rows);
  the ``rows`` rows of highest loss each get one forward and backward alone, whose gradient,
  projected on the step's, is the row's share of it;
* **replay**: the same forward's loss and a backward's gradient norm against the step's, over
  every rank: the same within ``tolerance`` is *reproducible* (the data at this state of the
  weights), different is *not reproducible* (nondeterminism, a transient or hardware fault);
* **where a NaN starts**: on a non-finite step, one more forward with a hook on every module
  names the first module, in execution order, whose output holds NaN or inf, and whether its
  input was finite.

Nothing of the run changes: gradients are taken with ``torch.autograd.grad`` (``.grad`` is not
touched; under FSDP2 the step's gradients are set aside and put back), every forward runs under
a forked RNG set to the step's state, BatchNorm statistics are put back, and the monitor's own
hooks are paused. Every rank takes part (the findings that start it are the same on every
rank); the ranks' rows are gathered, so every rank writes down the same record.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from stabmon.distributed import is_dtensor, local_tensor
from stabmon.forensics.batch import batch_rows, fingerprint_hex, select_rows
from stabmon.forensics.config import ForensicsConfig
from stabmon.forensics.record import ForensicRecord, RowAttribution
from stabmon.signals import AllReduce

__all__ = ["Ranks", "investigate", "rng_at", "rng_states"]

LossOf = Callable[[Any], torch.Tensor]
_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")


class _CrossEntropyCalls(TorchFunctionMode):
    """Keeps the arguments of every ``F.cross_entropy`` call of a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.cross_entropy:
            self.calls.append({**dict(zip(_CE_ARGS, args)), **kwargs})
        return func(*args, **kwargs)


@contextlib.contextmanager
def rng_at(states: tuple[torch.Tensor, dict[int, torch.Tensor]] | None) -> Iterator[None]:
    """Run under forked RNGs set to ``states`` (the CPU state and each CUDA device's), so a forward
    draws the step's dropout masks and the run's own random streams go on untouched."""
    if states is None:
        yield
        return
    cpu, cuda = states
    with torch.random.fork_rng(devices=sorted(cuda)):
        torch.set_rng_state(cpu)
        for index, state in cuda.items():
            torch.cuda.set_rng_state(state, index)
        yield


def rng_states(devices: Sequence[torch.device]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The RNG states a forward on ``devices`` draws from (a host copy; no device read)."""
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    return torch.get_rng_state(), {i: torch.cuda.get_rng_state(i) for i in cuda}


def _row_losses_from(calls: list[dict[str, Any]], rows: int) -> torch.Tensor | None:
    """Per-row mean loss from the last ``cross_entropy`` call, when its elements split evenly
    into ``rows`` rows (flattened ``(rows * tokens, classes)`` logits, or ``(rows, classes, ...)``)."""
    if not calls:
        return None
    call = calls[-1]
    logits, target = call.get("input"), call.get("target")
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor) or target.is_floating_point():
        return None
    ignore = call.get("ignore_index", -100)
    with torch.no_grad():
        per = F.cross_entropy(logits.detach().float(), target, reduction="none", ignore_index=ignore,
                              label_smoothing=call.get("label_smoothing", 0.0) or 0.0)
        valid = (target != ignore).float()
        if per.numel() % rows or per.shape != valid.shape:
            return None
        per, valid = per.reshape(rows, -1), valid.reshape(rows, -1)
        return (per * valid).sum(1) / valid.sum(1).clamp_min(1)


def _params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _dot(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    total = 0.0
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total += float((local_tensor(x).double() * local_tensor(y).double()).sum())
    return total


class Ranks:
    """The ranks that reduce together (one process: nothing to reduce): sums and gathers."""

    def __init__(self, all_reduce: AllReduce | None) -> None:
        import torch.distributed as dist

        self.all_reduce = all_reduce
        self.world = dist.get_world_size() if all_reduce is not None and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world == 1:
            return values
        return self.all_reduce(torch.tensor(values, dtype=torch.float64, device=device), "sum").tolist()

    def gather(self, items: list[Any]) -> list[Any]:
        if self.world == 1:
            return items
        import torch.distributed as dist

        out: list[list[Any]] = [[] for _ in range(self.world)]
        dist.all_gather_object(out, items)
        return [item for part in out for item in part]


def _replay_gradient(model: torch.nn.Module, loss: torch.Tensor, ranks: Ranks,
                     device: torch.device) -> float:
    """The replayed step's gradient norm over every rank, ``.grad`` left as it was."""
    params = _params(model)
    if any(is_dtensor(p) for p in params):  # FSDP2: its backward reduce-scatters into .grad
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            loss.backward()
            square = sum(float(local_tensor(p.grad).double().square().sum()) for p in params if p.grad is not None)
        finally:
            for p, g in zip(params, saved):
                p.grad = g
        return math.sqrt(max(ranks.sum([square], device)[0], 0.0))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    present = [g.reshape(-1).double() for g in grads if g is not None]
    flat = torch.cat(present) if present else torch.zeros(1, dtype=torch.float64, device=device)
    if ranks.world > 1:  # every rank's replayed gradient, averaged as DDP averages the step's
        flat = ranks.all_reduce(flat, "sum") / ranks.world
    return float(torch.linalg.vector_norm(flat))


def _nonfinite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() and not bool(torch.isfinite(value.detach()).all())
    if isinstance(value, (list, tuple)):
        return any(_nonfinite(v) for v in value)
    if isinstance(value, dict):
        return any(_nonfinite(v) for v in value.values())
    if hasattr(value, "to_tuple"):  # a Hugging Face ModelOutput
        return _nonfinite(value.to_tuple())
    return False


def _first_nonfinite(model: torch.nn.Module, batch: Any, loss_of: LossOf) -> tuple[str | None, bool | None]:
    """The first module, in execution order, whose output holds NaN or inf, and whether its input
    held one already."""
    found: list[tuple[str, bool]] = []
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def check(_module: torch.nn.Module, args: Any, output: Any) -> None:
            if not found and _nonfinite(output):
                found.append((name, _nonfinite(args)))
        return check

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(hook(name or "(the model)")))
    try:
        with torch.no_grad():
            loss_of(batch)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else (None, None)


def investigate(model: torch.nn.Module, config: ForensicsConfig, *, step: int, findings: Sequence[Any],
                batch: Any, loss_of: LossOf | None, rng: tuple[torch.Tensor, dict[int, torch.Tensor]] | None,
                step_loss: float | None, step_grad_norm: float | None, grad_scale: float = 1.0,
                layers: list[tuple[str, float]] = (), all_reduce: AllReduce | None = None,
                epoch: int | None = None, batch_index: int | None = None) -> ForensicRecord:
    """Investigate one step (see the module docstring); ``findings`` are the ones that called for it."""
    start = time.perf_counter()
    worst = max(findings, key=lambda f: f.rank)
    record = ForensicRecord(step, worst.signal, worst.severity, [f.message for f in findings], "not_replayed", "",
                            loss=step_loss, grad_norm=step_grad_norm, layers=list(layers)[:8], epoch=epoch,
                            batch_index=batch_index)
    ranks = Ranks(all_reduce)
    record.world_size = ranks.world
    rows = batch_rows(batch) if batch is not None else None
    if batch is None or loss_of is None or not rows:
        record.verdict_reason = "no batch was held for this step (the trainer adapter holds it; a plain loop " \
                                "passes it to MonitorCore.observe_batch)"
        record.seconds = time.perf_counter() - start
        return record
    device = next((local_tensor(p).device for p in model.parameters()), torch.device("cpu"))
    nonfinite = any(not math.isfinite(f.value) for f in findings)
    with torch.enable_grad():
        # the replay forward: the step's loss again, and every row's loss from its cross_entropy call
        ce = _CrossEntropyCalls()
        with rng_at(rng), ce:
            loss = loss_of(batch)
        per_row = _row_losses_from(ce.calls, rows)
        record.row_losses = "cross_entropy" if per_row is not None else None
        replay_loss = ranks.sum([float(loss.detach()) / ranks.world], device)[0]
        replay_norm = None
        if math.isfinite(replay_loss):
            replay_norm = _replay_gradient(model, loss, ranks, device)
        del loss
        if per_row is None:  # row by row, for the first scan_rows rows
            scanned = min(rows, config.scan_rows)
            with torch.no_grad(), rng_at(rng):
                per_row = torch.stack([loss_of(select_rows(batch, [r])).detach().float() for r in range(scanned)])
            record.row_losses = "row by row" if scanned == rows else f"row by row, the first {scanned}"
        losses = per_row.tolist()
        top = sorted(range(len(losses)), key=lambda r: -losses[r] if losses[r] == losses[r] else -math.inf)
        top = top[: config.rows]
        shares = _grad_shares(model, batch, loss_of, rng, top, rows * ranks.world, grad_scale)
        if config.trace_nonfinite and nonfinite:
            with rng_at(rng):
                record.first_nonfinite_module, record.nonfinite_input = _first_nonfinite(model, batch, loss_of)
    record.replay_loss, record.replay_grad_norm = replay_loss, replay_norm
    record.rows = _ranked_rows(config, batch, losses, top, shares, ranks)
    if config.replay:
        record.verdict, record.verdict_reason = _verdict(step_loss, step_grad_norm, replay_loss, replay_norm,
                                                         config.tolerance)
    else:
        record.verdict_reason = "replay is off (ForensicsConfig.replay=False)"
    record.seconds = time.perf_counter() - start
    return record


def _grad_shares(model: torch.nn.Module, batch: Any, loss_of: LossOf, rng: Any, top: list[int], total_rows: int,
                 grad_scale: float) -> dict[int, float]:
    """Each top row's share of the step's gradient: ``<g_row, g> / (rows * |g|^2)`` with ``g`` the
    step's gradient (still in ``.grad``); none under FSDP2 (its backward mixes the ranks' rows)."""
    params = _params(model)
    step_grads = [p.grad for p in params]
    if any(is_dtensor(p) for p in params) or all(g is None for g in step_grads):
        return {}
    square = _dot(step_grads, step_grads) / grad_scale ** 2
    if not square or not math.isfinite(square):
        return {}
    shares = {}
    for r in top:
        with rng_at(rng):
            row_loss = loss_of(select_rows(batch, [r]))
        if not torch.isfinite(row_loss.detach()):
            continue
        row_grads = torch.autograd.grad(row_loss, params, allow_unused=True)
        shares[r] = _dot(row_grads, step_grads) / grad_scale / (total_rows * square)
    return shares


def _ranked_rows(config: ForensicsConfig, batch: Any, losses: list[float], top: list[int], shares: dict[int, float],
                 ranks: Ranks) -> list[RowAttribution]:
    """The top rows of every rank, ranked by loss; each with its share of the batch's excess loss
    (its loss above the median row's, over the sum of every row's)."""
    from stabmon.forensics.batch import row_fingerprints

    fingerprints = row_fingerprints(batch)
    prints = [fingerprint_hex(int(x)) for x in fingerprints.tolist()] if fingerprints is not None else []
    ids = _dataset_ids(config, batch)
    mine = [RowAttribution(r, ranks.rank, prints[r] if r < len(prints) else None, losses[r], None, shares.get(r),
                           ids[r] if ids is not None and r < len(ids) else None) for r in top]
    gathered = ranks.gather([(mine, losses)])  # one entry per rank
    rows = [row for part, _ in gathered for row in part]
    finite = [x for _, part in gathered for x in part if math.isfinite(x)]
    if finite:
        median = statistics.median(finite)
        excess = sum(max(0.0, x - median) for x in finite)
        for row in rows:
            if excess > 0 and row.loss is not None and math.isfinite(row.loss):
                row.loss_share = max(0.0, row.loss - median) / excess
    rows.sort(key=lambda row: -row.loss if row.loss is not None and row.loss == row.loss else -math.inf)
    return rows[: config.rows]


def _dataset_ids(config: ForensicsConfig, batch: Any) -> list[int] | None:
    ids = None
    if config.batch_ids is not None:
        ids = config.batch_ids(batch)
    elif hasattr(batch, "get"):
        ids = batch.get("index", batch.get("idx"))
    if ids is None:
        return None
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return [int(v) for v in values]


def _verdict(step_loss: float | None, step_norm: float | None, replay_loss: float, replay_norm: float | None,
             tolerance: float) -> tuple[str, str]:
    def same(a: float | None, b: float | None) -> bool | None:
        if a is None or b is None:
            return None
        if not math.isfinite(a) or not math.isfinite(b):
            return (math.isnan(a) and math.isnan(b)) or a == b
        return abs(a - b) <= tolerance * max(abs(a), abs(b), 1e-12)

    checks = [("loss", step_loss, replay_loss, same(step_loss, replay_loss)),
              ("gradient norm", step_norm, replay_norm, same(step_norm, replay_norm))]
    compared = [(name, a, b, ok) for name, a, b, ok in checks if ok is not None]
    if not compared:
        return "not_replayed", "the step's loss and gradient norm were not read (detection off?)"
    reason = "; ".join(f"{name} {a:.6g} at the step, {b:.6g} replayed" for name, a, b, _ in compared)
    verdict = "reproducible" if all(ok for *_, ok in compared) else "not_reproducible"
    return verdict, reason
