"""Adam's preconditioner and the edge-of-stability thresholds.

Gradient descent with learning rate ``lr`` is stable on a quadratic while the top Hessian
eigenvalue stays below ``2 / lr`` (heavy-ball momentum ``mu``: ``(2 + 2 mu) / lr``).
Adam behaves like preconditioned gradient descent with ``P = diag(sqrt(v_hat) + eps) / lr``;
it is stable while the top eigenvalue of ``P^-1 H`` stays below ``(2 + 2 beta1) / (1 - beta1)``,
38 for ``beta1 = 0.9`` (Cohen et al., "Adaptive gradient methods at the edge of stability",
2022; there ``lr`` is kept out of ``P`` and the threshold reads ``38 / lr``). Keeping ``lr``
inside ``P`` lets each parameter group have its own learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["AdamPreconditioner", "adam_preconditioner", "sgd_threshold"]


class AdamPreconditioner(NamedTuple):
    """``inv_sqrt_p`` per parameter (``sqrt(lr / (sqrt(v_hat) + eps))``) and the threshold."""

    inv_sqrt_p: list[torch.Tensor]
    threshold: float


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> AdamPreconditioner | None:
    """Read ``P^-1/2`` from an Adam/AdamW optimizer's state, or None when it has none yet.

    Returns None for optimizers without ``exp_avg_sq`` state (not Adam-like), before the
    first step, or when the parameter groups disagree on ``beta1``.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([w], lr=0.1, betas=(0.9, 0.999), eps=0.0)
        >>> w.grad = torch.tensor([2.0, 2.0]); opt.step()
        >>> pre = adam_preconditioner(opt, [w])
        >>> pre.inv_sqrt_p[0] ** 2, round(pre.threshold, 6)  # lr / |g| after one step
        (tensor([0.0500, 0.0500]), 38.0)
    """
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    inv_sqrt_p: list[torch.Tensor] = []
    beta1s = set()
    for p in params:
        group = group_of.get(id(p))
        state = optimizer.state.get(p, {}) if group is not None else {}
        key = "max_exp_avg_sq" if group is not None and group.get("amsgrad") else "exp_avg_sq"
        if key not in state or "betas" not in group:
            return None
        beta1, beta2 = group["betas"]
        beta1s.add(float(beta1))
        step = float(state["step"])
        if step < 1:
            return None
        lr = float(group["lr"])
        v_hat = state[key].float() / (1 - float(beta2) ** step)
        inv_sqrt_p.append((lr / (v_hat.sqrt() + float(group["eps"]))).sqrt().to(p.dtype))
    if len(beta1s) != 1:
        return None
    beta1 = beta1s.pop()
    return AdamPreconditioner(inv_sqrt_p, (2 + 2 * beta1) / (1 - beta1))


def sgd_threshold(optimizer: torch.optim.Optimizer) -> tuple[float, float] | None:
    """``(lr, threshold on lr * sharpness)`` for SGD: ``2 + 2 * momentum``; None for others.

    Example:
        >>> sgd_threshold(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.9))
        (0.1, 3.8)
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    lrs = {float(g["lr"]) for g in optimizer.param_groups}
    momenta = {float(g.get("momentum", 0.0)) for g in optimizer.param_groups}
    if len(lrs) != 1 or len(momenta) != 1:
        return None
    return lrs.pop(), 2 + 2 * momenta.pop()
