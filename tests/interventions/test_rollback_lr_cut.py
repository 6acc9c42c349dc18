"""A real run past lr 0.1 that blows up, turned around by the rollback's lasting LR cut.

The example GPT in the set-up of issue 24, shortened (2 layers, context 64, qk-layernorm, warmup
to a constant lr 1.0, no clipping): observing, the run blows up and ends above its initial
loss; acting with the default ladder (a rollback also halves the LR for good) it ends healthy;
the ladder without that cut lets the LR climb back and does not (measured: 82.3 observing,
3.03 acting, 133.8 without the cut; initial loss 5.55)."""

import math

import pytest
import pytorch_lightning as pl
import torch

from stabmon import InterventionConfig, StabilityMonitor
from tests.examples.test_train_gpt import load_example

STEPS, WARMUP = 320, 120


class _Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.values.append(float(outputs["loss"]))


def _run(tmp_path, observe_only: bool, intervention: InterventionConfig | None = None) -> tuple[list[float], list]:
    example = load_example()
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_bytes(example.load_text("")[:400_000])
    cfg = example.Config(data=str(text), lr=1.0, max_steps=STEPS, warmup_steps=WARMUP, schedule="constant",
                         n_layer=2, block_size=64, qk_layernorm=True, grad_clip=0.0, seed=1337)
    pl.seed_everything(cfg.seed, verbose=False)
    train_loader, _ = example.make_data(cfg)
    monitor = StabilityMonitor(sample_every_n_steps=25, log_every_n_steps=25, sharpness_every_n_steps=None,
                               observe_only=observe_only, verbose=False, forensics=None,
                               intervention=intervention or InterventionConfig())
    losses = _Losses()
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, callbacks=[monitor, losses], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(example.GPTModule(cfg), train_loader)
    return losses.values, [(a.step, a.name) for a in monitor.actions_taken]


def _final(losses: list[float]) -> float:
    tail = losses[-20:]
    return sum(tail) / len(tail) if len(tail) == 20 and all(math.isfinite(x) for x in tail) else math.inf


@pytest.mark.slow
def test_the_rollback_lr_cut_turns_a_diverging_run_around(tmp_path):
    torch.set_num_threads(1)  # the same numbers on any machine's thread count
    observed, _ = _run(tmp_path, observe_only=True)
    initial = observed[0]
    assert _final(observed) > initial, "the observed run was meant to diverge"
    acted, actions = _run(tmp_path, observe_only=False)
    names = [name for _, name in actions]
    assert "rollback" in names and names[names.index("rollback") + 1] == "lr_cut", actions
    assert _final(acted) < initial - 1.0, (_final(acted), actions)
    uncut, uncut_actions = _run(tmp_path, observe_only=False, intervention=InterventionConfig(rollback_lr_cut=False))
    assert "rollback" in [name for _, name in uncut_actions] and _final(uncut) > initial, uncut_actions
