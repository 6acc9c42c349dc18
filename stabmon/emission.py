"""The emission: every stage's signals of an interval in one reduction, read to the host once.

``Emission.emit`` builds the interval's ``SignalSet`` (each stage's signals added under its own
fail-soft stage: one that fails half-way adds nothing), reduces it over ranks (where the ranks
may hold different signals after a fault, through ``AgreedEmission``), starts the next interval
in every stage, and lets QK-clip arm the layers whose max logit passed tau at a sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stabmon._failsoft import FailSoft
from stabmon.interventions.responder import Responder
from stabmon.probes.forward import ForwardProbes
from stabmon.probes.step import StepReader
from stabmon.signals import AgreedEmission, AllReduce, SignalSet, active_all_reduce

__all__ = ["Emission"]


class Emission:
    """Emits the signals of ``probes``, ``reader`` and the responder's QK-clip.

    Args:
        probes, reader, responder: the stages whose signals are emitted.
        guard: the monitor's fail-soft guard.
        all_reduce: the reduction over ranks.
        per_layer: per-layer norms besides the global ones.
    """

    def __init__(self, probes: ForwardProbes, reader: StepReader, responder: Responder, *, guard: FailSoft,
                 all_reduce: AllReduce | None, per_layer: bool = True) -> None:
        self.probes, self.reader, self.responder = probes, reader, responder
        self.guard, self._all_reduce, self.per_layer = guard, all_reduce, per_layer
        self._agreement = AgreedEmission()

    def emit(self, step: int, arm: bool = True) -> dict[str, float]:
        """One reduction of every stage's signals; QK-clip arms the layers past tau at a sample."""
        all_reduce = active_all_reduce(self._all_reduce)
        if all_reduce is not None and self.guard.synced:  # the ranks may hold different signals: agree first
            metrics = self._agreement.reduce(self.signals, all_reduce, self.guard, step)
        else:
            metrics = self.guard.run("signals", self.signals().reduce, all_reduce) or {}
        probes, qk_clip = self.probes, self.responder.qk_clip
        maxima = probes.layer_maxima(metrics) if arm and probes.sampled else None
        probes.after_emission()
        self.reader.reset_interval()
        if qk_clip is not None:
            qk_clip.reset_interval()
        if maxima:
            self.responder.arm_above_tau(step, maxima)
        return metrics

    def signals(self) -> SignalSet:
        """The interval's signals of every stage, not yet reduced."""
        out = SignalSet()

        def add(stage: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
            mark = out.mark()
            if not self.guard.attempt(stage, fn, *args, **kwargs):
                out.truncate(mark)  # a stage that fails half-way adds nothing

        probes, qk_clip = self.probes, self.responder.qk_clip
        if probes.sampled or probes.has_sharpness_values:
            probes.signals(out, add)
        add("step signals", self.reader.signals, out, sampled=probes.sampled, per_layer=self.per_layer)
        if qk_clip is not None and qk_clip.armed and "qk-clip" not in self.guard.disabled:
            add("qk-clip", qk_clip.signals, out)
        return out
