"""Sharpness probe: top Hessian eigenvalue on a held batch every K steps, and where it
stands against the edge of stability of the optimizer in use."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from stabmon._validation import check_bool, check_in, check_positive_float, check_positive_int
from stabmon.curvature import adam_preconditioner, hvp, preconditioned, sgd_threshold, top_eigenvalue
from stabmon.curvature.hessian_vector import sharded_inner_products
from stabmon.distributed import is_dtensor, local_tensor
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
        hvp_mode: ``"autograd"`` (exact; attention runs on SDPA's math backend inside the
            probe) or ``"finite_difference"`` (no double backward: any fused kernel works).
        batch_size: rows of the first training batch kept as the held batch (the same batch
            for every estimate, so estimates are comparable over time). Default 4.
        preconditioned: also estimate Adam's preconditioned sharpness. Default True.
        seed: seed of the probe's own generator (start vectors) and of the forked RNG under
            which the held batch's loss is evaluated.

    Example:
        >>> SharpnessConfig(every_n_steps=100, method="power")
        SharpnessConfig(every_n_steps=100, method='power', iters=20, tol=0.01, hvp_mode='autograd', batch_size=4, preconditioned=True, seed=0)
    """

    every_n_steps: int = 2000
    method: str = "lanczos"
    iters: int = 20
    tol: float = 1e-2
    hvp_mode: str = "autograd"
    batch_size: int = 4
    preconditioned: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("every_n_steps", self.every_n_steps)
        check_in("method", self.method, ("lanczos", "power"))
        check_positive_int("iters", self.iters)
        check_positive_float("tol", self.tol)
        check_in("hvp_mode", self.hvp_mode, ("autograd", "finite_difference"))
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

    def __init__(self, config: SharpnessConfig | None = None) -> None:
        self.config = config or SharpnessConfig()
        self.estimates = 0
        self.notes: list[str] = []  # one-time messages for the monitor to report

    def should_run(self, step: int) -> bool:
        return step % self.config.every_n_steps == 0

    def vector_bytes(self, model: torch.nn.Module) -> int:
        """Bytes of one vector shaped like this rank's trainable parameters (float32 or wider)."""
        params = [local_tensor(p) for p in model.parameters() if p.requires_grad]
        return sum(p.numel() * max(p.element_size(), 4) for p in params)

    def preflight(self, model: torch.nn.Module) -> None:
        """Raise ``torch.OutOfMemoryError`` before any work when the estimate's vectors cannot fit
        in the free memory of this rank's device: Lanczos keeps up to ``iters`` of them, power
        iteration and the HVPs a handful. Checked where the device reports its free memory (CUDA).

        The monitor runs it before the step's read, so that a rank that would run out says so
        with the read and every rank skips the estimate (under FSDP2 an estimate that fails
        half-way on one rank would leave the others waiting in its collectives).
        """
        device = next((local_tensor(p).device for p in model.parameters() if p.requires_grad), None)
        if device is None or device.type != "cuda":
            return
        vectors = (self.config.iters if self.config.method == "lanczos" else 1) + 4
        need = vectors * self.vector_bytes(model)
        free, _ = torch.cuda.mem_get_info(device)
        if need > free:
            raise torch.OutOfMemoryError(
                f"the sharpness probe needs about {need / 2**30:.1f} GiB for {vectors} parameter-sized vectors "
                f"and {free / 2**30:.1f} GiB are free on {device}; lower SharpnessConfig.iters or use method='power'")

    def measure(
        self, loss_fn: Callable[[], torch.Tensor], model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, float]:
        """Run one estimate; returns host floats keyed ``sharpness/...``."""
        cfg = self.config
        start = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return {}
        seed = cfg.seed + self.estimates
        self.estimates += 1
        out: dict[str, float] = {}
        sharded = any(is_dtensor(p) for p in params)
        mode = cfg.hvp_mode
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
            est = top_eigenvalue(fn, shapes, iters=cfg.iters, tol=cfg.tol, method=cfg.method, generator=gen)
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
                                      method=cfg.method, generator=gen)
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
