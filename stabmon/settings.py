"""The monitor's options, with their defaults written once and checked at construction.

``MonitorOptions`` is what ``MonitorCore`` takes; ``MonitorSettings`` adds what the trainer
adapters (``StabilityMonitor``, ``StabilityMonitorCallback``) take on top of it (alerts, the
dashboard, the log key prefix). A wrong value fails here with a message that names the
argument, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from stabmon._validation import check_bool, check_optional_instance, check_positive_int
from stabmon.alerts import AlertChannel
from stabmon.detectors import DetectionConfig
from stabmon.forensics.config import ForensicsConfig
from stabmon.forensics.skiplist import SkipList
from stabmon.interventions.config import InterventionConfig
from stabmon.interventions.grad_clip import check_clip_grad_norm
from stabmon.memory import MemoryBudget
from stabmon.probes.sharpness import SharpnessConfig

__all__ = ["MonitorOptions", "MonitorSettings", "build_options"]

O = TypeVar("O", bound="MonitorOptions")


@dataclass(frozen=True)
class MonitorOptions:
    """What the monitor measures, how often, and what it does about it.

    Args:
        sample_every_n_steps: steps between sampled forwards (attention and logit probes,
            parameter norms and update-to-weight ratio). Step 0 is sampled, and so are the
            powers of two below the first period (1, 2, 4, ...), to catch an early blow-up.
            Default 50.
        log_every_n_steps: steps between emissions of the per-step statistics (loss and
            gradient norms, summarised over the interval); sampled steps always emit. None:
            50 for ``MonitorCore``, the trainer's own cadence for the trainer adapters.
        attention: capture ``scaled_dot_product_attention`` calls. Default True.
        logits: capture the logits given to ``cross_entropy``. Default True.
        gradients: gradient, parameter and update norms. Default True.
        per_layer: per-layer norms besides the global ones. Default True.
        sharpness: the sharpness probe (``SharpnessConfig``), or None (default) for none.
        detection: thresholds of the detectors, or None for no detection. Default ``DetectionConfig()``.
        intervention: the escalation ladder, or None for no intervention. Default ``InterventionConfig()``.
        observe_only: measure, detect and alert, but never act. Default False.
        strict: re-raise errors inside the monitor instead of switching the failing stage off.
            Default None: the ``STABMON_STRICT`` environment variable, else False.
        compiled_probe_rows: on a ``torch.compile``-d model, the rows of the current batch the
            eager probe forward sees. Default 4.
        clip_grad_norm: clip the gradients to this global L2 norm, as ``clip_grad_norm_`` does
            (bit-identical for float32 gradients), from the norms the monitor reads anyway:
            one pass over the gradients instead of two. Default None (no clipping).
        forensics: on a loss or gradient-norm spike or a non-finite step, find the rows that carry
            it, replay the step (reproducible or not), name the module where a NaN starts, and
            write the record (``stabmon.forensics.ForensicsConfig``); None turns them off. Default
            ``ForensicsConfig()``. They need the batch: the trainer adapters hold it; a plain loop
            passes it to ``MonitorCore.observe_batch``.
        skip_list: a skip list to start from (``stabmon-skip.json`` of an earlier run, or Lightning's
            ``skip_batches.json``): the optimizer step of any batch holding a listed row is skipped.
            Default None.
        run_dir: where the forensic records (``stabmon-forensics/``) and the skip list
            (``stabmon-skip.json``) are written; None keeps them in memory (the trainer adapters
            set it to the trainer's log or output directory). Default None.
        memory_budget: what the probes may hold on the device (``stabmon.MemoryBudget``: a fraction
            of the memory free at the first estimate, at most a cap; default 10%, at most 8 GiB).
            Past it the sharpness probe keeps fewer Lanczos vectors, uses finite differences, or
            holds fewer rows and tokens, and says so once (``stabmon.memory_plan``).

    Example:
        >>> MonitorOptions(sample_every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: `sample_every_n_steps` must be a positive int, got 0
    """

    sample_every_n_steps: int = 50
    log_every_n_steps: int | None = None
    attention: bool = True
    logits: bool = True
    gradients: bool = True
    per_layer: bool = True
    sharpness: SharpnessConfig | None = None
    detection: DetectionConfig | None = DetectionConfig()
    intervention: InterventionConfig | None = InterventionConfig()
    observe_only: bool = False
    strict: bool | None = None
    compiled_probe_rows: int = 4
    clip_grad_norm: float | None = None
    forensics: ForensicsConfig | None = ForensicsConfig()
    skip_list: str | Path | None = None
    run_dir: str | Path | None = None
    memory_budget: MemoryBudget = MemoryBudget()

    def __post_init__(self) -> None:
        check_positive_int("sample_every_n_steps", self.sample_every_n_steps)
        check_positive_int("log_every_n_steps", self.log_every_n_steps, allow_none=True)
        check_positive_int("compiled_probe_rows", self.compiled_probe_rows)
        for name in ("attention", "logits", "gradients", "per_layer", "observe_only"):
            check_bool(name, getattr(self, name))
        check_optional_instance("sharpness", self.sharpness, SharpnessConfig)
        check_optional_instance("detection", self.detection, DetectionConfig)
        check_optional_instance("intervention", self.intervention, InterventionConfig)
        check_clip_grad_norm(self.clip_grad_norm, self.gradients)
        check_optional_instance("forensics", self.forensics, ForensicsConfig)
        if self.skip_list is not None:
            SkipList.read(self.skip_list)  # a missing or unreadable file fails here, naming it
        if self.run_dir is not None and not isinstance(self.run_dir, (str, Path)):
            raise ValueError(f"`run_dir` must be a path or None, got {self.run_dir!r}")
        check_optional_instance("memory_budget", self.memory_budget, MemoryBudget)
        if self.memory_budget is None:
            raise ValueError("`memory_budget` must be a stabmon.MemoryBudget, got None")
        if self.strict is None:
            object.__setattr__(self, "strict", os.environ.get("STABMON_STRICT", "") not in ("", "0"))
        check_bool("strict", self.strict)


@dataclass(frozen=True)
class MonitorSettings(MonitorOptions):
    """The trainer adapters' arguments: ``MonitorOptions`` and these (documented on
    ``StabilityMonitor``). Two options read differently here: ``log_every_n_steps`` None is the
    trainer's cadence, and ``sharpness`` holds the probe's other settings (None: the defaults),
    while ``sharpness_every_n_steps`` turns it on or off.

    Example:
        >>> MonitorSettings(sample_every_n_steps=10).core_options(50).sharpness.every_n_steps
        2000
    """

    sharpness_every_n_steps: int | None = 2000
    alerts: Sequence[AlertChannel] = ()
    wandb_heatmap_every_n_steps: int = 500
    log_key_prefix: str = "stabmon"
    verbose: bool = True
    event_log: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("sharpness_every_n_steps", self.sharpness_every_n_steps, allow_none=True)
        check_positive_int("wandb_heatmap_every_n_steps", self.wandb_heatmap_every_n_steps)
        check_bool("verbose", self.verbose)
        check_bool("event_log", self.event_log)
        alerts = list(self.alerts)
        bad = [a for a in alerts if not isinstance(a, AlertChannel)]
        if bad:
            raise ValueError(f"`alerts` must hold stabmon.alerts channels (LogAlert, WandbAlert, WebhookAlert), "
                             f"got {type(bad[0]).__name__}")
        if not isinstance(self.log_key_prefix, str):
            raise ValueError(f"`log_key_prefix` must be a str, got {self.log_key_prefix!r}")
        object.__setattr__(self, "alerts", tuple(alerts))
        object.__setattr__(self, "log_key_prefix", self.log_key_prefix.rstrip("/"))

    def core_options(self, default_log_every_n_steps: int, run_dir: str | Path | None = None) -> MonitorOptions:
        """The options of the run's ``MonitorCore``; ``log_every_n_steps`` defaults to the trainer's,
        ``run_dir`` to the trainer's directory."""
        sharpness = None
        if self.sharpness_every_n_steps is not None:
            sharpness = replace(self.sharpness or SharpnessConfig(), every_n_steps=self.sharpness_every_n_steps)
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(MonitorOptions)}
        return MonitorOptions(**{**shared, "sharpness": sharpness, "run_dir": self.run_dir or run_dir,
                                 "log_every_n_steps": self.log_every_n_steps or max(1, default_log_every_n_steps)})


def build_options(cls: type[O], owner: str, options: dict[str, Any], refused: dict[str, str] | None = None) -> O:
    """``cls(**options)``, with an error that names an unknown argument and the allowed ones;
    ``refused`` maps the fields this owner does not take to what to use instead.

    Example:
        >>> build_options(MonitorOptions, "MonitorCore", {"sample_every": 3})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: MonitorCore got an unexpected keyword argument 'sample_every'; allowed: sample_every_n_steps, ...
    """
    refused = refused or {}
    for name in options:
        if name in refused:
            raise TypeError(f"{owner} does not take `{name}`: {refused[name]}")
    allowed = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in refused]
    unknown = [name for name in options if name not in allowed]
    if unknown:
        raise TypeError(f"{owner} got an unexpected keyword argument {unknown[0]!r}; allowed: {', '.join(allowed)}")
    return cls(**options)
