import math

import pytest

from stabmon.detectors import DetectionConfig, NonFiniteDetector, SpikeDetector, ThresholdDetector, TrendDetector


def feed(det, values, signal="x", start=0):
    out = []
    for i, v in enumerate(values):
        out += det.update(start + i, {signal: v})
    return out


def noisy(n, seed=0, level=2.0, noise=0.05):
    import random

    rng = random.Random(seed)  # tests may use their own seeded generator
    return [level + rng.gauss(0, noise) for _ in range(n)]


def test_spike_detector_arms_after_warmup_and_grades_severity():
    det = SpikeDetector("x", warmup=20, z_warning=6, z_critical=12)
    assert feed(det, [2.0, 100.0]) == []  # not armed yet: the 100 only enters the history
    det = SpikeDetector("x", warmup=20)
    assert feed(det, noisy(30)) == []
    warn = det.update(30, {"x": 2.0 + 8 * 1.4826 * 0.034})  # ~8 robust std for a MAD of ~0.034
    assert [f.severity for f in warn] in (["warning"], ["critical"])
    crit = det.update(31, {"x": 50.0})
    assert crit[0].severity == "critical" and crit[0].signal == "x" and crit[0].value == 50.0
    assert "spike" in crit[0].message and crit[0].threshold < 50.0


def test_spike_detector_has_no_false_alarm_on_a_noisy_decreasing_loss():
    det = SpikeDetector("x", warmup=20)
    values = [3.0 * math.exp(-i / 300) + v - 2.0 for i, v in enumerate(noisy(1000, seed=1, noise=0.05))]
    assert feed(det, values) == []


def test_nonfinite_never_enters_spike_state():
    det = SpikeDetector("x", warmup=3)
    feed(det, [1.0, float("nan"), 1.0, float("inf"), 1.0])
    assert det.state_dict()["history"] == [1.0, 1.0, 1.0]
    assert NonFiniteDetector().update(2, {"gradients/norm": float("inf")})[0].signal == "gradients/norm"
    assert NonFiniteDetector().update(2, {"logits/nonfinite": 3.0})[0].severity == "critical"
    assert NonFiniteDetector().update(2, {"loss/last": 1.0, "logits/nonfinite": 0.0}) == []


def test_spike_is_kept_out_of_the_baseline_and_quiet_period():
    det = SpikeDetector("x", warmup=5)
    feed(det, [1.0, 1.01, 0.99, 1.0, 1.02])
    assert det.update(5, {"x": 10.0}) and det.update(6, {"x": 10.0})  # the first spike did not become normal
    det.quiet_until(10)
    assert det.update(7, {"x": 10.0}) == [] and len(det.state_dict()["history"]) == 5  # quiet: no alarm, no learning


def test_threshold_hysteresis_fires_again_only_when_worse_or_after_recovery():
    det = ThresholdDetector("m", ceiling=100.0)
    fired = [bool(det.update(i, {"m": v})) for i, v in enumerate([150.0, 160.0, 200.0, 230.0, 50.0, 120.0])]
    assert fired == [True, False, False, True, False, True]


def test_threshold_detector_prefers_per_layer_keys():
    det = ThresholdDetector("attention/entropy_min", floor=0.1)
    found = det.update(5, {"attention/entropy_min": 0.05, "attention/entropy_min/layer_00": 0.05,
                           "attention/entropy_min/layer_01": 2.0})
    assert [f.signal for f in found] == ["attention/entropy_min/layer_00"]
    assert "below 0.1" in found[0].message


def test_trend_detector_up_and_down():
    up = TrendDetector("m", factor=3.0, lookback=3, active_above=20.0)
    assert feed(up, [1.0, 2.0, 3.0, 60.0], "m") == []  # 60x growth, but from below the activity bound
    up = TrendDetector("m", factor=3.0, lookback=3, active_above=20.0)
    found = feed(up, [20.0, 30.0, 45.0, 61.0, 70.0, 80.0], "m")
    assert [f.step for f in found] == [3] and "3.0x" in found[0].message  # then needs 3 new samples
    down = TrendDetector("e", factor=2.0, lookback=2, direction="down", active_below=1.0)
    assert feed(down, [3.0, 2.0, 1.4, 0.9], "e") == []  # falls from above 1 nat do not count
    down = TrendDetector("e", factor=2.0, lookback=2, direction="down", active_below=1.0)
    found = feed(down, [0.9, 0.6, 0.4], "e")
    assert len(found) == 1 and "fell" in found[0].message


def test_default_detectors_state_round_trip():
    a = DetectionConfig(spike_warmup=5).build()
    for step in range(10):
        a.on_step(step, {"loss/last": 2.0 + 0.01 * step, "gradients/norm": 1.0})
        a.on_sample(step, {"attention/max_logit/layer_00": 5.0 + step})
    b = DetectionConfig(spike_warmup=5).build()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert a.on_step(10, {"loss/last": 50.0}) == b.on_step(10, {"loss/last": 50.0}) != []


@pytest.mark.parametrize(
    "kwargs,match",
    [({"spike_z_warning": 0}, "`spike_z_warning` must be a positive finite number, got 0"),
     ({"spike_z_warning": 10, "spike_z_critical": 5}, "`spike_z_critical`"),
     ({"spike_warmup": 500}, "`spike_warmup`"), ({"trend_lookback": 0}, "`trend_lookback`")],
)
def test_config_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DetectionConfig(**kwargs)
    with pytest.raises(ValueError, match="`direction` must be one of"):
        TrendDetector("x", direction="sideways")
    with pytest.raises(ValueError, match="needs a `ceiling` or a `floor`"):
        ThresholdDetector("x")
