"""Comparison helpers for the kernel tests (flash-attention's tolerance rule)."""

from __future__ import annotations

import torch


def max_abs_err(got: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest |got - truth| over entries where both are finite; mismatched infinities count as inf."""
    got, truth = got.double(), truth.double()
    same_inf = torch.isinf(got) & torch.isinf(truth) & (torch.sign(got) == torch.sign(truth))
    if torch.isnan(got).any():
        return float("inf")
    diff = torch.where(same_inf, torch.zeros_like(got), (got - truth).abs())
    return diff.max().item() if diff.numel() else 0.0


def assert_close_to_truth(got: torch.Tensor, same_dtype: torch.Tensor, truth: torch.Tensor, atol: float, what: str) -> None:
    """err(got) <= 2 * err(torch in the same dtype) + atol, with a readable failure."""
    err = max_abs_err(got, truth)
    ref_err = max_abs_err(same_dtype, truth)
    bound = 2 * ref_err + atol
    if not err <= bound:
        diff = (got.double() - truth.double()).abs().nan_to_num(nan=float("inf"))
        idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(
            f"{what}: max error {err:.3e} > bound {bound:.3e} (torch same dtype {ref_err:.3e}); "
            f"first worst index {idx}: got {got[idx].item()!r}, truth {truth[idx].item()!r}; "
            f"NaN in result: {int(torch.isnan(got).sum())}"
        )
