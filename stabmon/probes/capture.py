"""Capture of attention and logits during a sampled forward, without touching the model.

A ``TorchFunctionMode`` is active only while a sampled forward runs. It sees every call
of ``F.scaled_dot_product_attention`` and ``F.cross_entropy`` with its arguments, hands
them to the probes and then runs the call unchanged. Two global module hooks (one pre-,
one post-forward), registered for the sampled forward only, keep a stack of module names
so each attention call is attributed to the module that made it (e.g.
``transformer.h.3.attn``); the names of the model's modules are looked up once.

On steps that are not sampled nothing is installed: no mode, no hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from stabmon.probes.compiled import canonical_name

__all__ = ["ForwardCapture", "SDPAMode", "record_attention", "active_capture"]

AttentionSink = Callable[..., None]  # (q, k, *, attn_mask, is_causal, scale, module) -> None
LogitSink = Callable[..., None]  # (logits, target, *, ignore_index) -> None

_SDPA_FUNCS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_CE_ARGS = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")

_active: ForwardCapture | None = None
# Modes watching one module's attention on every step (QK-clip's armed layers): the innermost
# one also hears attention reported by hand through ``record_attention``.
_attention_listeners: list[SDPAMode] = []


def active_capture() -> ForwardCapture | None:
    """The capture of the sampled forward now running, or None (the common case)."""
    return _active


def _bind(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class SDPAMode(TorchFunctionMode):
    """Sees every ``F.scaled_dot_product_attention`` call, direct or from inside
    ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``).

    A function mode sees the outermost torch function of a call and runs it with itself
    switched off, so the SDPA call that ``multi_head_attention_forward`` makes inside would
    go unseen. For that one composite function the module-level name it calls SDPA by is
    pointed at a watching wrapper for the duration of the call. Subclasses implement
    ``on_attention`` (and may handle more functions in ``on_other``).
    """

    def on_attention(self, q: torch.Tensor, k: torch.Tensor, *, attn_mask: torch.Tensor | None, is_causal: bool,
                     scale: float | None) -> None:
        raise NotImplementedError

    def on_other(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Any other torch function of the forward (before it runs)."""

    def listen(self) -> None:
        """Also hear attention reported through ``record_attention`` (until ``unlisten``)."""
        _attention_listeners.append(self)

    def unlisten(self) -> None:
        if self in _attention_listeners:
            _attention_listeners.remove(self)

    def _sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        a = _bind(_SDPA_ARGS, args, kwargs)
        self.on_attention(a["query"], a["key"], attn_mask=a.get("attn_mask"),
                          is_causal=bool(a.get("is_causal", False)), scale=a.get("scale"))

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        # Torch disables this mode while the handler runs: the probes' own torch calls
        # below do not come back here.
        if func in _SDPA_FUNCS:
            self._sdpa(args, kwargs)
        elif func is F.multi_head_attention_forward:
            return self._watch_composite(func, args, kwargs)
        else:
            self.on_other(func, args, kwargs)
        return func(*args, **kwargs)

    def _watch_composite(self, func, args, kwargs):  # noqa: ANN001, ANN202
        real = F.scaled_dot_product_attention

        def watched(*a: Any, **kw: Any) -> torch.Tensor:
            self._sdpa(a, kw)
            return real(*a, **kw)

        F.scaled_dot_product_attention = watched
        try:
            return func(*args, **kwargs)
        finally:
            F.scaled_dot_product_attention = real


class _CaptureMode(SDPAMode):
    def __init__(self, capture: ForwardCapture) -> None:
        super().__init__()
        self._capture = capture

    def on_attention(self, q, k, *, attn_mask, is_causal, scale):  # noqa: ANN001
        self._capture.attention(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    def on_other(self, func, args, kwargs):  # noqa: ANN001
        if func is F.cross_entropy:
            a = _bind(_CE_ARGS, args, kwargs)
            self._capture.logits(a["input"], a["target"], ignore_index=a.get("ignore_index", -100))


class ForwardCapture:
    """Routes SDPA and cross-entropy calls of one sampled forward to the probes.

    Args:
        on_attention: called as ``on_attention(q, k, attn_mask=..., is_causal=..., scale=..., module=name)``.
        on_logits: called as ``on_logits(logits, target, ignore_index=...)``.
        guard: runs each sink call (the monitor passes its fail-soft guard).

    Example:
        >>> calls = []
        >>> cap = ForwardCapture(on_attention=lambda q, k, **kw: calls.append(kw["module"]))
        >>> model = torch.nn.Identity()
        >>> q = torch.randn(1, 1, 4, 8)
        >>> with cap.watch(model):
        ...     _ = F.scaled_dot_product_attention(q, q, q)
        >>> calls
        ['']
    """

    def __init__(
        self,
        on_attention: AttentionSink | None = None,
        on_logits: LogitSink | None = None,
        guard: Callable[..., Any] | None = None,
    ) -> None:
        self._on_attention = on_attention
        self._on_logits = on_logits
        self._guard = guard or (lambda _name, fn, *a, **kw: fn(*a, **kw))
        self._stack: list[str] = []
        self._calls: list[int] = [0]  # attention calls so far in each open forward (and at the top)
        self._handles: list[Any] = []
        self._names: dict[int, tuple[str, torch.nn.Module]] = {}  # id(module) -> (qualified name, module)
        self._named_model: torch.nn.Module | None = None
        self._mode: _CaptureMode | None = None
        self.attention_calls = 0
        self.logit_calls = 0

    @property
    def current_module(self) -> str:
        """Qualified name of the innermost module whose forward is running ('' at the top)."""
        return self._stack[-1] if self._stack else ""

    def _call_site(self) -> str:
        """The calling module, with ``#n`` for its n-th attention call within one forward.

        A module that calls attention twice (self- and cross-attention, or a loop over
        layers in one forward) gives two sites; the same module run again in a second
        forward gives the same site again.
        """
        occurrence = self._calls[-1]
        self._calls[-1] += 1
        return self.current_module + (f"#{occurrence}" if occurrence else "")

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        scale: float | None = None,
        module: str | None = None,
    ) -> None:
        self.attention_calls += 1
        if self._on_attention is not None:
            name = self._call_site() if module is None else module
            self._guard("attention probe", self._on_attention, q, k, attn_mask=attn_mask, is_causal=is_causal,
                        scale=scale, module=name)

    def logits(self, logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = -100) -> None:
        self.logit_calls += 1
        if self._on_logits is not None:
            self._guard("logit probe", self._on_logits, logits, target, ignore_index=ignore_index)

    # -- installation ---------------------------------------------------------------------
    def attach(self, model: torch.nn.Module | None) -> None:
        """Install the hooks on ``model``'s modules and enter the capture mode."""
        global _active
        if self._mode is not None:
            return
        if model is not None:
            if self._named_model is not model:
                # Modules added to the model later are attributed to their nearest named parent.
                self._names = {id(m): (canonical_name(name), m) for name, m in model.named_modules()}
                self._named_model = model
            self._handles.append(register_module_forward_pre_hook(self._push))
            self._handles.append(register_module_forward_hook(self._pop, always_call=True))
        self._mode = _CaptureMode(self)
        self._mode.__enter__()
        _active = self

    def detach(self) -> None:
        """Leave the capture mode and remove every hook; safe to call twice."""
        global _active
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._stack.clear()
        self._calls = [0]
        if _active is self:
            _active = None

    @property
    def attached(self) -> bool:
        return self._mode is not None

    def watch(self, model: torch.nn.Module | None) -> _Watch:
        """Context manager form of ``attach`` / ``detach``."""
        return _Watch(self, model)

    def _known(self, module: torch.nn.Module) -> str | None:
        entry = self._names.get(id(module))
        return entry[0] if entry is not None and entry[1] is module else None

    def _push(self, module: torch.nn.Module, _args: Any) -> None:
        name = self._known(module)
        if name is not None:
            self._stack.append(name)
            self._calls.append(0)

    def _pop(self, module: torch.nn.Module, _args: Any, _output: Any) -> None:
        if self._stack and self._known(module) is not None:
            self._stack.pop()
            self._calls.pop()


class _Watch:
    def __init__(self, capture: ForwardCapture, model: torch.nn.Module | None) -> None:
        self._capture, self._model = capture, model

    def __enter__(self) -> ForwardCapture:
        self._capture.attach(self._model)
        return self._capture

    def __exit__(self, *exc: object) -> None:
        self._capture.detach()


def record_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    layer: str | None = None,
) -> None:
    """Report an attention computed by hand (not through SDPA) to the monitor.

    Call it with the same ``q``, ``k`` and mask arguments that SDPA would take. Outside a
    sampled forward (and outside a layer QK-clip measures every step) it returns at once and
    costs nothing.

    Args:
        q: queries ``(B, H, Lq, D)``.
        k: keys ``(B, Hkv, Lk, D)``.
        attn_mask: boolean (True = attend) or additive float mask, as SDPA.
        is_causal: causal masking, as SDPA.
        scale: score scale, ``1/sqrt(D)`` when None.
        layer: name to report under; by default the module whose forward is running.

    Example::

        def forward(self, x):
            q, k, v = self.qkv(x).split(...)
            stabmon.record_attention(q, k, is_causal=True)
            att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            ...
    """
    capture = _active
    if capture is None and not _attention_listeners:
        return
    # The probe's own matmuls need not pass through the capture mode.
    with torch._C.DisableTorchFunction():
        if _attention_listeners:
            _attention_listeners[-1].on_attention(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
        if capture is not None:
            capture.attention(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale, module=layer)
