"""stabmon without Lightning: the detectors and the policy watching a hand-written loop.

    python examples/plain_loop.py

A small MLP regression trained with SGD; at step 150 a corrupted batch (targets x 1000)
hits it, and at steps 300-301 the loss turns NaN. The monitor skips the bad step, rolls
back to the last healthy snapshot when the trouble repeats, and the run ends healthy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stabmon import DetectionConfig, InterventionConfig, MonitorCore


def main(steps: int = 400) -> MonitorCore:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    w_true = torch.randn(8, 1, generator=gen)
    core = MonitorCore(
        model,
        sample_every_n_steps=50,
        log_every_n_steps=50,
        detection=DetectionConfig(spike_warmup=30),
        intervention=InterventionConfig(snapshot_every_n_steps=50, skip_batches=5),
    )
    for step in range(steps):
        x = torch.randn(32, 8, generator=gen)
        y = x @ w_true
        if step == 150:
            y = y * 1000  # a corrupted batch
        core.start_step(step)
        loss = F.mse_loss(model(x), y)
        if step in (300, 301):
            loss = loss * float("nan")  # a numerical blow-up
        core.end_forward()
        core.observe_loss(loss)
        opt.zero_grad()
        loss.backward()
        core.before_optimizer_step(optimizer=opt)
        opt.step()
        core.after_optimizer_step()
        metrics = core.end_step()
        if metrics:
            print(f"step {step:4d} | loss {metrics.get('loss/mean', float('nan')):.4f}"
                  f" | grad norm max {metrics.get('gradients/norm_max', float('nan')):.3f}"
                  f" | LR factor {metrics['actions/lr_factor']:.2f}")
    print("\nfindings:")
    for f in core.findings:
        print(f"  step {f.step:4d} {f.severity:8s} {f.message}")
    print("actions:")
    for a in core.actions_taken:
        print(f"  step {a.step:4d} {a.name:9s} {a.detail}")
    print()
    print(core.summary.format())
    return core


if __name__ == "__main__":
    main()
