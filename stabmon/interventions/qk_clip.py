"""QK-clip: rescale the query and key weights of the heads whose attention logits run away.

After Kimi K2 (2025): after an optimizer step, for every head ``h`` whose largest
pre-softmax logit over the batch ``S_h`` exceeds ``tau``, multiply the head's query
entries by ``gamma ** alpha`` and its key entries by ``gamma ** (1 - alpha)``, with
``gamma = tau / S_h`` and ``alpha = 1/2``. The head's logits are ``q . k`` times a constant,
so they scale by exactly ``gamma``: ``S_h`` becomes ``tau``. Nothing else changes: the
other heads, the values, every other parameter and the optimizer state stay bit-identical.

Grouped-query attention: a key head serves several query heads, so scaling it would move
its neighbours' logits too. All of ``gamma`` goes on the query entries then (``alpha = 1``),
as Kimi's MLA variant does for its shared rotary key: one head's clip never touches
another head.

The clipper's life cycle, driven by ``MonitorCore``:

* on a sampled step it keeps the q and k of every SDPA call and, before the backward,
  locates each layer's entries once (``stabmon.interventions.qk_locate``); a layer that
  cannot be located is reported once and left to the LR rungs;
* a layer is **armed** when its max logit passes ``tau`` (or an attention-logit finding
  names it): forward hooks on its module then measure its per-head max logit on every
  step with ``stabmon.kernels.attention_max_logit`` (max only: no entropy, no exponential);
* after every optimizer step the armed layers' per-head maxima are all-reduced (max over
  ranks) and the heads above ``tau`` rescaled, all on the device: no host read.

Example:
    >>> model = torch.nn.Linear(4, 8, bias=False)            # fused q, k for 2 heads of 2
    >>> x = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0))
    >>> q, k = (model(x) * 20).view(1, 3, 2, 2, 2).permute(2, 0, 3, 1, 4)
    >>> clipper = QKClipper(model, tau=5.0)
    >>> clipper.capture(q, k, site="")   # in a sampled forward: locates the layer
    >>> clipper.locate_pending()        # after it: nothing to report
    []
    >>> clipper.arm("", step=0, head_max=attention_max_logit(q, k).amax(dim=(0, 2)), why="test")[:14]
    'armed layer ""'
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stabmon.distributed import global_row_offset, local_tensor
from stabmon.interventions.qk_locate import NotClippable, ParamRows, QKLocation, locate_qk
from stabmon.kernels import attention_max_logit
from stabmon.probes.capture import SDPAMode
from stabmon.probes.compiled import canonical_name, get_parameter, get_submodule
from stabmon.signals import AllReduce, SignalSet, active_all_reduce

__all__ = ["QKClipOverride", "QKClipper"]

log = logging.getLogger("stabmon")


@dataclass(frozen=True)
class QKClipOverride:
    """The query and key entries of one attention module, given by hand.

    For layers the automatic location refuses (an exotic layout), or to pin it down.

    Args:
        module: qualified name of the module that calls SDPA (``"transformer.h.0.attn"``).
        query: ``(parameter name, rows of each query head)`` pairs: the rows (dim 0; the
            entries, for a bias) of that parameter that feed query head ``h``.
        key: the same for the key heads (fewer than the query heads under GQA).

    Example:
        >>> QKClipOverride("attn", query=(("attn.q.weight", ((0, 1), (2, 3))),),
        ...                key=(("attn.k.weight", ((0, 1), (2, 3))),)).module
        'attn'
    """

    module: str
    query: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]
    key: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.module, str):
            raise ValueError(f"`module` must be a str, got {self.module!r}")
        for field_name in ("query", "key"):
            pairs = getattr(self, field_name)
            if not pairs or not all(isinstance(n, str) and len(rows) > 0 for n, rows in pairs):
                raise ValueError(f"`{field_name}` must hold (parameter name, rows per head) pairs, got {pairs!r}")
        heads = {len(rows) for _, rows in self.query}
        key_heads = {len(rows) for _, rows in self.key}
        if len(heads) != 1 or len(key_heads) != 1 or next(iter(heads)) % next(iter(key_heads)):
            raise ValueError(f"every `query` pair must list the same number of heads, a multiple of the key "
                             f"heads; got {sorted(heads)} query and {sorted(key_heads)} key heads")

    def location(self) -> QKLocation:
        heads, groups = len(self.query[0][1]), len(self.key[0][1])
        params = [ParamRows(name, "q", 0, [list(r) for r in rows]) for name, rows in self.query]
        params += [ParamRows(name, "k", 0, [list(r) for r in rows]) for name, rows in self.key]
        return QKLocation(self.module, heads, groups, [h // (heads // groups) for h in range(heads)], params)


class _MaxLogitMode(SDPAMode):
    """Inside an armed module's forward: per-head max logit of its SDPA call(s)."""

    def __init__(self, layer: _ArmedLayer) -> None:
        super().__init__()
        self.layer = layer

    def on_attention(self, q, k, *, attn_mask, is_causal, scale):  # noqa: ANN001
        layer = self.layer
        occurrence, layer.calls = layer.calls, layer.calls + 1
        if occurrence != layer.occurrence:
            return
        head_max = attention_max_logit(q, k, attn_mask=attn_mask, is_causal=is_causal, scale=scale).amax(dim=(0, 2))
        layer.step_max = head_max if layer.step_max is None else torch.maximum(layer.step_max, head_max)


class _ArmedLayer:
    """One armed call site: its parameters, the slot of each entry in the factor vector, the measurement."""

    def __init__(self, site: str, location: QKLocation, model: torch.nn.Module, alpha: float) -> None:
        self.site, self.location, self.alpha = site, location, alpha
        module_name, _, occ = site.partition("#")
        self.occurrence = int(occ) if occ else 0
        self.module = get_submodule(model, module_name)
        heads, groups = location.query_heads, location.key_groups
        self.step_max: torch.Tensor | None = None
        self.calls = 0
        self.updates: list[tuple[torch.Tensor, int, torch.Tensor]] = []  # (parameter, dim, slot per local entry)
        by_param: dict[tuple[str, int], list[ParamRows]] = {}
        for rows in location.params:
            by_param.setdefault((rows.name, rows.dim), []).append(rows)
        for (name, dim), entries in by_param.items():
            param = get_parameter(model, name)
            size = param.shape[dim]
            slot = torch.zeros(size, dtype=torch.long)
            for rows in entries:
                base = 1 if rows.role == "q" else 1 + heads
                for h, idx in enumerate(rows.heads):
                    slot[idx] = base + h
            first, count = global_row_offset(param) if dim == 0 else (0, size)
            local = local_tensor(param)
            self.updates.append((param, dim, slot[first:first + count].to(local.device)))
        # MHA: the key group of each query head, for the key's share of gamma
        self.query_of_group = torch.zeros(groups, dtype=torch.long)
        for h, g in enumerate(location.key_of_query):
            self.query_of_group[g] = h
        self.handles: list[Any] = []
        self._mode: _MaxLogitMode | None = None

    def attach(self) -> None:
        if not self.handles:
            self.handles = [self.module.register_forward_pre_hook(self._enter),
                            self.module.register_forward_hook(self._exit, always_call=True)]

    def _enter(self, _module: torch.nn.Module, _args: Any) -> None:
        self.calls = 0
        self._mode = _MaxLogitMode(self)
        self._mode.__enter__()
        self._mode.listen()  # attention computed by hand and reported with record_attention

    def _exit(self, _module: torch.nn.Module, _args: Any, _output: Any) -> None:
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.unlisten()
            mode.__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._exit(self.module, None, None)

    @torch.no_grad()
    def rescale(self, head_max: torch.Tensor, tau: float) -> torch.Tensor:
        """Scale the entries of the heads above ``tau``; returns the per-head gamma (1 = untouched)."""
        gamma = torch.where(head_max > tau, tau / head_max, torch.ones_like(head_max))
        if self.location.shared_keys:
            f_query, f_key = gamma, torch.ones(self.location.key_groups, device=gamma.device)
        else:
            f_query = gamma.pow(self.alpha)
            f_key = gamma[self.query_of_group.to(gamma.device)].pow(1 - self.alpha)
        factors = torch.cat([torch.ones(1, device=gamma.device), f_query, f_key])
        for param, dim, slot in self.updates:
            local = local_tensor(param)
            scale = factors.to(local.dtype)[slot]
            shape = [1] * local.dim()
            shape[dim] = -1
            local.mul_(scale.view(shape))  # entries outside the clipped heads are multiplied by exactly 1
        return gamma


class QKClipper:
    """Locates, arms, measures and clips the attention layers of one model.

    Args:
        model: the module whose attention layers are clipped.
        tau: the largest allowed per-head max logit.
        alpha: the query's share of ``gamma`` (the key gets ``1 - alpha``) when each query
            head has its own key head. Default 0.5.
        overrides: hand-given locations (``QKClipOverride``) by module name.
        all_reduce: cross-rank reduction (max of the per-head maxima; default none).
        layer_names: maps a call site to its reported layer name (``layer_00``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tau: float,
        *,
        alpha: float = 0.5,
        overrides: Sequence[QKClipOverride] = (),
        all_reduce: AllReduce | None = None,
        layer_names: Callable[[str], str] | None = None,
        seed: int = 0,
        hooks_between_probes: bool = True,
    ) -> None:
        self.model, self.tau, self.alpha = model, float(tau), alpha
        # False for a compiled model: the measuring hooks go on only around the eager probe
        # forward (``attach_hooks`` / ``remove_hooks``), never into a compiled graph.
        self.hooks_between_probes = hooks_between_probes
        self.overrides = {o.module: o for o in overrides}
        self._all_reduce = all_reduce
        self.layer_names = layer_names or (lambda site: site)
        self.located: dict[str, QKLocation] = {}
        self.refused: dict[str, str] = {}  # site -> why (reported once)
        self.normalized: dict[str, str] = {}  # site -> the norm that bounds its logits
        self.armed: dict[str, _ArmedLayer] = {}
        self._messages: list[str] = []
        self._generator = torch.Generator().manual_seed(seed)
        self._names: dict[int, str] | None = None
        self._shared: dict[int, list[str]] = {}
        self.reset_interval()

    # -- location (sampled steps) ----------------------------------------------------------
    def wants(self, site: str) -> bool:
        return site not in self.located and site not in self.refused and site not in self.normalized

    def capture(self, q: torch.Tensor, k: torch.Tensor, *, site: str) -> None:
        """Locate an SDPA call's query and key entries from q and k, right away.

        It runs inside the forward, before SDPA: the graph is there, and so are the values
        of the parameters it reaches (FSDP2 frees the unsharded parameters after the forward).
        """
        if not self.wants(site):
            return
        if self._names is None:
            names: dict[int, list[str]] = {}
            for name, param in self.model.named_parameters(remove_duplicate=False):
                names.setdefault(id(param), []).append(canonical_name(name))
            self._names = {pid: ns[0] for pid, ns in names.items()}
            self._shared = {pid: ns for pid, ns in names.items()
                            if len({n.rsplit(".", 2)[0] for n in ns}) > 1}
        # The calling module's parameters as they are registered right now, inside its forward:
        # FSDP2 puts the unsharded parameters (the leaves of q's graph) there only for the forward.
        module_name = site.partition("#")[0]
        prefix = f"{module_name}." if module_name else ""
        local = {id(p): canonical_name(prefix + n) for n, p in get_submodule(self.model, module_name).named_parameters()}
        self._locate(site, q, k, {**self._names, **local})

    def _locate(self, site: str, q: torch.Tensor, k: torch.Tensor, names: dict[int, str]) -> None:
        module = site.partition("#")[0]
        try:
            if module in self.overrides:
                location = self.overrides[module].location()
            else:
                location = locate_qk(q, k, names, module=module, generator=self._generator)
            shared = {n for p in location.params for n in self._shared.get(self._param_id(p.name), [])}
            if shared:
                raise NotClippable(f"its weights are shared with another layer ({', '.join(sorted(shared))})")
            self.located[site] = location
        except NotClippable as err:
            target = self.normalized if err.kind == "normalized" else self.refused
            target[site] = err.reason
            verdict = "needs no clip" if err.kind == "normalized" else "is not clippable"
            self._messages.append(f"stabmon: attention layer {self.layer_names(site)} ({module or 'the model'}) "
                                  f"{verdict}: {err.reason}." + ("" if err.kind == "normalized" else
                                                                 " The LR rungs stay its remedy."))

    def locate_pending(self) -> list[str]:
        """After a sampled forward: check the new locations against each other (weights shared
        between layers) and return the messages of this forward (refusals, once per layer)."""
        self._check_shared_across_layers(self._messages)
        messages, self._messages = self._messages, []
        return messages

    def _param_id(self, name: str) -> int:
        try:
            return id(get_parameter(self.model, name))
        except AttributeError:
            return -1

    def _check_shared_across_layers(self, messages: list[str]) -> None:
        owner: dict[str, str] = {}
        for site, location in list(self.located.items()):
            for name in {p.name for p in location.params}:
                other = owner.setdefault(name, site)
                if other != site:
                    for s in (site, other):
                        if s in self.located:
                            del self.located[s]
                            self.refused[s] = f"its weights are shared with another layer ({name})"
                            messages.append(f"stabmon: attention layer {self.layer_names(s)} is not clippable: "
                                            f"its weights are shared with another layer ({name}).")

    # -- arming and clipping -----------------------------------------------------------------
    def can_arm(self, site: str) -> bool:
        return site in self.located and site not in self.armed

    def arm(self, site: str, step: int, head_max: torch.Tensor | None = None, why: str = "") -> str | None:
        """Start measuring ``site`` every step; clip it now when ``head_max`` (this step's
        per-head max logit) is given. Returns the action's detail, None when it cannot be armed."""
        if not self.can_arm(site):
            return None
        location = self.located[site]
        layer = self.armed[site] = _ArmedLayer(site, location, self.model, self.alpha)
        if self.hooks_between_probes:
            layer.attach()
        detail = (f'armed layer "{self.layer_names(site)}" ({location.module or "the model"}): heads above '
                  f"tau={self.tau:g} are rescaled after every step" + (f"; {why}" if why else ""))
        if head_max is not None:
            self._clip([(layer, head_max)])
        return detail

    def discard(self) -> None:
        """Forget this step's measurements (a skipped step: nothing is rescaled)."""
        for layer in self.armed.values():
            layer.step_max = None

    def apply(self) -> None:
        """After the optimizer step: clip every armed layer measured in this step."""
        measured = [(layer, layer.step_max) for layer in self.armed.values() if layer.step_max is not None]
        for layer, _ in measured:
            layer.step_max = None
        if measured:
            self._clip(measured)

    def _clip(self, measured: list[tuple[_ArmedLayer, torch.Tensor]]) -> None:
        all_reduce = active_all_reduce(self._all_reduce)
        maxima = [m.float() for _, m in measured]
        if all_reduce is not None:  # every rank clips with the same S_h: weights stay identical
            packed = all_reduce(torch.cat(maxima), "max")
            maxima = list(packed.split([m.numel() for m in maxima]))
        for (layer, _), head_max in zip(measured, maxima):
            gamma = layer.rescale(head_max, self.tau)
            clipped = (gamma < 1).sum().float()
            site = layer.site
            self._count[site] = self._count.get(site, 0) + clipped
            self._min_gamma = gamma.min() if self._min_gamma is None else torch.minimum(self._min_gamma, gamma.min())
            self._clipped = self._clipped + clipped

    def attach_hooks(self) -> None:
        for layer in self.armed.values():
            layer.attach()

    def remove_hooks(self) -> None:
        """Take the measuring hooks off the model (end of a fit); the armed layers stay on record."""
        for layer in self.armed.values():
            layer.remove()

    def disarm_all(self) -> None:
        self.remove_hooks()
        self.armed.clear()

    # -- metrics -------------------------------------------------------------------------------
    def reset_interval(self) -> None:
        self._count: dict[str, torch.Tensor] = {}
        self._clipped: torch.Tensor | float = 0.0
        self._min_gamma: torch.Tensor | None = None

    def signals(self, out: SignalSet) -> None:
        """``actions/qk_clip_count`` (head clips in the interval), ``actions/qk_clip_min_gamma``
        (smallest factor, when a head was clipped), ``actions/qk_clip_armed`` and per-layer counts."""
        if not self.armed:
            return
        out.add_host("actions/qk_clip_armed", float(len(self.armed)), op=None)
        if not self._count:
            out.add_host("actions/qk_clip_count", 0.0, op=None)
            return
        total = self._clipped if isinstance(self._clipped, torch.Tensor) else torch.zeros(())
        out.add_max("actions/qk_clip_count", total)  # every rank clips the same heads
        out.add_min("actions/qk_clip_min_gamma", self._min_gamma, defined=total)
        sites = list(self._count)
        out.add_max([f"actions/qk_clip_count/{self.layer_names(s)}" for s in sites],
                    torch.stack([self._count[s] for s in sites]))

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"armed": {site: layer.location.to_dict() for site, layer in self.armed.items()},
                "refused": dict(self.refused), "normalized": dict(self.normalized)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.disarm_all()
        self.refused = dict(state.get("refused", {}))
        self.normalized = dict(state.get("normalized", {}))
        for site, loc in state.get("armed", {}).items():
            location = QKLocation.from_dict(loc)
            self.located[site] = location
            self.armed[site] = _ArmedLayer(site, location, self.model, self.alpha)
            if self.hooks_between_probes:
                self.armed[site].attach()
