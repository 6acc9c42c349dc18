"""Copies for snapshots: host buffers kept from one copy to the next (synchronous, a thread, or a
CUDA side stream into pinned memory), and what travels in a broadcast from rank 0."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from typing import Any

import torch

from stabmon.distributed import local_tensor

INLINE = 64  # tensors of at most this many elements travel with the metadata when broadcast


class HostCopy:
    """Copies a nest of tensors (dicts, lists) to host buffers kept from one copy to the next:
    synchronously, in a thread, or on a CUDA side stream into pinned memory."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._event: Any = None
        self._error: BaseException | None = None

    def _buffer(self, path: tuple, src: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(path)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            pin = src.is_cuda and torch.cuda.is_available()
            buf = self._buffers[path] = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
        return buf

    def _plan(self, value: Any, path: tuple, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        """The nest with each tensor replaced by its host buffer; ``pairs`` gets (buffer, source)."""
        if isinstance(value, torch.Tensor):
            src = local_tensor(value).detach()
            buf = self._buffer(path, src)
            pairs.append((buf, src))
            return buf
        if isinstance(value, dict):
            return {k: self._plan(v, (*path, k), pairs) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._plan(v, (*path, i), pairs) for i, v in enumerate(value))
        return copy.deepcopy(value)

    def start(self, value: Any, asynchronous: bool) -> Any:
        self.wait()
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        out = self._plan(value, (), pairs)
        on_cuda = any(src.is_cuda for _, src in pairs)
        if not asynchronous:
            for buf, src in pairs:
                buf.copy_(src)
        elif on_cuda:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for buf, src in pairs:
                    buf.copy_(src, non_blocking=True)
                    if src.is_cuda:
                        src.record_stream(stream)
                self._event = torch.cuda.Event()
                self._event.record(stream)
        else:
            def run() -> None:
                try:
                    for buf, src in pairs:
                        buf.copy_(src)
                except BaseException as err:  # noqa: BLE001 - re-raised by wait() on the caller's thread
                    self._error = err

            self._thread = threading.Thread(target=run, name="stabmon-snapshot", daemon=True)
            self._thread.start()
        return out

    @property
    def busy(self) -> bool:
        return self._thread is not None or self._event is not None

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"the snapshot's copy failed: {err!r}") from err



class Meta:
    """A tensor's shape and dtype, standing for it in a broadcast description."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors of a nest, in the order ``describe`` and ``Snapshotter._write_state`` visit them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors(v)


def describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone() if value.numel() <= INLINE else Meta(value)
    if isinstance(value, dict):
        return {k: describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(describe(v) for v in value)
    return copy.deepcopy(value)


def fingerprint(tensors: list[torch.Tensor], chunk: int = 1 << 22) -> torch.Tensor:
    """Three float64 statistics of the tensors (sum, position-weighted sum, sum of squares): equal
    on two ranks when their states are, and unequal, in practice, when they are not.

    Summed in float64 one chunk of ``chunk`` entries at a time (32 MiB), on the tensors' own
    device: a 128k x 4096 embedding is not copied whole (4 GiB in float64), and a GPU is read
    back once per device, not once per tensor."""
    totals: dict[torch.device, torch.Tensor] = {}
    for i, t in enumerate(tensors):
        flat = t.detach().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        acc = torch.zeros(3, dtype=torch.float64, device=flat.device)
        for start in range(0, flat.numel(), chunk):
            part = flat[start:start + chunk].double()
            acc[0] += part.sum()
            acc[2] += (part * part).sum() if t.is_floating_point() or t.is_complex() else part.numel()
        acc[1] = acc[0] * (i + 1)
        totals[flat.device] = totals[flat.device] + acc if flat.device in totals else acc
    out = torch.zeros(3, dtype=torch.float64)
    for acc in totals.values():
        out += acc.cpu()
    return out
