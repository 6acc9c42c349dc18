"""Test set-up for the suite and the doctests (this file sits at the root so both see it)."""

import os

# Before any stabmon / triton import: bugs in the monitor must raise in tests.
os.environ.setdefault("STABMON_STRICT", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels run on the CPU interpreter (the flag is read when a kernel
# is decorated, so it is set before the kernel modules are imported). With one, the kernels
# compile for it: the `gpu` tests then run the compiled kernels and the interpreter tests skip.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Deterministic CPU results (bit-identical comparisons) and no oversubscription on 2 cores.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
