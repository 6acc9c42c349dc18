"""A torch.compile-d model: the monitor compiles no extra graph, never recompiles, and still
reports every signal (attention, logits, gradients, sharpness, QK-clip) from an eager probe."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from stabmon import InterventionConfig, MonitorCore, SharpnessConfig, StabilityMonitor
from stabmon.probes.compiled import canonical_name, eager_view, is_compiled
from tests.callbacks.test_qk_clip_fit import ClipLM
from tests.helpers import TinyLM, TinyTransformer, quiet_trainer, token_loader

SIGNALS = ("attention/entropy_min/layer_00", "attention/max_logit/layer_01", "logits/logz_mean", "gradients/norm",
           "gradients/norm/model_blocks_0", "params/norm", "update/ratio", "sharpness/top_eigenvalue")


def fit_counting_graphs(module, callbacks, steps=12):
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(max_steps=steps, callbacks=callbacks).fit(module, token_loader(n=400))
    limit_hits = [w for w in caught if "recompile" in str(w.message).lower()]
    return counters["stats"]["unique_graphs"], limit_hits


class CompiledInInit(TinyLM):
    def __init__(self, backend="aot_eager"):
        super().__init__(layers=2)
        self.model = torch.compile(self.model, backend=backend)


class CompiledInConfigureModel(TinyLM):
    def __init__(self):
        super().__init__(layers=2)
        self.model = None

    def configure_model(self):
        if self.model is None:
            self.model = torch.compile(TinyTransformer(layers=2), backend="aot_eager")


def monitor(**kwargs):
    return StabilityMonitor(sample_every_n_steps=3, sharpness_every_n_steps=5, verbose=False, **kwargs)


@pytest.mark.slow
def test_inductor_no_extra_graph_no_recompile_and_every_signal():
    pl.seed_everything(0)
    plain_graphs, _ = fit_counting_graphs(CompiledInInit("inductor"), [])
    mon = monitor()
    pl.seed_everything(0)
    graphs, limit_hits = fit_counting_graphs(CompiledInInit("inductor"), [mon])
    assert graphs == plain_graphs == 1 and not limit_hits
    assert all(key in mon.latest_metrics for key in SIGNALS), sorted(mon.latest_metrics)
    assert mon.core.compiled and not mon.core.guard.disabled


@pytest.mark.parametrize("how", ["submodule_in_init", "in_configure_model", "whole_lightning_module", "in_place"])
def test_every_way_of_compiling_is_recognised_and_probed_eagerly(how):
    pl.seed_everything(0)
    if how == "submodule_in_init":
        module = CompiledInInit()
    elif how == "in_configure_model":
        module = CompiledInConfigureModel()
    elif how == "whole_lightning_module":
        module = torch.compile(TinyLM(layers=2), backend="aot_eager")
    else:
        module = TinyLM(layers=2)
        module.model.compile(backend="aot_eager")
    mon = monitor()
    graphs, limit_hits = fit_counting_graphs(module, [mon])
    assert mon.core.compiled and not limit_hits
    assert graphs <= 2  # the training step (and the compiled forward for the whole LightningModule)
    assert all(key in mon.latest_metrics for key in SIGNALS), (how, sorted(mon.latest_metrics))
    assert not any("_orig_mod" in k for k in mon.latest_metrics)  # names as without compile


def test_sharpness_of_the_compiled_model_matches_the_eager_one():
    torch.manual_seed(0)
    eager = TinyTransformer(layers=2)
    compiled = torch.compile(TinyTransformer(layers=2), backend="aot_eager")
    compiled._orig_mod.load_state_dict(eager.state_dict())
    x, y = next(iter(token_loader(n=8, batch_size=8)))
    values = []
    for model in (eager, compiled):
        core = MonitorCore(model, sharpness=SharpnessConfig(every_n_steps=1, tol=1e-4, iters=30), strict=True,
                           detection=None, intervention=None)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        core.start_step(0)
        loss = F.cross_entropy(model(x).reshape(-1, 32), y.reshape(-1))
        core.end_forward()
        core.observe_loss(loss)
        loss.backward()
        core.before_optimizer_step(loss_fn=lambda: F.cross_entropy(model(x[:4]).reshape(-1, 32), y[:4].reshape(-1)),
                                   optimizer=opt)
        values.append(core.end_step()["sharpness/top_eigenvalue"])
    assert values[1] == pytest.approx(values[0], rel=0.05)


def test_qk_clip_measures_and_clips_a_compiled_model_without_recompiling():
    class CompiledClip(ClipLM):
        def __init__(self):
            super().__init__()
            self.model = torch.compile(self.model, backend="aot_eager")

    mon = StabilityMonitor(sample_every_n_steps=5, log_every_n_steps=5, sharpness_every_n_steps=None, verbose=False,
                           intervention=InterventionConfig(qk_clip_tau=4.0))
    graphs, limit_hits = fit_counting_graphs(CompiledClip(), [mon], steps=15)
    assert graphs == 1 and not limit_hits
    assert sorted(mon.core.responder.qk_clip.armed) == ["model.blocks.0", "model.blocks.1"]
    assert mon.core.run_summary.totals["actions/qk_clip_count"] > 5  # measured on every step's eager probe
    assert mon.latest_metrics["attention/max_logit"] < 4.0 * 1.5


def test_eager_view_swaps_and_restores():
    lin = torch.nn.Linear(2, 2)
    outer = torch.nn.Sequential(torch.compile(lin, backend="aot_eager"))
    assert is_compiled(outer) and not is_compiled(torch.nn.Sequential(lin))
    compiled = outer[0]
    with eager_view(outer) as root:
        assert root[0] is lin
    assert outer[0] is compiled
    assert canonical_name("0._orig_mod.weight") == "0.weight"
