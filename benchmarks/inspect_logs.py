"""``stabmon inspect`` on long logs: time and peak memory against the log's length.

    python benchmarks/inspect_logs.py                   # 100k and 1M steps, CSV and TensorBoard
    python benchmarks/inspect_logs.py --steps=100000,300000 --formats=csv

(Not ``inspect.py``: a script of that name in this folder would stand in for the standard
library's ``inspect`` module in every other benchmark run from here.)

Writes a synthetic run of N steps (a loss and a gradient norm every step, with a spike every
50k steps and a slow drift over the last 5%) as Lightning's ``metrics.csv`` and as a TensorBoard
event file (``SummaryWriter.add_scalar``), then runs ``stabmon inspect --html`` on each in a fresh
process and reads its wall time and peak resident memory (``VmHWM``). The reader streams the
log in bounded chunks and the report's curves are decimated as they come, so the memory of an
inspection should not grow with the length of the log. Writes ``benchmarks/out/inspect.json``.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, markdown_table, parse_options, write_json


def synthetic(steps: int) -> list[tuple[float, float]]:
    """(loss, gradient norm) per step: a decaying loss with noise, a spike every 50k steps, a drift at the end."""
    rng = random.Random(0)
    out = []
    for s in range(steps):
        loss = 2.0 + 3.0 * math.exp(-s / (steps / 20)) + 0.02 * rng.gauss(0, 1)
        if s > 0.95 * steps:
            loss += 0.5 * (s - 0.95 * steps) / (0.05 * steps)
        norm = 0.5 + 0.05 * rng.gauss(0, 1)
        if s % 50_000 == 25_000:
            loss, norm = loss * 50, norm * 200
        out.append((loss, norm))
    return out


def write_csv(path: Path, steps: int) -> None:
    with path.open("w") as f:
        f.write("step,train_loss,grad_norm\n")
        for s, (loss, norm) in enumerate(synthetic(steps)):
            f.write(f"{s},{loss:.6g},{norm:.6g}\n")


def write_events(directory: Path, steps: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(directory), max_queue=10_000, flush_secs=3600)
    for s, (loss, norm) in enumerate(synthetic(steps)):
        writer.add_scalar("train_loss", loss, s)
        writer.add_scalar("grad_norm", norm, s)
    writer.close()


# The child's peak memory is its own address space's high-water mark (VmHWM): ru_maxrss would carry
# over the peak of this parent across fork and exec.
CHILD = """
import sys, time
from stabmon.cli import main
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
start = time.perf_counter()
code = main(["inspect", sys.argv[1], "--html", sys.argv[2], "--max-rows", "5"])
print("RESULT", time.perf_counter() - start, peak(), code)
"""


def inspect_in_child(path: Path, html: Path) -> tuple[float, float, str]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(html)], capture_output=True, text=True,
                          cwd=ROOT, timeout=3600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        raise SystemExit(f"inspect failed on {path}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    _, seconds, rss, _ = line.split()
    found = [l for l in proc.stdout.splitlines() if l.startswith(("read ", "divergence"))]
    return float(seconds), float(rss), " | ".join(found)


def baseline_rss() -> float:
    """Peak memory of a process that imports stabmon.cli and does nothing else, for reference."""
    code = ("import stabmon.cli, stabmon.cli.report_html\nfor line in open('/proc/self/status'):\n"
            "    if line.startswith('VmHWM:'): print(int(line.split()[1]) / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout)


def main(argv: list[str]) -> None:
    opts = parse_options(argv, __doc__, values=("steps", "formats"))
    lengths = [int(x) for x in opts.get("steps", "100000,1000000").split(",")]
    formats = opts.get("formats", "csv,tensorboard").split(",")
    rows, results = [], []
    base = baseline_rss()
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            for steps in lengths:
                run = Path(tmp) / f"{fmt}-{steps}"
                run.mkdir()
                start = time.perf_counter()
                write_csv(run / "metrics.csv", steps) if fmt == "csv" else write_events(run, steps)
                written = time.perf_counter() - start
                size = sum(f.stat().st_size for f in run.iterdir()) / 2**20
                seconds, rss, found = inspect_in_child(run, run / "report.html")
                html = (run / "report.html").stat().st_size / 2**10
                results.append({"format": fmt, "steps": steps, "log_mib": size, "seconds": seconds, "peak_rss_mib": rss,
                                "report_kib": html, "found": found, "written_seconds": written})
                rows.append([fmt, f"{steps:,}", f"{size:.1f}", f"{seconds:.1f}", f"{1e6 * seconds / steps:.1f}",
                             f"{rss:.0f}", f"{rss - base:.0f}", f"{html:.0f}"])
                print(f"{fmt} {steps:,} steps: {seconds:.1f} s, peak RSS {rss:.0f} MiB; {found}", flush=True)
    table = markdown_table(["format", "steps", "log MiB", "inspect s", "us / step", "peak RSS MiB",
                            "over the import alone", "report KiB"], rows)
    print(table)
    info = machine()
    path = write_json("inspect", {"machine": info, "import_rss_mib": base, "results": results, "table": table})
    print(f"\n{info['device']}, {info['date']}; the import alone: {base:.0f} MiB; JSON in {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
