"""The monitor is a first-class callback of `pytorch_lightning` and of `lightning.pytorch`,
with either package alone or both; its loggers and rank-zero checks follow the Trainer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stabmon import StabilityMonitor
from tests.helpers import lightning, token_loader

ROOT = Path(__file__).resolve().parents[2]
NAMESPACES = ["pytorch_lightning", "lightning.pytorch"]


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_is_a_callback_of_each_namespace_and_fits_there(namespace, tmp_path):
    lit = lightning(pytest.importorskip(namespace).__name__)
    monitor = StabilityMonitor(sample_every_n_steps=2, sharpness_every_n_steps=None, verbose=False)
    assert isinstance(monitor, lit.ns.Callback)
    logger = lit.ns.loggers.CSVLogger(tmp_path)
    trainer = lit.quiet_trainer(max_steps=4, callbacks=[monitor], logger=logger)
    trainer.fit(lit.TinyLM(), token_loader())
    assert "stabmon-attention/entropy_min" in trainer.callback_metrics
    header = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "stabmon-attention/max_logit/layer_00" in header


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_tensorboard_draws_each_per_layer_signal_as_one_chart(namespace, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lit = lightning(pytest.importorskip(namespace).__name__)
    logger = lit.ns.loggers.TensorBoardLogger(tmp_path, name="run")
    monitor = StabilityMonitor(sample_every_n_steps=3, log_every_n_steps=4, sharpness_every_n_steps=None,
                               verbose=False)
    lit.quiet_trainer(max_steps=8, callbacks=[monitor], logger=logger).fit(lit.TinyLM(layers=2), token_loader())
    tags: dict[str, set[str]] = {}
    for root, _, files in os.walk(logger.log_dir):
        if any(f.startswith("events") for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                tags.setdefault(tag, set()).add(os.path.relpath(root, logger.log_dir))
    # the flat scalars in the run itself, one section per family
    assert {"stabmon-attention/entropy_min", "stabmon-gradients/norm", "stabmon-loss/mean"} <= {
        t for t, runs in tags.items() if "." in runs}
    assert not any(t.endswith("layer_00") for t in tags)
    # one tag, several lines: add_scalars writes a sub-run per layer under the same tag
    assert len(tags["stabmon-attention/max_logit/by_layer"]) == 2
    assert len(tags["stabmon-gradients/norm/by_layer"]) >= 3


def _run_with_only(namespace: str, blocked: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """A fit in a fresh interpreter in which ``blocked`` cannot be imported."""
    code = f"""
import sys
sys.modules[{blocked!r}] = None  # `import {blocked}` now raises ImportError
sys.path.insert(0, {str(ROOT)!r})
from stabmon import StabilityMonitor
from stabmon.callbacks import _lightning
from tests.helpers import lightning, token_loader
assert [ns.__name__ for ns in _lightning.NAMESPACES] == [{namespace!r}], _lightning.NAMESPACES
lit = lightning({namespace!r})
monitor = StabilityMonitor(sample_every_n_steps=2, sharpness_every_n_steps=None, verbose=True)
assert isinstance(monitor, lit.ns.Callback)
trainer = lit.quiet_trainer(max_steps=3, callbacks=[monitor], logger=lit.ns.loggers.CSVLogger({str(tmp_path)!r}))
trainer.fit(lit.TinyLM(), token_loader())
print("ok", sorted(k for k in trainer.callback_metrics if k.startswith("stabmon-loss")))
"""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("namespace,blocked", [("pytorch_lightning", "lightning"),
                                               ("lightning.pytorch", "pytorch_lightning")])
def test_works_with_either_package_alone(namespace, blocked, tmp_path):
    pytest.importorskip(namespace)
    proc = _run_with_only(namespace, blocked, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok ['stabmon-loss/last', 'stabmon-loss/max', 'stabmon-loss/mean', 'stabmon-loss/nonfinite_steps']" \
        in proc.stdout
    assert "stabmon summary" in proc.stdout  # the rank-zero summary of that namespace's Trainer
