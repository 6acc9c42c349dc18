"""Sharpness probe: top Hessian eigenvalue on a held batch every K steps, and where it
stands against the edge of stability of the optimizer in use."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from stabmon._validation import check_bool, check_in, check_positive_float, check_positive_int
from stabmon.curvature import adam_preconditioner, hvp, preconditioned, sgd_threshold, top_eigenvalue
from stabmon.curvature.hessian_vector import isolated_rng, sharded_inner_products
from stabmon.distributed import is_dtensor, local_tensor
from stabmon.memory import MemoryBudget, ModelShape, SharpnessPlan, plan_sharpness, saved_activation_bytes
from stabmon.probes.batches import batch_rows, head_of_batch, sequence_length as _sequence_length
from stabmon.signals import SignalSet, torch_distributed_all_reduce

__all__ = ["SharpnessConfig", "SharpnessProbe", "buffers_preserved"]


@dataclass(frozen=True)
class SharpnessConfig:
    """How and how often the sharpness probe runs.

    Args:
        every_n_steps: steps between estimates (step 0 included). Default 2000: on the
            example GPT with AdamW one estimate (top and preconditioned eigenvalue, about 13
            Hessian-vector products) costs about 10 training steps on CPU
            (benchmarks/sharpness.py), so the probe costs about 0.5% of training time.
        method: ``"lanczos"`` (fewer HVPs for the same accuracy) or ``"power"``.
        iters: most Hessian-vector products per estimate. Default 20.
        tol: relative tolerance of the estimate. Default 1e-2: sharpness is watched for its
            trend and its ratio to a threshold, not to three digits.
        hvp_mode: ``"auto"`` (the default: the double backward where it fits the memory budget,
            finite differences where it does not, and said once), ``"autograd"`` (exact; attention
            runs on SDPA's math backend inside the probe, which keeps an ``L x L`` matrix per head and
            layer) or ``"finite_difference"`` (two ordinary backwards: any fused kernel works).
        batch_size: rows of the first training batch kept as the held batch (the same batch
            for every estimate, so estimates are comparable over time); fewer rows, and a shorter
            sequence, where the memory budget asks for it. Default 4.
        preconditioned: also estimate Adam's preconditioned sharpness. Default True.
        seed: seed of the probe's own generator (start vectors) and of the forked RNG under
            which the held batch's loss is evaluated.

    Example:
        >>> SharpnessConfig(every_n_steps=100, method="power")
        SharpnessConfig(every_n_steps=100, method='power', iters=20, tol=0.01, hvp_mode='auto', batch_size=4, preconditioned=True, seed=0)
    """

    every_n_steps: int = 2000
    method: str = "lanczos"
    iters: int = 20
    tol: float = 1e-2
    hvp_mode: str = "auto"
    batch_size: int = 4
    preconditioned: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("every_n_steps", self.every_n_steps)
        check_in("method", self.method, ("lanczos", "power"))
        check_positive_int("iters", self.iters)
        check_positive_float("tol", self.tol)
        check_in("hvp_mode", self.hvp_mode, ("auto", "autograd", "finite_difference"))
        check_positive_int("batch_size", self.batch_size)
        check_bool("preconditioned", self.preconditioned)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {self.seed!r}")


@contextlib.contextmanager
def buffers_preserved(model: torch.nn.Module) -> Iterator[None]:
    """BatchNorm running statistics and other buffers come back exactly as they were."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)


class SharpnessProbe:
    """Estimates the top Hessian eigenvalue of the loss on a held batch.

    Logged signals (``sharpness/``): ``top_eigenvalue``; ``hvps`` (products spent);
    ``x_lr`` (top eigenvalue times the learning rate, when all groups share one);
    ``preconditioned`` (top eigenvalue of ``P^-1 H`` for Adam/AdamW,
    ``P = diag(sqrt(v_hat) + eps) / lr``); ``eos_ratio`` (1 = the edge of stability:
    ``x_lr / (2 + 2 momentum)`` for SGD, ``preconditioned / ((2 + 2 beta1) / (1 - beta1))``
    for Adam); ``seconds`` (wall time of the estimate).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
        >>> probe = SharpnessProbe(SharpnessConfig(every_n_steps=1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> values = probe.measure(lambda: model(x).square().mean(), model, opt)
        >>> dense = 2 * torch.linalg.eigvalsh(torch.cat([x, torch.ones(8, 1)], 1).T @ torch.cat([x, torch.ones(8, 1)], 1) / 8)
        >>> abs(values["sharpness/top_eigenvalue"] - dense.max().item()) < 1e-2 * dense.max().item()
        True
    """

    def __init__(self, config: SharpnessConfig | None = None, budget: MemoryBudget | None = None) -> None:
        self.config = config or SharpnessConfig()
        self.budget = budget or MemoryBudget()
        self.estimates = 0
        self.notes: list[str] = []  # one-time messages for the monitor to report
        self.plan: SharpnessPlan | None = None  # the choices of the last estimate under the memory budget
        self._budget_bytes: int | None = None  # resolved at the first estimate, on the model's device
        self._budget_agreed = False
        self._held: tuple[Any, Callable[[Any], torch.Tensor]] | None = None
        self._activation_bytes_per_token: int | None = None

    def hold(self, batch: Any, loss_of: Callable[[Any], torch.Tensor]) -> None:
        """Keep the first rows of ``batch`` (a copy) and ``loss_of(batch) -> loss``: the held batch,
        which the probe may cut to fewer rows and a shorter sequence to fit its budget."""
        if self._held is None:
            self._held = (head_of_batch(batch, self.config.batch_size), loss_of)

    @property
    def holding(self) -> bool:
        return self._held is not None

    @property
    def activation_bytes_per_token(self) -> int | None:
        """What a forward of the held batch saves for its backward, per token (measured at the first estimate)."""
        return self._activation_bytes_per_token

    def make_plan(self, model: torch.nn.Module, attention: dict[str, tuple[int, int, int]] | None = None
                  ) -> SharpnessPlan:
        """The estimate's choices under the memory budget (see ``stabmon.memory.plan_sharpness``)."""
        cfg = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        self._resolve_budget(params)
        local = sum(local_tensor(p).numel() for p in params)
        rows, (seq_len, tokens) = cfg.batch_size, self._sequence(attention)
        if self._held is not None:
            rows = batch_rows(self._held[0]) or rows
        measured = self._activation_bytes_per_token  # per token, or per row where rows are not token sequences
        if measured is not None and not tokens:
            measured = -(-measured // seq_len)
        shape = dataclasses.replace(ModelShape.from_model(model, attention), activation_bytes_per_token=measured)
        return plan_sharpness(shape, self._budget_bytes, iters=cfg.iters, method=cfg.method, hvp_mode=cfg.hvp_mode,
                              rows=rows, seq_len=seq_len, local_params=local,
                              sharded=any(is_dtensor(p) for p in params), shrinkable=self._held is not None,
                              shorter_sequences=tokens)

    def _sequence(self, attention: dict[str, tuple[int, int, int]] | None) -> tuple[int, bool]:
        """The attention's query length, and whether the held batch's second dimension is it (its
        rows are token sequences, which a shorter sequence can cut)."""
        seq_len = max((a[1] for a in (attention or {}).values()), default=1)
        tokens = self._held is not None and _sequence_length(self._held[0]) == seq_len and seq_len > 1
        return seq_len, tokens

    def _resolve_budget(self, params: list[torch.Tensor]) -> None:
        if self._budget_bytes is None:
            device = local_tensor(params[0]).device if params else torch.device("cpu")
            self._budget_bytes = self.budget.resolve(device)

    def _measure_activations(self, model: torch.nn.Module, attention: dict[str, tuple[int, int, int]] | None) -> None:
        """Once, on one row of the held batch (at most 128 tokens): the bytes a forward saves for
        the backward, per token, so the plan's activation term is the model's own. Under the
        probe's forked RNG, with buffers (BatchNorm statistics) put back."""
        if self._held is None or self._activation_bytes_per_token is not None:
            return
        batch, loss_of = self._held
        seq_len, tokens = self._sequence(attention)
        sample = head_of_batch(batch, 1, max_len=min(seq_len, 128) if tokens else None)
        count = (_sequence_length(sample) or 1) if tokens else 1
        params = [p for p in model.parameters()]
        with buffers_preserved(model), isolated_rng([local_tensor(p).device for p in params], self.config.seed):
            saved = saved_activation_bytes(lambda: loss_of(sample), [local_tensor(p) for p in params])
        self._activation_bytes_per_token = max(1, saved // count)

    def should_run(self, step: int) -> bool:
        return step % self.config.every_n_steps == 0

    def vector_bytes(self, model: torch.nn.Module) -> int:
        """Bytes of one vector shaped like this rank's trainable parameters (float32 or wider)."""
        params = [local_tensor(p) for p in model.parameters() if p.requires_grad]
        return sum(p.numel() * max(p.element_size(), 4) for p in params)

    def preflight(self, model: torch.nn.Module, attention: dict[str, tuple[int, int, int]] | None = None) -> None:
        """Raise ``torch.OutOfMemoryError`` before any work when the estimate, as planned under the
        memory budget, cannot fit in the memory free now on this rank's device (the budget is a
        fraction of what was free at the first estimate). Checked where the device reports its
        free memory (CUDA).

        The monitor runs it before the step's read, so that a rank that would run out says so
        with the read and every rank skips the estimate (under FSDP2 an estimate that fails
        half-way on one rank would leave the others waiting in its collectives).
        """
        device = next((local_tensor(p).device for p in model.parameters() if p.requires_grad), None)
        if device is None or device.type != "cuda":
            return
        plan = self.make_plan(model, attention)
        free, _ = torch.cuda.mem_get_info(device)
        if plan.fits and plan.bytes > free:
            raise torch.OutOfMemoryError(
                f"the sharpness probe needs about {plan.bytes / 2**30:.1f} GiB ({plan.method}, {plan.vectors} "
                f"parameter-sized vectors, {plan.hvp_mode.replace('_', ' ')} on {plan.rows} rows) and "
                f"{free / 2**30:.1f} GiB are free on {device}; lower MonitorOptions.memory_budget")

    def _agree_on_budget(self, sharded: bool) -> None:
        """Under FSDP2 every rank must make the same choices (they meet in the same collectives):
        the smallest budget of any rank, agreed once, at the first estimate."""
        if self._budget_agreed or not sharded:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            budget = torch.tensor(float(self._budget_bytes), dtype=torch.float64, device=device)
            self._budget_bytes = int(torch_distributed_all_reduce(budget, "min").item())
        self._budget_agreed = True

    def measure(
        self, loss_fn: Callable[[], torch.Tensor] | None, model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None, attention: dict[str, tuple[int, int, int]] | None = None,
    ) -> dict[str, float]:
        """Run one estimate, within the memory budget; returns host floats keyed ``sharpness/...``.
        ``loss_fn``: the loss on a held batch (None: the batch given to ``hold``)."""
        cfg = self.config
        start = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or (loss_fn is None and self._held is None):
            return {}
        sharded = any(is_dtensor(p) for p in params)
        self._resolve_budget(params)
        self._agree_on_budget(sharded)
        self._measure_activations(model, attention)
        plan = self.plan = self.make_plan(model, attention)
        budget = f"{self._budget_bytes / 2**30:.2g} GiB"
        if not plan.fits:
            self.notes.append(f"stabmon: the sharpness probe is skipped: {plan.why} (MonitorOptions.memory_budget).")
            return {}
        if plan.why:
            self.notes.append(f"stabmon: the sharpness probe within its memory budget of {budget}: {plan.why}.")
        if loss_fn is None:
            batch, loss_of = self._held
            batch = head_of_batch(batch, plan.rows, max_len=plan.seq_len)
            loss_fn = lambda: loss_of(batch)  # noqa: E731
        seed = cfg.seed + self.estimates
        self.estimates += 1
        out: dict[str, float] = {}
        mode = plan.hvp_mode if cfg.hvp_mode == "auto" else cfg.hvp_mode
        max_vectors = plan.vectors if plan.method == "lanczos" and plan.vectors < cfg.iters + 1 else None
        context: contextlib.AbstractContextManager = contextlib.nullcontext()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        shapes = params
        if sharded:
            if not all(is_dtensor(p) for p in params):
                raise ValueError("a model with sharded and unsharded trainable parameters: the sharpness probe "
                                 "needs all of them sharded (fully_shard the root module too)")
            if mode == "autograd":
                mode = "finite_difference"
                self.notes.append("stabmon: double backward through FSDP2 is not supported; the sharpness probe uses "
                                  "finite-difference Hessian-vector products on the sharded model.")
            import torch.distributed as dist

            # every rank draws its own shards of the start vector; inner products sum over ranks
            gen.manual_seed(seed * 1_000_003 + (dist.get_rank() if dist.is_initialized() else 0))
            shapes = [local_tensor(p) for p in params]
            context = sharded_inner_products(lambda t: torch_distributed_all_reduce(t, "sum"))
        with buffers_preserved(model), context:
            fn = hvp(loss_fn, params, mode=mode, rng_seed=seed)
            est = top_eigenvalue(fn, shapes, iters=cfg.iters, tol=cfg.tol, method=plan.method, generator=gen,
                                 max_vectors=max_vectors)
            out["sharpness/top_eigenvalue"] = est.value
            out["sharpness/hvps"] = float(est.hvps)
            lrs = {float(g["lr"]) for g in optimizer.param_groups} if optimizer is not None else set()
            if len(lrs) == 1:
                out["sharpness/x_lr"] = est.value * next(iter(lrs))
            sgd = sgd_threshold(optimizer) if optimizer is not None else None
            if sgd is not None:
                lr, threshold = sgd
                out["sharpness/eos_ratio"] = est.value * lr / threshold
            pre = adam_preconditioner(optimizer, params) if optimizer is not None and cfg.preconditioned else None
            if pre is not None:
                inv_sqrt_p = [local_tensor(x) for x in pre.inv_sqrt_p]
                pest = top_eigenvalue(preconditioned(fn, inv_sqrt_p), shapes, iters=cfg.iters, tol=cfg.tol,
                                      method=plan.method, generator=gen, max_vectors=max_vectors)
                out["sharpness/preconditioned"] = pest.value
                out["sharpness/eos_ratio"] = pest.value / pre.threshold
                out["sharpness/hvps"] += pest.hvps
        out["sharpness/seconds"] = time.perf_counter() - start
        return out

    @staticmethod
    def signals(values: dict[str, float], out: SignalSet, device: torch.device) -> None:
        """Average the estimates over ranks (each rank holds its own batch)."""
        one = torch.ones((), device=device)
        for key, value in values.items():
            out.add_mean(key, torch.tensor(value, device=device), one)
