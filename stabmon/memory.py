"""What the monitor holds in memory, part by part, as a function of the model and the run.

Every stateful part of the monitor has a size in terms of the trainable parameters ``P`` (this
rank's share of them under FSDP2), the layers ``n``, heads ``a``, hidden size ``h``, sequence
length ``L``, the rows ``r`` of the sharpness probe's held batch, the world size and the dtypes:

===================================  ======  ===============================================================
part                                 where   bytes
===================================  ======  ===============================================================
gradient probe, update ratio         device  ``P * w`` (a copy of the weights on sampled steps)
attention probe, score block         device  at most ``4M * 4`` (the CPU path; 0 on CUDA: fused)
sharpness, Lanczos basis             device  ``(m + 1) * P * w`` (``m`` vectors: ``iters + 1`` in full)
sharpness, HVP by double backward    device  ``3 * act(r, L) + 6 * r * n * a * L^2 * 4 + 2 * P * w``
sharpness, HVP by finite differences device  ``act(r, L) + 3 * P * w``
snapshots                            host    ``P * (w + o)`` per copy: one per rank sharded, one per job
                                             replicated (DDP)
forensics, one investigation         device  ``P * 4`` (a gradient) + the step's own activations
===================================  ======  ===============================================================

with ``w`` the bytes of a weight, ``o`` of its optimizer state (8 for Adam's two fp32
moments, 12 with an fp32 master copy of bf16 weights), and ``act(r, L)`` the activations of
``r`` rows kept for a backward: measured on the model by the probe (``saved_activation_bytes``
on one row of the held batch), or ``r * L * h * n * 34 * w / 2`` on paper (Korthikanti et al.
2022, with dropout: an upper bound). The ``L^2`` term is the math attention the double
backward needs. On CPU the sharpness formulas are within 6% of measured peaks
(``benchmarks/scale.py``).

``MemoryBudget`` is what the probes may take on the device: a fraction of the memory free at
set-up, at most a cap. ``plan_sharpness`` turns the budget into the sharpness probe's choices
(how many Lanczos vectors, double backward or finite differences, how many rows and how long a
sequence), and ``memory_plan`` gives the whole table for a model and a run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

__all__ = ["MemoryBudget", "MemoryPlan", "ModelShape", "Part", "SharpnessPlan", "activation_bytes", "free_memory",
           "memory_plan", "plan_sharpness", "saved_activation_bytes"]

GIB = 1 << 30
_SCORE_BLOCK = (4 << 20) * 4  # the CPU attention path's largest score block: 4M floats


def free_memory(device: torch.device | str) -> int:
    """Bytes free on ``device``: ``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` of
    ``/proc/meminfo`` for the CPU (where it cannot be read: 16 GiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GIB


@dataclass(frozen=True)
class MemoryBudget:
    """What the monitor's probes may take on a device: ``fraction`` of the memory free at set-up,
    at most ``cap_gib`` GiB. Past it a probe chooses a cheaper method and says so.

    Example:
        >>> MemoryBudget(fraction=0.1, cap_gib=8).bytes_of(free=40 * GIB) == 4 * GIB
        True
    """

    fraction: float = 0.1
    cap_gib: float = 8.0

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"`fraction` must be in (0, 1], got {self.fraction!r}")
        if not (isinstance(self.cap_gib, (int, float)) and self.cap_gib > 0):
            raise ValueError(f"`cap_gib` must be a positive number, got {self.cap_gib!r}")

    def bytes_of(self, free: int) -> int:
        return int(min(self.fraction * free, self.cap_gib * GIB))

    def resolve(self, device: torch.device | str) -> int:
        return self.bytes_of(free_memory(device))


@dataclass
class ModelShape:
    """The sizes the memory model needs (``from_model`` reads them off a model and a sample)."""

    params: int  # trainable parameters of the whole model
    layers: int  # attention layers
    heads: int  # attention heads per layer
    hidden: int  # width of the residual stream
    weight_bytes: int = 2  # bytes per weight (bf16)
    optimizer_bytes: int = 12  # bytes of optimizer state per weight (Adam's fp32 moments and master weights)
    activation_bytes_per_token: int | None = None  # measured (``saved_activation_bytes``); None: the formula

    @classmethod
    def from_model(cls, model: torch.nn.Module, attention: dict[str, tuple[int, int, int]] | None = None,
                   optimizer_bytes: int | None = None) -> ModelShape:
        """``attention``: per layer ``(heads, query length, key length)`` of a sampled forward."""
        params = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in params)
        width = max((p.element_size() for p in params), default=4)
        heads = max((a[0] for a in (attention or {}).values()), default=1)
        hidden = max((p.shape[-1] for p in params if p.dim() == 2), default=1)
        if optimizer_bytes is None:
            optimizer_bytes = 8 + (4 if width < 4 else 0)
        return cls(count, len(attention or {}) or 1, heads, hidden, width, optimizer_bytes)


def activation_bytes(shape: ModelShape, rows: int, seq_len: int) -> int:
    """Activations kept for a backward of ``rows`` rows of ``seq_len`` tokens: as measured on the
    model (``shape.activation_bytes_per_token``), else ``34 * s * h`` bytes per row and layer in
    half precision with fused attention (Korthikanti et al. 2022, with dropout; an upper bound),
    scaled to the weights' width."""
    if shape.activation_bytes_per_token is not None:
        return int(rows * seq_len * shape.activation_bytes_per_token)
    return int(rows * seq_len * shape.hidden * shape.layers * 34 * shape.weight_bytes / 2)


def saved_activation_bytes(loss_fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> int:
    """Bytes that autograd saves for the backward of ``loss_fn()`` (each storage once, the
    parameters not counted): the activations of that forward, measured, not modelled. The
    graph is dropped without a backward.

    Example:
        >>> lin = torch.nn.Linear(8, 8)  # saves its input, tanh its output: 2 x 4 x 8 floats
        >>> saved_activation_bytes(lambda: torch.tanh(lin(torch.ones(4, 8))).sum(), list(lin.parameters()))
        256
    """
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(seen.values())


@dataclass
class SharpnessPlan:
    """The sharpness probe's choices under a budget, and what they cost."""

    method: str  # "lanczos" or "power"
    vectors: int  # parameter-sized vectors the eigen solver keeps (Lanczos: its reorthogonalised basis)
    hvp_mode: str  # "autograd" or "finite_difference"
    rows: int
    seq_len: int
    bytes: int
    fits: bool
    why: str = ""


def _hvp_bytes(shape: ModelShape, mode: str, rows: int, seq_len: int, local_params: int) -> int:
    act = activation_bytes(shape, rows, seq_len)
    if mode == "autograd":  # the double backward keeps the first backward's graph, math attention included
        # (about twice the forward's activations again, and the gradient itself as part of the graph)
        attention = 6 * rows * shape.layers * shape.heads * seq_len ** 2 * 4
        return 3 * act + attention + 2 * local_params * shape.weight_bytes
    return act + 3 * local_params * shape.weight_bytes  # the saved weights and two gradients, in their dtype


def plan_sharpness(shape: ModelShape, budget: int, *, iters: int, method: str = "lanczos", hvp_mode: str = "auto",
                   rows: int, seq_len: int, local_params: int | None = None, sharded: bool = False,
                   shrinkable: bool = True, shorter_sequences: bool = True) -> SharpnessPlan:
    """Fit the sharpness probe into ``budget`` bytes. In order of preference: the double backward
    (``auto``; exact) on the whole held batch, finite differences on it, finite differences on
    fewer rows, then on a shorter sequence; each with a Lanczos basis of what is left (``iters + 1``
    vectors in full, fewer with a partial reorthogonalisation, at least 3). Only when no choice
    leaves room for 3 vectors, power iteration (2 vectors). ``shrinkable``: the held batch may be
    cut (a probe given only a loss function cannot); ``shorter_sequences``: to fewer tokens too
    (its second dimension is the attention's sequence).

    Example:
        >>> shape = ModelShape(params=10**9, layers=24, heads=16, hidden=2048)
        >>> plan = plan_sharpness(shape, 40 * GIB, iters=20, rows=4, seq_len=4096)
        >>> plan.hvp_mode, plan.method, plan.vectors, plan.rows, plan.fits
        ('finite_difference', 'lanczos', 3, 4, True)
    """
    local = shape.params if local_params is None else local_params
    vector = local * shape.weight_bytes  # the solvers' vectors take the parameters' dtype
    full = iters + 1 if method == "lanczos" else 2
    candidates = [] if sharded or hvp_mode == "finite_difference" else [("autograd", rows, seq_len)]
    if hvp_mode != "autograd" or sharded:
        candidates += [("finite_difference", r, seq_len) for r in (_halvings(rows) if shrinkable else [rows])]
        if shrinkable and shorter_sequences:
            candidates += [("finite_difference", 1, s) for s in _halvings(seq_len, floor=16)[1:]]
    for least in ((3 if method == "lanczos" else 2), 2):  # a Lanczos basis first; power iteration last
        for mode, r, s in candidates:
            hvp = _hvp_bytes(shape, mode, r, s, local)
            # one vector more than the solver keeps: each step makes its new one before the oldest goes
            vectors = min(full, int(max(budget - hvp, 0) // vector) - 1)
            if vectors < least:
                continue
            solver = "power" if vectors < 3 or method == "power" else "lanczos"
            vectors = 2 if solver == "power" else vectors
            why = []
            if (mode, r, s) != candidates[0]:
                why.append(f"{mode.replace('_', ' ')} on {r} rows of {s} tokens")
            if solver == "lanczos" and vectors < full:
                why.append(f"Lanczos with {vectors} vectors instead of {full}")
            if solver != method:
                why.append("power iteration instead of Lanczos")
            return SharpnessPlan(solver, vectors, mode, r, s, hvp + (vectors + 1) * vector, True, "; ".join(why))
    mode, r, s = candidates[-1]
    need = _hvp_bytes(shape, mode, r, s, local) + 3 * vector
    return SharpnessPlan("power", 2, mode, r, s, need, False,
                         f"even power iteration with {mode.replace('_', ' ')} on one row of {s} tokens needs "
                         f"{_gib(need)}, the budget is {_gib(budget)}")


def _halvings(n: int, floor: int = 1) -> list[int]:
    out = [n]
    while out[-1] // 2 >= floor:
        out.append(out[-1] // 2)
    return out


@dataclass
class Part:
    """One stateful part of the monitor: where it lives, its bytes in full and under the budget."""

    name: str
    where: str
    bytes: int
    budgeted: int
    note: str = ""


@dataclass
class MemoryPlan:
    """The monitor's memory, part by part (see ``memory_plan``)."""

    parts: list[Part] = field(default_factory=list)
    budget: int = 0
    sharpness: SharpnessPlan | None = None

    def over_budget(self) -> list[Part]:
        return [p for p in self.parts if p.where == "device" and p.bytes > self.budget]

    def table(self) -> str:
        lines = [f"{'part':<40} {'where':<7} {'in full':>10} {'budgeted':>10}  note"]
        for p in self.parts:
            lines.append(f"{p.name:<40} {p.where:<7} {_gib(p.bytes):>10} {_gib(p.budgeted):>10}  {p.note}")
        lines.append(f"device budget: {_gib(self.budget)}")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.3g} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.3g} MiB"


def memory_plan(model: torch.nn.Module | None = None, *, shape: ModelShape | None = None, seq_len: int,
                world_size: int = 1, sharded: bool | None = None, held_rows: int = 4, iters: int = 20,
                method: str = "lanczos", hvp_mode: str = "auto", budget: int | MemoryBudget | None = None,
                device_free: int | None = None, attention: dict[str, tuple[int, int, int]] | None = None,
                activation_bytes_per_token: int | None = None) -> MemoryPlan:
    """The monitor's memory per GPU and per host for a model (or its ``shape``) and a run.

    Args:
        model: the model (its parameters are counted; ``attention`` gives its heads and layers,
            as a sampled forward saw them), or None with ``shape``.
        seq_len: the training sequence length.
        world_size: ranks; ``sharded``: FSDP2 (each rank holds ``1 / world_size`` of every
            weight), default: whether the model's parameters are DTensors.
        held_rows, iters, method, hvp_mode: the sharpness probe's settings.
        budget: bytes, or a ``MemoryBudget`` resolved against ``device_free`` (default: the free
            memory of the model's device).
        activation_bytes_per_token: what a forward saves per token (``saved_activation_bytes``);
            default: the formula from the shape.

    Example:
        >>> plan = memory_plan(shape=ModelShape(7 * 10**9, 32, 32, 4096), seq_len=4096, world_size=8,
        ...                    sharded=True, budget=8 * GIB)
        >>> [p.name for p in plan.over_budget()]
        ['sharpness, Lanczos basis (in full)', 'sharpness, HVP (double backward)', 'sharpness, HVP (finite differences)']
        >>> plan.sharpness.hvp_mode, plan.sharpness.method, plan.sharpness.rows, plan.sharpness.seq_len
        ('finite_difference', 'power', 1, 16)
    """
    if shape is None:
        if model is None:
            raise ValueError("memory_plan needs a `model` or its `shape`")
        shape = ModelShape.from_model(model, attention)
    if activation_bytes_per_token is not None:
        shape = replace(shape, activation_bytes_per_token=activation_bytes_per_token)
    if sharded is None:
        from stabmon.distributed import is_dtensor

        sharded = model is not None and any(is_dtensor(p) for p in model.parameters())
    local = shape.params // world_size if sharded else shape.params
    if budget is None or isinstance(budget, MemoryBudget):
        device = next((p.device for p in model.parameters()), torch.device("cpu")) if model is not None else "cpu"
        free = device_free if device_free is not None else free_memory(device)
        budget = (budget or MemoryBudget()).bytes_of(free)
    w, vector = shape.weight_bytes, local * shape.weight_bytes
    plan = MemoryPlan(budget=budget)
    sharp = plan_sharpness(shape, budget, iters=iters, method=method, hvp_mode=hvp_mode, rows=held_rows,
                           seq_len=seq_len, local_params=local, sharded=sharded)
    plan.sharpness = sharp
    full_basis = (iters + 2) * vector if method == "lanczos" else 3 * vector
    autograd = _hvp_bytes(shape, "autograd", held_rows, seq_len, local)
    fd = _hvp_bytes(shape, "finite_difference", held_rows, seq_len, local)
    snapshot = local * (w + shape.optimizer_bytes)
    gpus_per_host = min(8, world_size)
    plan.parts = [
        Part("gradient probe, update ratio", "device", local * w, local * w, "a copy of the weights, sampled steps"),
        Part("attention probe, score block", "device", _SCORE_BLOCK, _SCORE_BLOCK, "CPU path; fused on CUDA"),
        Part("sharpness, Lanczos basis (in full)", "device", full_basis, (sharp.vectors + 1) * vector if sharp.fits else 0,
             f"{sharp.method}, {sharp.vectors} vectors under the budget"),
        Part("sharpness, HVP (double backward)", "device", autograd,
             autograd if sharp.hvp_mode == "autograd" and sharp.fits else 0, "math attention: L^2 per head and layer"),
        Part("sharpness, HVP (finite differences)", "device", fd,
             _hvp_bytes(shape, "finite_difference", sharp.rows, sharp.seq_len, local)
             if sharp.hvp_mode == "finite_difference" and sharp.fits else 0,
             f"{sharp.rows} rows of {sharp.seq_len} under the budget" if sharp.fits else "skipped: does not fit"),
        Part(f"snapshots, per host of {gpus_per_host} GPUs", "host", snapshot * gpus_per_host,
             snapshot * (gpus_per_host if sharded else 1),
             "each rank its shards" if sharded else "replicated: one copy (rank 0's), not one per rank"),
        Part("forensics, one investigation", "device", local * 4, local * 4, "a gradient of the held rows (transient)"),
    ]
    return plan
