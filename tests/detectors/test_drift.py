"""The slow-divergence detector: a loss whose trailing median stays above its best."""

import math
import random

import torch

from stabmon import DetectionConfig, MonitorCore
from stabmon.detectors import DriftDetector
from tests.helpers import monitored_step


def losses_then_drift(n_down=200, n_up=150, rise=0.004, seed=0):
    """A noisy loss that falls to about 2.5, then creeps up by ``rise`` nats a step."""
    rng = random.Random(seed)
    out = [2.5 + 2.0 * math.exp(-s / 40) + rng.gauss(0, 0.05) for s in range(n_down)]
    out += [out[-1] + rise * (s + 1) + rng.gauss(0, 0.05) for s in range(n_up)]
    return out


def run(det, losses, lrs=None):
    found = []
    for step, x in enumerate(losses):
        values = {"loss/last": x}
        if lrs is not None:
            values["optimizer/lr"] = lrs[step]
        found += det.update(step, values)
    return found


def test_a_slow_rise_is_found_once_and_a_noisy_plateau_is_not():
    losses = losses_then_drift()
    (finding,) = run(DriftDetector(), losses)
    assert finding.detector == "loss_drift" and finding.severity == "warning" and 200 < finding.step < 350
    assert "drifts up" in finding.message
    noisy_plateau = [2.5 + 2.0 * math.exp(-s / 40) + random.Random(s).gauss(0, 0.1) for s in range(2000)]
    assert run(DriftDetector(), noisy_plateau) == []


def test_a_rise_after_the_schedule_raised_the_lr_is_no_finding():
    losses = losses_then_drift()
    lrs = [1e-3] * 200 + [1e-3 * (1 + 0.01 * s) for s in range(150)]  # a re-warm on purpose: the LR climbs
    assert run(DriftDetector(), losses, lrs) == []
    flat = [1e-3] * len(losses)
    assert len(run(DriftDetector(), losses, flat)) == 1


def test_the_monitors_own_quiet_window_restarts_the_stretch():
    det = DriftDetector()
    losses = losses_then_drift()
    det.quiet_until(330)  # as after a re-warm or rollback the monitor took itself
    assert all(f.step > 330 for f in run(det, losses))


def test_it_rides_in_the_default_detectors_and_survives_a_state_round_trip():
    names = [d.name for d in DetectionConfig().build().per_step]
    assert "loss_drift" in names and "loss_drift" not in [d.name for d in
                                                          DetectionConfig(loss_drift_window=None).build().per_step]
    first, second = DetectionConfig().build(), DetectionConfig().build()
    for step, x in enumerate(losses_then_drift()[:260]):
        first.on_step(step, {"loss/last": x})
    second.load_state_dict(first.state_dict())
    rest = losses_then_drift()[260:]
    a = [f.step for s, x in enumerate(rest, 260) for f in first.on_step(s, {"loss/last": x})]
    b = [f.step for s, x in enumerate(rest, 260) for f in second.on_step(s, {"loss/last": x})]
    assert a == b and a
    # a state saved without the drift detector loads into a set with it (and the other way round)
    old = DetectionConfig(loss_drift_window=None).build()
    DetectionConfig().build().load_state_dict(old.state_dict())
    old.load_state_dict(first.state_dict())


def test_the_monitor_reads_the_schedules_lr_for_it():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    core = MonitorCore(model, sample_every_n_steps=1000, log_every_n_steps=1000)
    x = torch.randn(8, 4)
    for step in range(3):
        opt.param_groups[0]["lr"] = 0.01 * (step + 1)
        monitored_step(core, step, lambda: model(x).pow(2).mean(), opt)
    drift = next(d for d in core.detectors.per_step if d.name == "loss_drift")
    assert drift._lr == 0.03
