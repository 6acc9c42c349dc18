"""Models compiled with ``torch.compile``: find the compiled parts, and run them eagerly for a probe.

The capture must not touch a compiled forward: a ``TorchFunctionMode`` or a hook that comes
and goes changes Dynamo's guards and recompiles the graph (on a large model on a GPU a
recompile takes minutes), and after ``recompile_limit`` recompiles Dynamo falls back to
eager for good. So on a compiled model the monitor leaves the training forward alone and
runs its probes on an **eager forward of the original modules**: ``torch.compile`` keeps
them (``OptimizedModule._orig_mod``, or the module itself for ``module.compile()``), and
``eager_view`` swaps them in for the duration of the probe, then swaps the compiled ones
back. No graph is compiled for the probe, none is invalidated.

Three ways a model is compiled are recognised: a submodule replaced by ``torch.compile(m)``
(an ``OptimizedModule``, e.g. ``self.model = torch.compile(GPT())`` in ``__init__`` or
``configure_model``), a module compiled in place with ``m.compile()``, and a whole
LightningModule passed to ``Trainer.fit(torch.compile(module))`` (Lightning then compiles
its ``forward`` and ``training_step``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["canonical_name", "eager_view", "get_parameter", "get_submodule", "is_compiled", "original"]


def _optimized_module() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return None
    return OptimizedModule


def original(model: torch.nn.Module) -> torch.nn.Module:
    """The module ``torch.compile`` wrapped (the module itself when it is not a wrapper)."""
    optimized = _optimized_module()
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def is_compiled(model: torch.nn.Module) -> bool:
    """True when ``model`` or one of its submodules runs compiled."""
    optimized = _optimized_module()
    if getattr(model, "_compiler_ctx", None):  # a LightningModule given to Trainer.fit compiled
        return True
    return any((optimized is not None and isinstance(m, optimized)) or getattr(m, "_compiled_call_impl", None)
               for m in model.modules())


def canonical_name(name: str) -> str:
    """A parameter or module name without the ``_orig_mod`` level a compiled wrapper adds.

    Example:
        >>> canonical_name("model._orig_mod.transformer.h.0.attn.c_attn.weight")
        'model.transformer.h.0.attn.c_attn.weight'
    """
    parts = [p for p in name.split(".") if p != "_orig_mod"]
    return ".".join(parts)


@contextlib.contextmanager
def eager_view(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``model`` and all its submodules run eagerly; yields the eager root.

    Every ``OptimizedModule`` child is replaced in its parent by its original module,
    ``compile()``-d modules lose their compiled call, and a compiled LightningModule gets its
    original ``forward`` and ``training_step`` back; all of it is put back on exit. Anything
    compiled that cannot be swapped (the root wrapper a loss function holds, a compiled
    function in the user's code) runs eagerly too: Dynamo's ``force_eager`` stance, which
    neither compiles nor checks guards.
    """
    optimized = _optimized_module()
    root = original(model)
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    calls: list[tuple[torch.nn.Module, object]] = []
    methods: list[tuple[str, object]] = []
    try:
        stack = [root]
        while stack:
            parent = stack.pop()
            if getattr(parent, "_compiled_call_impl", None) is not None:
                calls.append((parent, parent._compiled_call_impl))
                parent._compiled_call_impl = None
            for name, child in list(parent._modules.items()):
                if child is None:
                    continue
                if optimized is not None and isinstance(child, optimized):
                    parent._modules[name] = original(child)
                    swapped.append((parent, name, child))
                    child = parent._modules[name]
                stack.append(child)
        ctx = getattr(root, "_compiler_ctx", None)
        if ctx:
            for method in ("forward", "training_step"):
                methods.append((method, root.__dict__.get(method)))
                setattr(root, method, ctx[f"original_{method}"])
        with _force_eager():
            yield root
    finally:
        for method, value in methods:
            if value is None:
                root.__dict__.pop(method, None)
            else:
                setattr(root, method, value)
        for module, call in calls:
            module._compiled_call_impl = call
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def _force_eager() -> contextlib.AbstractContextManager:
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def get_submodule(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """``model.get_submodule(name)`` for a canonical name (compiled wrappers skipped)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        for full, module in model.named_modules():
            if canonical_name(full) == name:
                return module
        raise


def names_in_forward(model: torch.nn.Module, site: str, model_names: dict[int, str]) -> dict[int, str]:
    """``id(parameter) -> canonical name`` as seen inside the forward of the call site's module:
    ``model_names`` (the model's parameters, built once by the caller) and the module's own
    parameters as registered right now (FSDP2 puts the unsharded parameters, the leaves of the
    forward's graph, there only for the forward)."""
    module_name = site.partition("#")[0]
    prefix = f"{module_name}." if module_name else ""
    local = {id(p): canonical_name(prefix + n) for n, p in get_submodule(model, module_name).named_parameters()}
    return {**model_names, **local}


def get_parameter(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    """``model.get_parameter(name)`` for a canonical name (compiled wrappers skipped)."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        for full, param in model.named_parameters():
            if canonical_name(full) == name:
                return param
        raise
