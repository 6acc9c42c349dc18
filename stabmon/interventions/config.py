"""The intervention settings: the escalation ladder (``InterventionConfig``) and hand-given
query and key entries for QK-clip (``QKClipOverride``). Plain data, checked at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stabmon._validation import check_bool, check_positive_float, check_positive_int
from stabmon.interventions.qk_locate import ParamRows, QKLocation

__all__ = ["InterventionConfig", "QKClipOverride"]


@dataclass(frozen=True)
class QKClipOverride:
    """The query and key entries of one attention module, given by hand.

    For layers the automatic location refuses (an exotic layout), or to pin it down.

    Args:
        module: qualified name of the module that calls SDPA (``"transformer.h.0.attn"``).
        query: ``(parameter name, rows of each query head)`` pairs: the rows (dim 0; the
            entries, for a bias) of that parameter that feed query head ``h``.
        key: the same for the key heads (fewer than the query heads under GQA).

    Example:
        >>> QKClipOverride("attn", query=(("attn.q.weight", ((0, 1), (2, 3))),),
        ...                key=(("attn.k.weight", ((0, 1), (2, 3))),)).module
        'attn'
    """

    module: str
    query: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]
    key: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.module, str):
            raise ValueError(f"`module` must be a str, got {self.module!r}")
        for field_name in ("query", "key"):
            pairs = getattr(self, field_name)
            if not pairs or not all(isinstance(n, str) and len(rows) > 0 for n, rows in pairs):
                raise ValueError(f"`{field_name}` must hold (parameter name, rows per head) pairs, got {pairs!r}")
        heads = {len(rows) for _, rows in self.query}
        key_heads = {len(rows) for _, rows in self.key}
        if len(heads) != 1 or len(key_heads) != 1 or next(iter(heads)) % next(iter(key_heads)):
            raise ValueError(f"every `query` pair must list the same number of heads, a multiple of the key "
                             f"heads; got {sorted(heads)} query and {sorted(key_heads)} key heads")

    def location(self) -> QKLocation:
        heads, groups = len(self.query[0][1]), len(self.key[0][1])
        params = [ParamRows(name, "q", 0, [list(r) for r in rows]) for name, rows in self.query]
        params += [ParamRows(name, "k", 0, [list(r) for r in rows]) for name, rows in self.key]
        return QKLocation(self.module, heads, groups, [h // (heads // groups) for h in range(heads)], params)


@dataclass(frozen=True)
class InterventionConfig:
    """The escalation ladder's settings (see the module docstring for how they combine).

    Args:
        lr_factor: LR multiplier of a scale-down. Default 0.5.
        lr_hold: steps the reduced LR is held. Default 100.
        lr_recover: steps over which it recovers linearly. Default 100.
        rewarm_start: LR fraction a re-warm starts from. Default 0.1.
        rewarm_steps: length of the re-warm ramp. Default 200.
        skip_steps: skip the optimizer step on a critical finding. Default True.
        rollback: keep healthy snapshots and roll back on repeated critical findings. Default True.
        snapshot_every_n_steps: steps between snapshots (taken only when the last
            ``cooldown`` steps had no finding). Default 100.
        snapshot_dir: where snapshots go; None keeps them in CPU memory. Default None.
        rollback_after: critical findings within ``window`` steps that trigger a rollback. Default 2.
        skip_batches: batches skipped after a rollback. Default 20.
        max_rollbacks: rollbacks allowed before the run is stopped. Default 3.
        stop: allow stopping the run. Default True.
        cooldown: steps after an action before a finding of the same severity acts again. Default 20.
        window: steps of the action cap and of the rollback count. Default 100.
        max_actions_per_window: most actions in any ``window`` steps (a non-finite step is skipped
            past it all the same). Default 10.
        grace_steps: steps the spike detectors stay quiet after a re-warm or rollback. Default 50.
        qk_clip_tau: the largest per-head max attention logit QK-clip allows; a layer whose
            max logit passes it is armed (measured every step, its heads above it rescaled
            after every step); None turns the rung off. Default 80, chosen by measurement:
            the example GPT's healthy runs (lr 1e-3 to 3e-3) peak at 63, runs at lr 0.03 pass
            250 by step 25 (benchmarks/RESULTS.md).
        qk_clip_alpha: the query's share of the rescaling when each query head has its own key
            head (keys take the rest; with shared key heads the query takes all). Default 0.5.
        qk_clip_overrides: hand-given query and key entries (``QKClipOverride``) for layers the
            automatic location refuses. Default none.
        lr_cut_factor: the lasting LR cut's factor (for the rest of the run). Default 0.5.
        lr_cut_after: warnings of the same signal within ``lr_cut_window`` steps that make the
            cut, once a scale-down and a re-warm have been tried. Default 3.
        lr_cut_window: steps over which those warnings are counted. Default 500.
        gradient_warnings_to_act: a gradient-norm spike warning that comes alone (no loss or other
            warning at that step) acts only when it is this many within ``window`` steps. Default 2:
            a lone spike the run absorbs by itself is reported, not acted on (two such in 20 healthy
            runs of ``benchmarks/lr_sweep.py --high``); 1 acts on the first. Critical gradient-norm
            spikes still skip the step.
        rollback_lr_cut: a rollback also makes a lasting LR cut of ``lr_cut_factor`` (the state it
            returns to blew up at this LR once; the cuts compound over rollbacks). Default True:
            without it the LR climbs back to where the run blew up and every rollback but the
            last is wasted (``benchmarks/lr_sweep.py --high``, README "Past lr 0.1"). A run that
            rolls back for a transient fault pays with the halved LR; set False where faults, not
            the LR, are the expected cause.
    """

    lr_factor: float = 0.5
    lr_hold: int = 100
    lr_recover: int = 100
    rewarm_start: float = 0.1
    rewarm_steps: int = 200
    skip_steps: bool = True
    rollback: bool = True
    snapshot_every_n_steps: int = 100
    snapshot_dir: str | None = None
    rollback_after: int = 2
    skip_batches: int = 20
    max_rollbacks: int = 3
    stop: bool = True
    cooldown: int = 20
    window: int = 100
    max_actions_per_window: int = 10
    grace_steps: int = 50
    qk_clip_tau: float | None = 80.0
    qk_clip_alpha: float = 0.5
    qk_clip_overrides: tuple[QKClipOverride, ...] = ()
    lr_cut_factor: float = 0.5
    lr_cut_after: int = 3
    lr_cut_window: int = 500
    rollback_lr_cut: bool = True
    gradient_warnings_to_act: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.lr_factor < 1:
            raise ValueError(f"`lr_factor` must be in (0, 1), got {self.lr_factor!r}")
        if not 0 < self.rewarm_start <= 1:
            raise ValueError(f"`rewarm_start` must be in (0, 1], got {self.rewarm_start!r}")
        for name in ("lr_recover", "rewarm_steps", "snapshot_every_n_steps", "rollback_after", "window",
                     "max_actions_per_window"):
            check_positive_int(name, getattr(self, name))
        for name in ("lr_hold", "skip_batches", "max_rollbacks", "cooldown", "grace_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
        for name in ("skip_steps", "rollback", "stop", "rollback_lr_cut"):
            check_bool(name, getattr(self, name))
        if self.snapshot_dir is not None and not isinstance(self.snapshot_dir, (str, Path)):
            raise ValueError(f"`snapshot_dir` must be a path or None, got {self.snapshot_dir!r}")
        check_positive_float("lr_factor", self.lr_factor)
        if self.qk_clip_tau is not None:
            check_positive_float("qk_clip_tau", self.qk_clip_tau)
        if not 0 < self.qk_clip_alpha <= 1:
            raise ValueError(f"`qk_clip_alpha` must be in (0, 1], got {self.qk_clip_alpha!r}")
        overrides = self.qk_clip_overrides
        if not isinstance(overrides, (tuple, list)) or not all(isinstance(o, QKClipOverride) for o in overrides):
            raise ValueError(f"`qk_clip_overrides` must be a tuple of stabmon.interventions.QKClipOverride, "
                             f"got {overrides!r}")
        object.__setattr__(self, "qk_clip_overrides", tuple(overrides))
        if not 0 < self.lr_cut_factor < 1:
            raise ValueError(f"`lr_cut_factor` must be in (0, 1), got {self.lr_cut_factor!r}")
        check_positive_int("lr_cut_after", self.lr_cut_after)
        check_positive_int("lr_cut_window", self.lr_cut_window)
        check_positive_int("gradient_warnings_to_act", self.gradient_warnings_to_act)
