"""What the forensics do on a spike or non-finite step, and within what bounds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stabmon._validation import check_bool, check_positive_float, check_positive_int

__all__ = ["ForensicsConfig"]


@dataclass(frozen=True)
class ForensicsConfig:
    """Settings of the spike forensics (see ``stabmon.forensics``).

    Args:
        rows: rows of the batch ranked and named in a record, and whose gradient share is
            measured (one forward and one backward of a single row each). Default 8.
        scan_rows: most rows whose loss is computed one by one when it cannot be read from the
            model's ``cross_entropy`` call in one forward. Default 64.
        replay: recompute the step from the same weights, batch and RNG and compare. Default True.
        tolerance: relative difference of the replayed loss and gradient norm from the step's
            under which the spike is ``"reproducible"``. Default 1e-3 (a GPU's non-deterministic
            kernels differ by about 1e-6).
        trace_nonfinite: on a non-finite step, find the first module whose output holds NaN or
            inf. Default True.
        on_warnings: investigate spike warnings too, not only critical findings. Default True.
        max_events: investigations per run at most (each costs a few training steps). Default 20.
        save_batches: also save each investigated batch (``step_<N>_rank<R>.pt``) when it is at
            most ``max_batch_bytes``. Default False.
        max_batch_bytes: size cap of a saved batch. Default 64 MiB.
        batch_ids: a function ``batch -> sequence`` of each row's dataset index; by default the
            batch's ``"index"`` or ``"idx"`` entry, when it has one.

    Example:
        >>> ForensicsConfig(rows=4).rows
        4
    """

    rows: int = 8
    scan_rows: int = 64
    replay: bool = True
    tolerance: float = 1e-3
    trace_nonfinite: bool = True
    on_warnings: bool = True
    max_events: int = 20
    save_batches: bool = False
    max_batch_bytes: int = 64 << 20
    batch_ids: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        for name in ("rows", "scan_rows", "max_events", "max_batch_bytes"):
            check_positive_int(name, getattr(self, name))
        for name in ("replay", "trace_nonfinite", "on_warnings", "save_batches"):
            check_bool(name, getattr(self, name))
        check_positive_float("tolerance", self.tolerance)
        if self.batch_ids is not None and not callable(self.batch_ids):
            raise ValueError(f"`batch_ids` must be a function batch -> row indices, got {self.batch_ids!r}")
