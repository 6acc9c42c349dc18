"""A plain training loop that learns to copy its input tokens (its loss falls to a few
thousandths, so one poisoned row makes a clear spike), for the forensics tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stabmon import DetectionConfig, InterventionConfig, MonitorCore
from tests.helpers import TinyTransformer, monitored_step

POISON_STEP, POISON_ROW, ROWS = 250, 5, 8
DETECTION = DetectionConfig(spike_warmup=30, spike_z_critical=7)


def batches(steps: int, poison_step: int | None = POISON_STEP, seed: int = 0):
    """``steps`` batches of the copy task; at ``poison_step`` row ``POISON_ROW`` is one byte repeated
    with shuffled targets."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randint(32, (ROWS, 12), generator=gen)
        y = x.clone()
        if step == poison_step:
            x[POISON_ROW] = 7
            y[POISON_ROW] = torch.randperm(32, generator=gen)[:12]
        yield step, (x, y)


def make(run_dir=None, dropout: float = 0.0, **core_kwargs):
    torch.manual_seed(0)
    model = TinyTransformer()
    if dropout:
        model.drop = torch.nn.Dropout(dropout)
        forward = model.forward
        model.forward = lambda idx: model.drop(forward(idx))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    kwargs = dict(sample_every_n_steps=50, log_every_n_steps=50, strict=True, run_dir=run_dir, detection=DETECTION,
                  intervention=InterventionConfig(qk_clip_tau=None))
    kwargs.update(core_kwargs)
    return model, opt, MonitorCore(model, **kwargs)


def loss_of(model):
    return lambda b: F.cross_entropy(model(b[0]).reshape(-1, 32), b[1].reshape(-1))


def train(model, opt, core, stream, hooks=None):
    """Run the loop over ``stream``; ``hooks(step)`` runs at each step's start (to inject faults)."""
    for step, batch in stream:
        if hooks is not None:
            hooks(step)
        monitored_step(core, step, lambda: loss_of(model)(batch), opt,
                       before_forward=lambda: core.observe_batch(batch, loss_of(model), epoch=0, batch_index=step))
