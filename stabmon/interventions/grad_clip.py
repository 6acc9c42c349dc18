"""Gradient clipping from the norms the monitor has read: ``clip_grad_norm_``'s arithmetic
without a second pass over the gradients.

``torch.nn.utils.clip_grad_norm_`` reads every gradient for the total norm, then multiplies
them all by ``min(1, max_norm / (total + 1e-6))``. The monitor reads every gradient once per
step anyway (one norm per tensor): the total comes from those norms (for float32 gradients
the same value to the bit), and the clip is the multiply alone, one fused ``_foreach_mul_``
per (device, dtype) group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from stabmon._validation import check_positive_float

__all__ = ["GradientClipper", "check_clip_grad_norm", "clip_coefficient"]


def check_clip_grad_norm(clip_grad_norm: float | None, gradients: bool) -> None:
    """Raise ``ValueError`` unless ``clip_grad_norm`` is None or a positive number with the
    gradient probe on (the clip uses the norms it reads)."""
    if clip_grad_norm is None:
        return
    check_positive_float("clip_grad_norm", clip_grad_norm)
    if not gradients:
        raise ValueError("`clip_grad_norm` clips from the gradient norms the monitor reads: it needs `gradients=True`")


def clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_``'s factor, on the device: ``min(1, max_norm / (total_norm + 1e-6))``.

    Example:
        >>> clip_coefficient(1.0, torch.tensor(4.0)), clip_coefficient(1.0, torch.tensor(0.5))
        (tensor(0.2500), tensor(1.))
    """
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


class GradientClipper:
    """Clips gradients to a global L2 norm from norms already read.

    Args:
        max_norm: the global norm the gradients are clipped to.

    ``clip(gradients, total_norm, fallback_params)`` multiplies ``gradients`` (this rank's
    tensors) by the coefficient of ``total_norm`` (the whole model's norm, a 0-dim tensor).
    Without a total (the read failed), ``torch.nn.utils.clip_grad_norm_`` clips
    ``fallback_params`` itself, so the run is clipped either way. ``clipped_from`` is the
    pre-clip norm of the last clip (what ``clip_grad_norm_`` returns).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(4)); w.grad = torch.full((4,), 2.0)   # norm 4
        >>> clipper = GradientClipper(1.0)
        >>> clipper.clip([w.grad], torch.linalg.vector_norm(w.grad), [w])
        >>> round(float(w.grad.norm()), 4), float(clipper.clipped_from)
        (1.0, 4.0)
    """

    def __init__(self, max_norm: float) -> None:
        check_positive_float("max_norm", max_norm)
        self.max_norm = float(max_norm)
        self.clipped_from: torch.Tensor | None = None

    def reset(self) -> None:
        """A new step: no clip yet."""
        self.clipped_from = None

    def clip(self, gradients: list[torch.Tensor], total_norm: torch.Tensor | None,
             fallback_params: Iterable[torch.nn.Parameter], *, strict: bool = False,
             on_fallback: Callable[[str], None] | None = None) -> None:
        """Clip ``gradients`` by ``total_norm``'s coefficient; ``strict``: an error other than a
        missing norm raises (a bug) instead of falling back."""
        try:
            if total_norm is None:
                raise RuntimeError("the whole model's gradient norm was not read this step")
            coef = clip_coefficient(self.max_norm, total_norm)
            groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for grad in gradients:
                groups.setdefault((grad.device, grad.dtype), []).append(grad)
            for (device, _), grads in groups.items():
                torch._foreach_mul_(grads, coef.to(device))
            self.clipped_from = total_norm
        except Exception as err:  # noqa: BLE001 - clipping is the run's arithmetic: it happens either way
            if strict and total_norm is not None:
                raise
            params = [p for p in fallback_params if p.grad is not None]
            if not params:
                return
            if on_fallback is not None:
                on_fallback(f"stabmon: clipping from the monitor's norms failed ({err}); "
                            "torch.nn.utils.clip_grad_norm_ clips instead")
            self.clipped_from = torch.nn.utils.clip_grad_norm_(params, self.max_norm)
