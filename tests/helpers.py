"""Tiny models for the tests: a causal Transformer that calls SDPA and cross_entropy."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType, SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

try:  # the tests of `lightning.pytorch` alone run these helpers without `pytorch_lightning`
    import pytorch_lightning as pl
except ImportError:
    pl = None


class TinyAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.head_dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16, heads: int = 4, layers: int = 2, kv_heads: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(dim), "attn": TinyAttention(dim, heads, kv_heads)}) for _ in range(layers)
        )
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = x + block["attn"](block["ln"](x))
        return self.head(x)


def _lightning_modules(base: type) -> tuple[type, type]:
    """TinyLM and TinyMLP on the ``LightningModule`` of one Lightning namespace."""

    class TinyLM(base):
        """Next-token prediction on random tokens with SGD (deterministic on CPU)."""

        def __init__(self, lr: float = 0.1, use_cross_entropy: bool = True, **model_kwargs) -> None:
            super().__init__()
            self.model = TinyTransformer(**model_kwargs)
            self.lr = lr
            self.use_cross_entropy = use_cross_entropy

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.model(x)
            if self.use_cross_entropy:
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            return (logits.logsumexp(-1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    class TinyMLP(base):
        """No attention, no cross-entropy: a regression MLP."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Faulty(TinyLM):
        """Multiplies the loss at given steps (NaN or a large factor)."""

        def __init__(self, faults, **kwargs):
            super().__init__(**kwargs)
            self.faults = faults

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * self.faults[self.global_step] if self.global_step in self.faults else loss

    return TinyLM, TinyMLP, Faulty


TinyLM, TinyMLP, Faulty = _lightning_modules(pl.LightningModule) if pl is not None else (None, None, None)


@functools.cache
def lightning(namespace: str) -> SimpleNamespace:
    """The test models and trainer of ``"pytorch_lightning"`` or ``"lightning.pytorch"``."""
    ns: ModuleType = importlib.import_module(namespace)
    lm, mlp, faulty = (TinyLM, TinyMLP, Faulty) if ns is pl else _lightning_modules(ns.LightningModule)
    return SimpleNamespace(ns=ns, TinyLM=lm, TinyMLP=mlp, Faulty=faulty,
                           quiet_trainer=functools.partial(quiet_trainer, trainer_class=ns.Trainer))


def token_loader(n: int = 64, seq: int = 12, vocab: int = 32, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (n, seq + 1), generator=gen)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size)


def regression_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return DataLoader(TensorDataset(x, x.sum(-1, keepdim=True)), batch_size=batch_size)


def quiet_trainer(trainer_class: type | None = None, **kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, logger=False, log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return (trainer_class or pl.Trainer)(**defaults)


def monitored_step(core, step: int, loss_of_batch, optimizer: torch.optim.Optimizer, held_loss=None,
                   before_forward=None):
    """One step of a plain loop under ``core`` (the protocol of ``stabmon.MonitorCore``):
    ``loss_of_batch()`` runs the forward; ``before_forward()`` runs just before it (e.g.
    ``core.observe_batch``); returns the step's emission (None on most steps)."""
    core.start_step(step)
    if before_forward is not None:
        before_forward()
    loss = loss_of_batch()
    core.end_forward()
    core.observe_loss(loss)
    loss.backward()
    core.before_optimizer_step(loss_fn=held_loss, optimizer=optimizer)
    optimizer.step()
    core.after_optimizer_step()
    metrics = core.end_step()
    optimizer.zero_grad()
    return metrics
