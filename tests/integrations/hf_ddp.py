"""Run by test_transformers.py under torchrun: a 2-process CPU (gloo) DDP training with the
Hugging Face Trainer and a loss spike on rank 1 only. Each rank writes what its monitor did."""

import hashlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from stabmon.integrations.transformers import StabilityMonitorCallback  # noqa: E402
from tests.integrations.test_transformers import FAST, SpikyLlama, StepCounter, dataset, tiny_llama  # noqa: E402


def main(out_dir: str) -> None:
    import transformers

    rank = int(os.environ.get("RANK", 0))
    model = tiny_llama({12: 1000.0} if rank == 1 else {})
    monitor = StabilityMonitorCallback(**FAST)
    args = transformers.TrainingArguments(os.path.join(out_dir, "out"), per_device_train_batch_size=4, max_steps=16,
                                          logging_steps=5, report_to=[], save_strategy="no", learning_rate=1e-3,
                                          use_cpu=True, disable_tqdm=True, seed=0, ddp_backend="gloo",
                                          dataloader_num_workers=0, remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[monitor, StepCounter()])
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    record = {"actions": [[a.step, a.name] for a in monitor.actions_taken],
              "weights": hashlib.sha256(weights.numpy().tobytes()).hexdigest(), "step": SpikyLlama.step}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    if torch.distributed.is_initialized():  # tear down together, as examples/plain_loop.py does
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
