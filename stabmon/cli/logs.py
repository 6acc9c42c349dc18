"""Readers of training logs, streamed: Lightning's CSV, TensorBoard event files, the Hugging Face
Trainer's ``trainer_state.json``, and JSONL. Each reader is a follower: ``poll()`` returns the
records written since the last call (all of them the first time), so the same reader serves a
finished run and one still in progress (``stabmon inspect --watch``). Nothing is loaded whole.

A record is ``(step, {key: value})``; several records may share a step (a CSV row per logging
call); the caller merges them. ``open_logs(path)`` finds what is at a path.
"""

from __future__ import annotations

import csv
import heapq
import io
import itertools
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["LogError", "LogReader", "open_logs"]

Record = tuple[int, dict[str, float]]
CHUNK = 512 << 10  # bytes of a text log read per poll: the memory of a read does not grow with the log
CHUNK_RECORDS = 10_000  # event records per poll
STEP_KEYS = ("step", "global_step", "trainer/global_step", "_step", "iteration", "iter")


class LogError(Exception):
    """A log that cannot be read; the message names the file and what is wrong with it."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip():
        try:
            return float(value)
        except ValueError:
            return None
    return None


class LogReader:
    """Base of the readers: ``poll()`` gives the new records; ``notes`` what the reader had to
    say once (a file cut mid-record, the version directory it picked)."""

    kind = "log"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.notes: list[str] = []

    def poll(self) -> list[Record]:
        raise NotImplementedError

    def check_complete(self) -> None:
        """After the last ``poll`` of a finished run: note a file that ends in the middle of a record
        (a writer killed mid-write; what came before it was read)."""

    def _check_tail(self, offset: int) -> None:
        size = self.path.stat().st_size
        if size > offset:
            self.notes.append(f"{self.path}: the last {size - offset} bytes are a line cut off (a run killed while "
                              "writing it?): left out")

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


class CsvReader(LogReader):
    """Lightning's ``CSVLogger`` (``metrics.csv``: a ``step`` column, one row per logging call,
    empty cells for keys not logged in that row), or any CSV with a step column. Lightning
    rewrites the file when a new key appears: then it is read again from the start and the steps
    already seen are skipped."""

    kind = "CSV"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._offset = 0  # bytes read so far (complete lines)
        self._header: list[str] | None = None
        self._header_bytes = b""
        self._step_column: str | None = None
        self._last_step = -math.inf
        self._skip_below = -math.inf  # after a rewrite: the rows before this step were read already
        self._row = 0

    def poll(self) -> list[Record]:
        """The complete lines written since the last call, at most ``CHUNK`` bytes of them."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError as err:
            raise LogError(f"{self.path}: the file is gone") from err
        with self.path.open("rb") as f:
            first = f.readline()
            if not first.strip():
                if self._header is None:
                    raise LogError(f"{self.path}: the file is empty (no header line)")
                return []
            if first != self._header_bytes or size < self._offset:  # the first read, or rewritten: more columns
                if self._header is not None:
                    self._skip_below = self._last_step
                self._header_bytes, self._offset = first, len(first)
                self._header = next(csv.reader([first.decode(errors="replace")]))
                self._step_column = next((c for c in STEP_KEYS if c in self._header), None)
                if self._step_column is None:
                    raise LogError(f"{self.path}: no step column (looked for {', '.join(STEP_KEYS)}); "
                                   f"the columns are {', '.join(self._header[:12])}")
            f.seek(self._offset)
            chunk = f.read(CHUNK)
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a last line without its newline is still being written
        self._offset += len(complete)
        out = []
        for row in csv.reader(io.StringIO(complete.decode(errors="replace"))):
            self._row += 1
            if not row:
                continue
            if len(row) != len(self._header):
                self.notes.append(f"{self.path}: row {self._row} has {len(row)} fields, the header "
                                  f"{len(self._header)}: left out")
                continue
            cells = dict(zip(self._header, row))
            step = _number(cells.pop(self._step_column))
            if step is None or step < self._skip_below:
                continue
            values = {k: v for k, v in ((k, _number(c)) for k, c in cells.items()) if v is not None}
            if values:
                out.append((int(step), values))
                self._last_step = max(self._last_step, step)
        if not out and complete:  # a chunk of rows without values: read on
            return self.poll()
        return out

    def check_complete(self) -> None:
        self._check_tail(self._offset)


class JsonlReader(LogReader):
    """One JSON object per line with a step key (``step``, ``global_step``, ``_step``, ...) and
    numbers; other fields are left out."""

    kind = "JSONL"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._offset = 0
        self._line = 0

    def poll(self) -> list[Record]:
        """The complete lines written since the last call, at most ``CHUNK`` bytes of them."""
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read(CHUNK)
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        out = []
        for line in complete.decode(errors="replace").splitlines():
            self._line += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self.notes.append(f"{self.path}: line {self._line} is not JSON: left out")
                continue
            if isinstance(record, dict):
                step = next((record[k] for k in STEP_KEYS if isinstance(record.get(k), (int, float))), None)
                values = {k: v for k, v in ((k, _number(x)) for k, x in record.items()) if v is not None}
                if step is not None and values:
                    out.append((int(step), values))
        if not out and complete:
            return self.poll()
        return out


    def check_complete(self) -> None:
        self._check_tail(self._offset)


class TrainerStateReader(LogReader):
    """The Hugging Face Trainer's ``trainer_state.json``: its ``log_history`` (``loss`` is the
    mean over ``logging_steps``, ``grad_norm`` the last step's). Re-read when the Trainer writes
    it again; the steps already seen are skipped."""

    kind = "HF trainer_state.json"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._seen = -1
        self._mtime: float | None = None

    def poll(self) -> list[Record]:
        mtime = self.path.stat().st_mtime
        if mtime == self._mtime:
            return []
        self._mtime = mtime
        try:
            state = json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise LogError(f"{self.path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        history = state.get("log_history") if isinstance(state, dict) else None
        if not isinstance(history, list):
            raise LogError(f"{self.path}: no log_history list (is it a trainer_state.json?)")
        out = []
        for entry in history:
            step = entry.get("step") if isinstance(entry, dict) else None
            if isinstance(step, int) and step > self._seen:
                values = {k: v for k, v in ((k, _number(x)) for k, x in entry.items()) if v is not None}
                out.append((step, values))
        if out:
            self._seen = max(step for step, _ in out)
        return out


class EventFileReader(LogReader):
    """TensorBoard event files (``events.out.tfevents.*``), read with the tensorboard package's
    ``EventFileLoader``, which streams records and picks up those written later. Scalars written
    by ``add_scalars`` (one file per line, in a subdirectory named ``<tag>_<line>``) come back as
    ``<tag without /by_layer>/<line>``, the flat key stabmon logs elsewhere."""

    kind = "TensorBoard"

    def __init__(self, directory: Path, files: list[Path]) -> None:
        super().__init__(directory)
        try:
            from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        except ImportError as err:  # pragma: no cover - tensorboard is a test dependency
            raise LogError(f"{directory}: reading TensorBoard event files needs the tensorboard package "
                           "(pip install tensorboard)") from err
        self._loaders = {file: EventFileLoader(str(file)) for file in files}
        self._merged: Iterator[Record] | None = None  # the records of the files in step order, as they come

    def _scalars(self, file: Path) -> Iterator[Record]:
        from tensorboard.util import tensor_util

        line = file.parent.name if file.parent != self.path else None
        try:
            for event in self._loaders[file].Load():
                if not event.HasField("summary"):
                    continue
                values = {}
                for value in event.summary.value:
                    kind = value.WhichOneof("value")
                    if kind == "simple_value":
                        number = float(value.simple_value)
                    elif kind == "tensor":
                        array = tensor_util.make_ndarray(value.tensor)
                        if array.size != 1:
                            continue
                        number = float(array.reshape(()))
                    else:
                        continue
                    values[_by_layer_key(value.tag, line)] = number
                if values:
                    yield event.step, values
        except Exception as err:  # noqa: BLE001 - a file cut mid-record: keep what came before
            self.notes.append(f"{file}: stopped reading at a damaged or cut record ({type(err).__name__}); the "
                              "records before it are used")

    def poll(self) -> list[Record]:
        """Up to ``CHUNK_RECORDS`` records written since the last call, in step order across files."""
        if self._merged is None:
            self._merged = heapq.merge(*(self._scalars(f) for f in self._loaders), key=lambda record: record[0])
        out = list(itertools.islice(self._merged, CHUNK_RECORDS))
        if len(out) < CHUNK_RECORDS:
            self._merged = None  # at the end: the next call loads what was written since
        return out

    def check_complete(self) -> None:
        for file in self._loaders:
            cut = _cut_record(file)
            if cut is not None:
                self.notes.append(f"{file}: stopped reading at a damaged or cut record (byte {cut} of "
                                  f"{file.stat().st_size}); the records before it are used")


def _cut_record(path: Path) -> int | None:
    """Where a TFRecord file ends in the middle of a record (each record: an 8-byte length, a
    4-byte checksum, the data and a 4-byte checksum), or None when it ends on a record boundary."""
    size, offset = path.stat().st_size, 0
    with path.open("rb") as f:
        while offset < size:
            if offset + 12 > size:
                return offset
            f.seek(offset)
            length = int.from_bytes(f.read(8), "little")
            offset_next = offset + 12 + length + 4
            if offset_next > size:
                return offset
            offset = offset_next
    return None


def _by_layer_key(tag: str, line: str | None) -> str:
    if line is None or not tag.endswith("/by_layer"):
        return tag
    base = tag[: -len("/by_layer")]
    prefix = tag.replace("/", "_") + "_"
    return f"{base}/{line[len(prefix):]}" if line.startswith(prefix) else f"{base}/{line}"


def _version_number(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match.group(1)) if match else -1


def open_logs(path: str | Path) -> tuple[LogReader, Path]:
    """The reader of the log at ``path`` (a file, a run directory, a Lightning logger root with
    ``version_*`` directories, an HF output directory with ``checkpoint-*``), and the directory
    the run's other files (``stabmon-events.jsonl``) are looked for in."""
    path = Path(path)
    if not path.exists():
        raise LogError(f"{path}: no such file or directory")
    if path.is_file():
        return _reader_for_file(path), path.parent
    notes = []
    versions = sorted((p for p in path.iterdir() if p.is_dir() and _version_number(p) >= 0), key=_version_number)
    if (path / "lightning_logs").is_dir() and not versions:
        return open_logs(path / "lightning_logs")
    if versions and not (path / "metrics.csv").exists() and not list(path.glob("events.out.tfevents.*")):
        many = f"{len(versions)} version directories" if len(versions) > 1 else "one version directory"
        notes.append(f"{path}: {many}; reading the newest, {versions[-1].name}")
        reader, run_dir = open_logs(versions[-1])
        reader.notes[:0] = notes
        return reader, run_dir
    if (path / "metrics.csv").is_file():
        return CsvReader(path / "metrics.csv"), path
    events = sorted(path.glob("events.out.tfevents.*")) + sorted(path.glob("*/events.out.tfevents.*"))
    if events:
        return EventFileReader(path, events), path
    states = [path / "trainer_state.json"] + sorted(path.glob("checkpoint-*/trainer_state.json"))
    states = [s for s in states if s.is_file()]
    if states:
        newest = max(states, key=_global_step)
        reader = TrainerStateReader(newest)
        if len(states) > 1:
            reader.notes.append(f"{path}: {len(states)} trainer_state.json files; reading {newest.relative_to(path)} "
                                "(the furthest global_step)")
        return reader, path
    logs = sorted(p for p in path.glob("*.jsonl") if p.name != "stabmon-events.jsonl")
    if logs:
        return JsonlReader(logs[0]), path
    raise LogError(f"{path}: no log found (looked for metrics.csv, version_*/, events.out.tfevents.*, "
                   "trainer_state.json, checkpoint-*/trainer_state.json, *.jsonl)")


def _global_step(state: Path) -> int:
    try:
        return int(json.loads(state.read_text()).get("global_step", -1))
    except (ValueError, AttributeError):
        return -1


def _reader_for_file(path: Path) -> LogReader:
    name = path.name
    if name.startswith("events.out.tfevents"):
        return EventFileReader(path.parent, [path])
    if name.endswith(".csv"):
        return CsvReader(path)
    if name.endswith(".json"):
        return TrainerStateReader(path)
    if name.endswith((".jsonl", ".ndjson")):
        return JsonlReader(path)
    raise LogError(f"{path}: not a log stabmon reads (a .csv, events.out.tfevents.*, trainer_state.json or .jsonl)")
