"""Shared by the benchmarks: the example's model and data, timing, JSON and table output."""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"


def load_example(name: str = "train_gpt"):
    """The module ``examples/<name>.py``: ``train_gpt`` (model, data, Config) or ``hf_trainer``."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class StepTimer(pl.Callback):
    """Wall time of every training step (put it last in the callback list)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def machine() -> dict[str, str]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def spread(values: list[float]) -> str:
    """min .. max as a percentage of the min."""
    lo, hi = min(values), max(values)
    return f"+{100 * (hi - lo) / lo:.1f}%"


def write_json(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_options(argv: list[str], doc: str | None, values: tuple[str, ...] = (),
                  flags: tuple[str, ...] = ()) -> dict[str, str]:
    """``--name=value`` options (``values``) and bare ``--name`` switches (``flags``, given as
    ``"1"``) of a benchmark script. ``--help`` prints the script's docstring and exits; anything
    else is an error that names what is allowed (a long run never starts on a typo)."""
    if "--help" in argv or "-h" in argv:
        print((doc or "").strip())
        raise SystemExit(0)
    opts: dict[str, str] = {}
    for arg in argv:
        name, has_value, value = arg[2:].partition("=") if arg.startswith("--") else ("", False, "")
        if has_value and name in values:
            opts[name] = value
        elif not has_value and name in flags:
            opts[name] = "1"
        else:
            allowed = [f"--{n}=..." for n in values] + [f"--{n}" for n in flags] + ["--help"]
            raise SystemExit(f"unknown option {arg!r}; allowed: {', '.join(allowed)}")
    return opts


def median(values: list[float]) -> float:
    return statistics.median(values)
