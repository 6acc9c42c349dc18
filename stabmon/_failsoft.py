"""Fail soft: a fault in one stage of the monitor switches that stage off; training goes on.

Every stage runs under ``FailSoft.run(stage, fn)``. On one process a stage that raises is
disabled at once, with one warning. With several ranks that reduce their signals together,
a stage that fails on one rank must be switched off on every rank at the same step, or the
ranks stop agreeing on what they reduce (a probe that is on here and off there changes the
size of the next collective; a gloo job aborts, an NCCL job hangs): the failure is kept
*pending* on the rank where it happened (the stage is off there already), and each of the
monitor's reductions carries ``flags()``, one slot per stage, in the tensor it reduces
anyway. ``settle(counts)`` then turns off, on every rank, each stage that failed on any.

Stage names are a fixed tuple (``STAGES``), the same on every rank, so the flags of every
rank line up without any agreement beyond the reduction itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

__all__ = ["FailSoft", "STAGES", "StabmonWarning"]

T = TypeVar("T")

# Every stage that runs under the guard. Measuring and detecting stages first; acting stages
# (one per kind of action) after them: a fault while acting never switches off measuring,
# detecting, logging or alerting.
STAGES: tuple[str, ...] = (
    "capture", "attention probe", "logit probe", "probe forward", "sharpness probe", "gradient probe",
    "step read", "step signals", "signals", "detection",
    "policy", "forensics", "qk-clip", "lr control", "skip step", "rollback", "snapshot", "stop",
    "sinks", "event log", "alerts", "wandb",
)
_INDEX = {stage: i for i, stage in enumerate(STAGES)}


class StabmonWarning(UserWarning):
    """Category of every warning stabmon emits (filter it with ``warnings.filterwarnings``)."""


class FailSoft:
    """Runs the monitor's stages; a stage that raises is warned about once and switched off.

    Args:
        strict: re-raise instead (the test suite sets ``STABMON_STRICT=1``), so that bugs
            cannot hide behind the guard.
        synced: a callable that says whether several ranks reduce together (then a failure
            waits in ``pending`` for the next reduction); default: never.

    Example:
        >>> guard = FailSoft()
        >>> guard.run("attention probe", lambda: 1 / 0) is None
        True
        >>> guard.disabled["attention probe"]
        "ZeroDivisionError('division by zero')"
        >>> guard.run("attention probe", lambda: 42) is None   # switched off from now on
        True
    """

    def __init__(self, strict: bool = False, synced: Callable[[], bool] = lambda: False) -> None:
        self.strict = strict
        self._synced = synced
        self.disabled: dict[str, str] = {}  # stage -> why: off on every rank
        self.pending: dict[str, str] = {}  # stage -> error: failed on this rank, off here, not yet settled
        self._said: set[str] = set()

    def off(self, stage: str) -> bool:
        """True when ``stage`` must not run on this rank (disabled, or failed here and pending)."""
        return stage in self.disabled or stage in self.pending

    def run(self, stage: str, fn: Callable[..., T], *args: Any, agreed: bool = False, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or None when the stage is off or ``fn`` raises (then it is off).

        ``agreed=True`` for the work every rank must do alike (an action, a collective): it runs
        while the stage is only pending here, and stops when it is switched off on every rank.
        """
        if stage in self.disabled or (stage in self.pending and not agreed):
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if self.strict:
                raise
            self.fail(stage, err)
            return None

    def attempt(self, stage: str, fn: Callable[..., Any], *args: Any, agreed: bool = False, **kwargs: Any) -> bool:
        """Like ``run``, for work that returns nothing: True when it ran and did not raise."""
        if stage in self.disabled or (stage in self.pending and not agreed):
            return False
        try:
            fn(*args, **kwargs)
            return True
        except Exception as err:
            if self.strict:
                raise
            self.fail(stage, err)
            return False

    def fail(self, stage: str, err: BaseException | str) -> None:
        """Record that ``stage`` failed on this rank (pending until settled where ranks are synced)."""
        if stage not in _INDEX:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
        why = err if isinstance(err, str) else repr(err)
        if self._synced():
            if stage not in self.pending and stage not in self.disabled:
                self.pending[stage] = why
                self.warn_once(stage, f"stabmon: {stage} failed on this rank: {why}. It is switched off on every "
                                      "rank at the monitor's next reduction. Training goes on.")
            return
        self.disabled.setdefault(stage, why)
        self.warn_once(stage, f"stabmon: {stage} disabled after an error: {why}. Training goes on.")

    def disable(self, stage: str, why: str) -> None:
        """Switch ``stage`` off by decision (the same on every rank), with no warning."""
        if stage not in _INDEX:
            raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
        self.disabled.setdefault(stage, why)
        self.pending.pop(stage, None)

    # -- across ranks -------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        return bool(self._synced())

    def flags(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """One slot per stage: 1 where the stage failed on this rank and is not settled yet."""
        flags = torch.zeros(len(STAGES), dtype=dtype)
        for stage in self.pending:
            flags[_INDEX[stage]] = 1.0
        return flags.to(device)

    def settle(self, counts: Sequence[float], step: int | None = None) -> list[str]:
        """After a reduction of ``flags()`` (summed, or max, over ranks): switch off every stage
        that failed on a rank. Returns the stages switched off now (the same list on every rank)."""
        newly = []
        for stage, count in zip(STAGES, counts):
            if count > 0 and stage not in self.disabled:
                newly.append(stage)
                here = self.pending.pop(stage, None)
                self.disabled[stage] = here or "an error on another rank"
                where = f" (here: {here})" if here else ""
                at = f" at step {step}" if step is not None else ""
                self.warn_once(f"{stage} settled", f"stabmon: {stage} disabled on every rank{at} after an error on a "
                                                   f"rank{where}. Training goes on.")
        return newly

    def warn_once(self, key: str, message: str) -> None:
        if key in self._said:
            return
        self._said.add(key)
        warnings.warn(message, StabmonWarning, stacklevel=3)
