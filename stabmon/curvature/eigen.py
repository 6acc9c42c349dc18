"""Top Hessian eigenvalue by Lanczos (full reorthogonalisation) or power iteration,
and the Hutchinson trace, all from Hessian-vector products.

Random start vectors come from the caller's ``torch.Generator`` (or one seeded from
``seed``), never from the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from stabmon._validation import check_in, check_positive_float, check_positive_int
from stabmon.curvature.hessian_vector import HVPFunction, flat_dot, flat_norm

__all__ = ["EigenEstimate", "TraceEstimate", "hessian_trace", "preconditioned", "random_like", "top_eigenvalue"]

_METHODS = ("lanczos", "power")


class EigenEstimate(tuple):
    """``(value, hvps)``: the estimate and the number of Hessian-vector products used.

    Unpacks as a pair; ``converged`` tells whether the tolerance was met within ``iters``.
    """

    def __new__(cls, value: float, hvps: int, converged: bool) -> "EigenEstimate":
        obj = super().__new__(cls, (value, hvps))
        obj.converged = converged
        return obj

    @property
    def value(self) -> float:
        return self[0]

    @property
    def hvps(self) -> int:
        return self[1]

    def __repr__(self) -> str:
        return f"EigenEstimate(value={self.value!r}, hvps={self.hvps}, converged={self.converged})"


class TraceEstimate(NamedTuple):
    estimate: float
    standard_error: float


def random_like(
    params: Sequence[torch.Tensor], generator: torch.Generator, kind: str = "gaussian"
) -> list[torch.Tensor]:
    """Random vector shaped like ``params``: Gaussian or Rademacher (+-1), from ``generator``.

    Drawn on the generator's device in float32, then moved to each parameter.
    """
    out = []
    for p in params:
        if kind == "rademacher":
            r = torch.randint(0, 2, p.shape, generator=generator, device=generator.device).float() * 2 - 1
        else:
            r = torch.randn(p.shape, generator=generator, device=generator.device)
        out.append(r.to(device=p.device, dtype=p.dtype))
    return out


def _generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator(device="cpu").manual_seed(seed)


def _scale(v: list[torch.Tensor], factor: float) -> list[torch.Tensor]:
    return [x * factor for x in v]


def _axpy(y: list[torch.Tensor], a: float, x: list[torch.Tensor]) -> list[torch.Tensor]:
    """y + a x."""
    return [yi + a * xi for yi, xi in zip(y, x)]


def top_eigenvalue(
    hvp_fn: HVPFunction,
    params: Sequence[torch.Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    method: str = "lanczos",
    generator: torch.Generator | None = None,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
    max_vectors: int | None = None,
) -> EigenEstimate:
    """Largest-magnitude eigenvalue of the Hessian behind ``hvp_fn``.

    Args:
        hvp_fn: ``v -> H v`` over lists shaped like ``params`` (see ``stabmon.curvature.hvp``).
        params: the parameters (for shapes, devices and dtypes).
        iters: most Hessian-vector products to spend. Lanczos keeps ``iters`` vectors the
            size of ``params`` (full reorthogonalisation); power iteration keeps two.
        tol: stop when the estimate's relative change (power) or its Ritz residual
            ``beta_k |e_k^T y| / |theta|`` (Lanczos) falls below ``tol``.
        method: ``"lanczos"`` or ``"power"``.
        generator / seed: source of the random start vector (a fresh CPU generator seeded
            with ``seed`` when ``generator`` is None).
        callback: called as ``callback(hvps_so_far, estimate)`` after every product (progress
            output, convergence studies).
        max_vectors: Lanczos keeps at most this many basis vectors (at least 3): each new vector
            is reorthogonalised against the last ``max_vectors - 1`` only, a partial
            reorthogonalisation that trades a little accuracy for memory (3: the plain three-term
            recurrence). None: every vector (full reorthogonalisation).

    Returns:
        ``EigenEstimate(value, hvps)`` with a ``converged`` flag.

    Raises:
        ValueError: an argument outside its allowed values.

    Example:
        >>> diag = torch.tensor([3.0, -5.0, 1.0])
        >>> est = top_eigenvalue(lambda v: [diag * v[0]], [torch.zeros(3)], iters=10)
        >>> round(est.value, 4), est.hvps <= 3
        (-5.0, True)
    """
    check_positive_int("iters", iters)
    check_positive_float("tol", tol)
    check_in("method", method, _METHODS)
    params = list(params)
    v = random_like(params, _generator(generator, seed))
    v = _scale(v, 1.0 / float(flat_norm(v)))
    report = callback or (lambda k, value: None)
    if method == "power":
        return _power(hvp_fn, v, iters, tol, report)
    if max_vectors is not None and max_vectors < 3:
        raise ValueError(f"`max_vectors` must be at least 3 for Lanczos (use method='power'), got {max_vectors}")
    return _lanczos(hvp_fn, v, iters, tol, report, max_vectors)


def _power(
    hvp_fn: HVPFunction, v: list[torch.Tensor], iters: int, tol: float, report: Callable[[int, float], None]
) -> EigenEstimate:
    estimate = math.nan
    for k in range(1, iters + 1):
        hv = hvp_fn(v)
        new = float(flat_dot(v, hv))  # Rayleigh quotient, v normalised
        report(k, new)
        norm = float(flat_norm(hv))
        if norm == 0 or not math.isfinite(norm):
            return EigenEstimate(new if math.isfinite(new) else math.nan, k, norm == 0)
        if k > 1 and abs(new - estimate) <= tol * abs(new):
            return EigenEstimate(new, k, True)
        estimate = new
        v = _scale(hv, 1.0 / norm)
    return EigenEstimate(estimate, iters, False)


def _lanczos(
    hvp_fn: HVPFunction, v: list[torch.Tensor], iters: int, tol: float, report: Callable[[int, float], None],
    max_vectors: int | None = None,
) -> EigenEstimate:
    basis: list[list[torch.Tensor]] = [v]  # the last max_vectors - 1 of the Lanczos vectors (all, by default)
    alphas: list[float] = []
    betas: list[float] = []
    estimate = math.nan
    for k in range(1, iters + 1):
        w = hvp_fn(basis[-1])
        alpha = float(flat_dot(w, basis[-1]))
        alphas.append(alpha)
        w = _axpy(w, -alpha, basis[-1])
        if betas:
            w = _axpy(w, -betas[-1], basis[-2])
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            for b in basis:
                w = _axpy(w, -float(flat_dot(w, b)), b)
        beta = float(flat_norm(w))
        if not math.isfinite(beta):
            return EigenEstimate(math.nan, k, False)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(t)
        top = int(torch.argmax(evals.abs()))
        estimate = float(evals[top])
        report(k, estimate)
        residual = beta * abs(float(evecs[-1, top]))
        if residual <= tol * abs(estimate) or beta <= 1e-12 * max(1.0, abs(estimate)):
            return EigenEstimate(estimate, k, True)
        betas.append(beta)
        basis.append(_scale(w, 1.0 / beta))
        if max_vectors is not None and len(basis) > max_vectors - 1:  # w is the last one of the budget
            del basis[0]
    return EigenEstimate(estimate, iters, False)


def hessian_trace(
    hvp_fn: HVPFunction,
    params: Sequence[torch.Tensor],
    *,
    samples: int = 50,
    generator: torch.Generator | None = None,
    seed: int = 0,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr(H)``: the mean of ``z^T H z`` over Rademacher ``z``.

    Returns ``(estimate, standard_error)``, the standard error being the sample standard
    deviation over ``sqrt(samples)`` (NaN for one sample).

    Example:
        >>> diag = torch.tensor([3.0, -5.0, 1.0])
        >>> est, err = hessian_trace(lambda v: [diag * v[0]], [torch.zeros(3)], samples=4)
        >>> est, err  # z^T diag(d) z = sum(d) exactly for +-1 entries
        (-1.0, 0.0)
    """
    check_positive_int("samples", samples)
    params = list(params)
    gen = _generator(generator, seed)
    values = []
    for _ in range(samples):
        z = random_like(params, gen, kind="rademacher")
        values.append(float(flat_dot(z, hvp_fn(z))))
    mean = sum(values) / samples
    if samples == 1:
        return TraceEstimate(mean, math.nan)
    var = sum((x - mean) ** 2 for x in values) / (samples - 1)
    return TraceEstimate(mean, math.sqrt(var / samples))


def preconditioned(hvp_fn: HVPFunction, inv_sqrt_p: Sequence[torch.Tensor]) -> HVPFunction:
    """``v -> P^-1/2 H P^-1/2 v``: same eigenvalues as ``P^-1 H``, but symmetric (Lanczos-ready)."""

    def fn(v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        hv = hvp_fn([x * s for x, s in zip(v, inv_sqrt_p)])
        return [x * s for x, s in zip(hv, inv_sqrt_p)]

    return fn


