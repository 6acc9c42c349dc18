"""The ``stabmon`` console script (also ``python -m stabmon``).

    stabmon inspect PATH [--html report.html] [--fail-on critical|warning|never] [--key loss=my/loss]
                         [--watch [--interval 5]] [--spike-z-warning 6 ...]

``inspect`` runs stabmon's detectors over the logs of any run (Lightning CSV, TensorBoard, the
Hugging Face Trainer's ``trainer_state.json``, JSONL), prints the findings and the onset of
divergence, writes an HTML report, and exits with 1 when a finding is at or above
``--fail-on`` (default ``critical``), 2 when the logs cannot be read: a CI job or a scheduler
can gate on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

from stabmon.cli.inspect import ALIASES, SHORT, KeyMap, Replay, load_events
from stabmon.cli.logs import LogError, open_logs
from stabmon.detectors import DetectionConfig, Finding

__all__ = ["main"]

EXIT_OK, EXIT_FOUND, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stabmon", description="stabmon: a training-stability monitor.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect", help="run stabmon's detectors over a run's logs",
        description="Run stabmon's detectors over the logs of a run: Lightning's metrics.csv (a version directory "
                    "or the logger's root), TensorBoard event files, the HF Trainer's trainer_state.json (or its "
                    "output directory with checkpoint-*), or JSONL with a step key.")
    inspect.add_argument("path", help="a log file or a run directory")
    inspect.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    inspect.add_argument("--fail-on", choices=("critical", "warning", "never"), default="critical",
                         help="exit with 1 when a finding is this bad or worse (default: critical)")
    inspect.add_argument("--key", action="append", default=[], metavar="SIGNAL=KEY",
                         help=f"read a signal ({', '.join(SHORT)}) from this log key, e.g. --key loss=train/my_loss")
    inspect.add_argument("--watch", action="store_true", help="follow a run in progress; print findings as they come")
    inspect.add_argument("--interval", type=float, default=5.0, help="seconds between reads with --watch (default 5)")
    inspect.add_argument("--drift-window", type=int, default=20,
                         help="logged values in the trailing mean of the onset of divergence (default 20)")
    inspect.add_argument("--max-rows", type=int, default=50, help="findings printed at most (default 50)")
    for f in dataclasses.fields(DetectionConfig):  # every threshold, as in training
        inspect.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar="X",
                             type=str if f.name == "eos_ratio_severity" else float,
                             help=f"DetectionConfig.{f.name} (default {f.default})")
    return parser


def _config(args: argparse.Namespace) -> DetectionConfig:
    values = {}
    for f in dataclasses.fields(DetectionConfig):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = int(value) if isinstance(f.default, int) and not isinstance(f.default, bool) else value
    return DetectionConfig(**values)


def _row(f: Finding) -> str:
    message = f.message if len(f.message) <= 90 else f.message[:87] + "..."
    return f"{f.step:>8}  {f.severity:<8}  {f.signal:<32}  {f.value:>10.4g}  {f.threshold:>10.4g}  {message}"


HEADER = f"{'step':>8}  {'severity':<8}  {'signal':<32}  {'value':>10}  {'threshold':>10}  message"


def inspect_command(args: argparse.Namespace, out=None) -> int:  # noqa: ANN001
    out = out or sys.stdout
    try:
        overrides = dict(item.split("=", 1) for item in args.key)
    except ValueError:
        print(f"stabmon inspect: --key takes SIGNAL=KEY, got {args.key}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        keys = KeyMap(overrides)
        config = _config(args)
        reader, run_dir = open_logs(args.path)
        replay = Replay(config, keys, events=load_events(run_dir), drift_window=args.drift_window)
        print(f"stabmon inspect: {reader.describe()}", file=out)
        if args.watch:
            print(HEADER, file=out, flush=True)
            try:
                while True:
                    for finding in replay.feed(reader.poll()):
                        print(_row(finding), file=out, flush=True)
                    time.sleep(args.interval)
            except KeyboardInterrupt:
                pass
            replay.finish()
        else:
            while True:
                records = reader.poll()
                if not records:
                    break
                replay.feed(records)
            reader.check_complete()
            replay.finish()
    except (LogError, ValueError) as err:
        print(f"stabmon inspect: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    result = replay.result
    for note in reader.notes:
        print(f"note: {note}", file=out)
    if result.steps == 0:
        print(f"stabmon inspect: {args.path}: no step with a number was found in the log", file=sys.stderr)
        return EXIT_BAD_INPUT
    if "loss/last" not in keys.used:
        print(f"note: {reader.path}: no loss found (looked for {', '.join(ALIASES['loss/last'][:5])}, ...); name "
              "it with --key loss=KEY", file=out)
    mapped = ", ".join(f"{signal} <- {key}" for signal, key in keys.used.items())
    print(f"read {result.steps} steps ({result.first_step}..{result.last_step}); {mapped or 'no known key'}", file=out)
    if not args.watch:
        if result.findings:
            print(HEADER, file=out)
            for f in result.findings[: args.max_rows]:
                print(_row(f), file=out)
            if len(result.findings) > args.max_rows:
                print(f"... and {len(result.findings) - args.max_rows} more (--max-rows)", file=out)
        else:
            print("no findings", file=out)
    drift = result.drift
    if result.onset is not None:
        print(f"divergence: from step {result.onset} the loss's trailing median stayed above its best, "
              f"{drift.best:.4g} at step {drift.best_step}, by more than {drift.margin():.3g} to the end of the log "
              f"(it ends at {drift.mean:.4g})", file=out)
    acted = [e for e in result.events if e.get("kind") == "action"]
    if result.events:
        print(f"the run's own event log: {sum(e.get('kind') == 'finding' for e in result.events)} findings, "
              f"{len(acted)} actions ({', '.join(sorted({e['name'] for e in acted})) or 'none'})", file=out)
    if args.html:
        from stabmon.cli.report_html import write_report

        write_report(args.html, run_dir, reader.describe(), result, keys, replay.series)
        print(f"report: {args.html}", file=out)
    worst = result.worst()
    fail = {"critical": ("critical",), "warning": ("warning", "critical"), "never": ()}[args.fail_on]
    return EXIT_FOUND if worst in fail else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "inspect":
        return inspect_command(args)
    return EXIT_BAD_INPUT  # pragma: no cover - argparse requires a command
