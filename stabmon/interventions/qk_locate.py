"""Find the query and key weights of an attention layer from the autograd graph of its q and k.

QK-clip rescales, for one head, the parameter entries its queries and keys are made of.
Which entries those are depends on the model: nanoGPT's fused ``c_attn`` holds q, k and v
rows in one matrix, Llama keeps ``q_proj`` / ``k_proj`` apart and shares key heads between
query heads, ``nn.MultiheadAttention`` slices a packed ``in_proj_weight``. Nothing is
assumed about the layout; the tensors that reach SDPA tell it:

1. **Walk the graph** of ``q`` (and ``k``) back to the leaf parameters, accepting only ops
   that keep q linear in the weight: matmuls (through their weight operand; the other
   operand is the layer's input and is not followed), bias adds, views / reshapes /
   transposes / permutes / splits / chunks / unbinds / slices / selects / clones /
   concatenations, expand or repeat_interleave (grouped-query attention), dtype casts, and
   products or quotients with a factor that does not depend on the weight (rotary
   embeddings, a constant scale). A normalization on the way (qk-layernorm, RMSNorm) means
   the logits are bounded by its gains and need no clip; any other op is refused.
2. **Find the rows** that feed each head: the gradient of ``<g_h, q>`` for a random ``g_h``
   that lives on head ``h`` only is non-zero exactly on the parameter entries (rows of a
   matrix, entries of a bias; columns where a matrix is stored input-major) that head ``h``
   reads. Heads must read disjoint entries, and queries and keys disjoint entries too.
3. **Check on the real activations** that the head's q is homogeneous in those entries, so
   that scaling them by ``gamma`` scales the head's q by ``gamma``: Euler's identity
   ``<grad, theta> = <g_h, q_h>`` must hold (it fails when something is added that does not
   scale: a residual, a frozen bias, a constant).

Example:
    >>> attn = torch.nn.Linear(8, 24, bias=False)          # fused q, k, v for 2 heads of 4
    >>> x = torch.randn(1, 3, 8)
    >>> q, k, _ = attn(x).view(1, 3, 3, 2, 4).permute(2, 0, 3, 1, 4)
    >>> loc = locate_qk(q, k, {id(attn.weight): "attn.weight"}, generator=torch.Generator().manual_seed(0))
    >>> [(p.name, p.role, p.heads[1][:2]) for p in loc.params]
    [('attn.weight', 'q', [4, 5]), ('attn.weight', 'k', [12, 13])]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["NotClippable", "ParamRows", "QKLocation", "locate_qk"]

# Ops that pass their input through linearly (one or several tensor inputs, each linear).
_STRUCTURAL = {
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AsStridedBackward0", "AliasBackward0",
    "TransposeBackward0", "TransposeBackward1", "TBackward0", "PermuteBackward0",
    "SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "ChunkBackward0", "UnsafeSplitBackward0",
    "SliceBackward0", "SelectBackward0", "NarrowBackward0", "IndexBackward0", "IndexSelectBackward0",
    "GatherBackward0", "CloneBackward0", "ExpandBackward0", "RepeatBackward0", "UnsqueezeBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "CatBackward0",
    "StackBackward0", "ToCopyBackward0", "NegBackward0", "ViewAsRealBackward0", "ViewAsComplexBackward0",
    "ConjBackward0", "FlipBackward0", "RollBackward0", "MulBackward1", "DivBackward1", "ContiguousBackward0",
    "UnflattenBackward0", "FlattenBackward0", "RepeatInterleaveBackward0", "PadBackward0",
    "ConstantPadNdBackward0",
}
_ADDITIVE = {"AddBackward0", "SubBackward0"}  # both operands must be linear in the weights
_MATMUL = {"MmBackward0", "BmmBackward0", "MvBackward0", "MatmulBackward0", "AddmmBackward0", "BaddbmmBackward0",
           "AddmvBackward0", "LinearBackward0"}
_NORMS = ("LayerNorm", "RmsNorm", "RMSNorm", "GroupNorm", "Rsqrt", "NormBackward", "LinalgVectorNorm")
# Ops a weight operand may pass through on its way to a matmul (transposes, casts, slices).
_WEIGHT_PATH = {"TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0", "ExpandBackward0",
                "ReshapeAliasBackward0", "SliceBackward0", "SelectBackward0", "UnsqueezeBackward0",
                "ToCopyBackward0", "AliasBackward0", "UnsafeViewBackward0", "SplitBackward0",
                "SplitWithSizesBackward0", "ChunkBackward0", "UnbindBackward0", "NarrowBackward0"}


class NotClippable(Exception):
    """The layer's q or k is not a linear function of a weight (or it needs no clip).

    ``kind`` is ``"normalized"`` (qk-layernorm: the logits are bounded by the norm gains) or
    ``"refused"`` (a nonlinearity, a shared weight, rows that overlap, ...).
    """

    def __init__(self, reason: str, kind: str = "refused") -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


@dataclass
class ParamRows:
    """The entries of one parameter that feed each head of q (``role="q"``) or k (``"k"``).

    ``heads[h]`` lists the indices along ``dim`` (rows of a weight, entries of a bias) that
    head ``h`` reads; for keys, ``h`` counts the key heads SDPA sees.
    """

    name: str
    role: str
    dim: int
    heads: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QKLocation:
    """Where one attention call site's queries and keys come from.

    ``query_heads`` and ``key_heads`` count the heads of q and k at SDPA;
    ``key_of_query[h]`` is the index of the distinct key weights query head ``h`` uses,
    and ``shared_keys`` is True when some key weights serve several query heads
    (grouped-query attention), whichever way SDPA was given them.
    """

    module: str
    query_heads: int
    key_groups: int
    key_of_query: list[int]
    params: list[ParamRows] = field(default_factory=list)

    @property
    def shared_keys(self) -> bool:
        return self.key_groups < self.query_heads

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "query_heads": self.query_heads, "key_groups": self.key_groups,
                "key_of_query": list(self.key_of_query), "params": [p.to_dict() for p in self.params]}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> QKLocation:
        params = [ParamRows(p["name"], p["role"], int(p["dim"]), [list(map(int, h)) for h in p["heads"]])
                  for p in state["params"]]
        return cls(state["module"], int(state["query_heads"]), int(state["key_groups"]),
                   [int(i) for i in state["key_of_query"]], params)


def _leaf(node: Any) -> torch.Tensor | None:
    return getattr(node, "variable", None)


def _weight_operand(node: Any) -> torch.Tensor | None:
    """The parameter a matmul operand is, through transposes / views / casts; None for an activation."""
    while node is not None:
        leaf = _leaf(node)
        if leaf is not None:
            return leaf
        if type(node).__name__ not in _WEIGHT_PATH:
            return None
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


def _reaches(node: Any, targets: set[int], seen: set[int]) -> bool:
    """True when ``node``'s graph reaches one of the leaves ``targets`` (by id), through any op."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        leaf = _leaf(n)
        if leaf is not None and id(leaf) in targets:
            return True
        stack.extend(m for m, _ in n.next_functions)
    return False


def _refusal(name: str, what: str) -> NotClippable:
    if any(tag in name for tag in _NORMS):
        return NotClippable(f"{what} passes through a normalization ({name}, e.g. qk-layernorm): its logits are "
                            "bounded by the norm gains and need no clip (they still grow as the gains grow: the "
                            "layer's signals stay watched, and its findings go to the LR rungs)", kind="normalized")
    return NotClippable(f"{what} passes through {name}, which is not linear in the weight")


def _walk(node: Any, what: str, memo: dict[int, frozenset[int]], leaves: dict[int, torch.Tensor],
          projections: set[int]) -> frozenset[int]:
    """Ids of the leaf parameters that ``node`` is linear in; raises NotClippable otherwise.

    ``projections`` collects the ids of the leaves reached as a matmul's weight operand: a
    branch holding one is the projection, a branch without one is a factor (a learned scale,
    a bias of the factor) that is left alone.
    """
    if node is None:
        return frozenset()
    key = id(node)
    if key in memo:
        return memo[key]
    leaf = _leaf(node)
    name = type(node).__name__
    if leaf is not None:
        leaves[id(leaf)] = leaf
        found = frozenset({id(leaf)})
    elif name in _MATMUL:
        operands = [n for n, _ in node.next_functions]
        with_bias = name in ("AddmmBackward0", "BaddbmmBackward0", "AddmvBackward0")
        if with_bias and operands[0] is None:
            raise NotClippable(f"{what} has a constant (a frozen bias) added to it ({name}): scaling the weight "
                               "would not scale it")
        bias = operands[0] if with_bias else None
        mats = operands[1:] if with_bias else operands
        weights = [w for w in (_weight_operand(m) for m in mats if m is not None) if w is not None]
        if len(weights) != 1:
            raise NotClippable(f"{what} is a product of two activations ({name}): no single weight to scale"
                               if not weights else f"{what} is a product of two weights ({name})")
        leaves[id(weights[0])] = weights[0]
        projections.add(id(weights[0]))
        found = frozenset({id(weights[0])})
        if bias is not None:
            found |= _walk(bias, what, memo, leaves, projections)
    elif name in _STRUCTURAL:
        found = frozenset().union(*(_walk(n, what, memo, leaves, projections) for n, _ in node.next_functions)) \
            if node.next_functions else frozenset()
    elif name in _ADDITIVE:
        branches = [n for n, _ in node.next_functions]
        if any(n is None for n in branches):
            raise NotClippable(f"{what} has a constant added to it ({name}): scaling the weight would not scale it")
        found = frozenset().union(*(_walk(n, what, memo, leaves, projections) for n in branches))
    elif name in ("MulBackward0", "DivBackward0"):
        branches = [n for n, _ in node.next_functions]
        linear: list[frozenset[int]] = []
        errors: list[NotClippable] = []
        for n in branches[:1] if name == "DivBackward0" else branches:
            if n is None:
                continue
            try:
                linear.append(_walk(n, what, memo, leaves, projections))
            except NotClippable as err:
                errors.append(err)
                linear.append(frozenset())
        weighted = [s for s in linear if s & projections]
        if not weighted:
            raise errors[0] if errors else NotClippable(f"{what} does not depend on a trainable weight")
        if len(weighted) > 1:
            raise NotClippable(f"{what} is a product of two projections ({name}): not linear in one weight")
        found = weighted[0]
        factors = [n for n in branches if n is not None]
        others = [n for n, s in zip(factors, linear) if not s & projections] if name == "MulBackward0" \
            else branches[1:]
        for other in others:  # the factor must not depend on the weight itself (q * f(q) is not linear)
            if other is not None and _reaches(other, set(found), set()):
                raise NotClippable(f"{what} is multiplied or divided by a function of its own weight ({name})")
    else:
        raise _refusal(name, what)
    memo[key] = found
    return found


def _supports(out: torch.Tensor, leaves: list[torch.Tensor], heads: int, generator: torch.Generator,
              what: str) -> list[list[torch.Tensor]]:
    """Per head, the gradient of ``<g_h, out>`` on each leaf (zero outside what the head reads)."""
    per_head = []
    for h in range(heads):
        g = torch.zeros_like(out, dtype=torch.float32)
        g[:, h] = torch.randn(g[:, h].shape, generator=generator, device=out.device)
        g = g.to(out.dtype)
        try:
            grads = torch.autograd.grad(out, leaves, grad_outputs=g, retain_graph=True, allow_unused=True)
        except RuntimeError as err:
            if "second time" in str(err) or "freed" in str(err):
                raise NotClippable("the autograd graph of q and k is gone (locate before the backward)") from err
            raise
        grads = [torch.zeros_like(leaf) if gr is None else gr for leaf, gr in zip(leaves, grads)]
        products = g.double() * out.detach().double()
        lhs = products.sum()
        rhs = sum((gr.double() * leaf.detach().double()).sum() for gr, leaf in zip(grads, leaves))
        scale = products.abs().sum().clamp_min(1e-30)
        tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 2e-2
        if not abs(float(lhs - rhs)) <= tol * float(scale):
            raise NotClippable(f"{what} head {h} does not scale with its weights (something is added to it that "
                               f"scaling the weights would not scale: <g, q> = {float(lhs):.6g}, "
                               f"<grad, theta> = {float(rhs):.6g})")
        per_head.append(grads)
    return per_head


def _index_sets(grads: list[torch.Tensor], dim: int) -> list[frozenset[int]]:
    out = []
    for g in grads:
        moved = g.detach().movedim(dim, 0).reshape(g.shape[dim], -1)
        out.append(frozenset((moved != 0).any(dim=1).nonzero().flatten().tolist()))
    return out


def _rows(leaf: torch.Tensor, per_head: list[torch.Tensor], repeats: bool = False) -> tuple[int, list[list[int]]] | None:
    """``(dim, indices per head)`` along which the heads read disjoint entries of ``leaf``.

    With ``repeats`` (keys), heads that read exactly the same entries are copies of one key
    head (grouped-query attention with the keys repeated before SDPA) and count once.
    """
    for dim in range(min(leaf.dim(), 2)):
        sets = _index_sets(per_head, dim)
        used = list(dict.fromkeys(s for s in sets if s)) if repeats else [s for s in sets if s]
        if not used:
            return None
        if sum(len(s) for s in used) == len(frozenset().union(*used)):
            return dim, [sorted(s) for s in sets]
    return None


def locate_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    names: dict[int, str],
    *,
    module: str = "",
    generator: torch.Generator | None = None,
) -> QKLocation:
    """Locate the query and key entries of every head of one SDPA call.

    Args:
        q: the query tensor given to SDPA ``(B, H, Lq, D)``, with its autograd graph.
        k: the key tensor ``(B, Hk, Lk, D)``.
        names: ``id(parameter) -> qualified name`` for the model's parameters.
        module: the module that made the call (reported, and kept for resume).
        generator: the generator of the random probes (the monitor's own).

    Raises:
        NotClippable: q or k is not linear in a weight, heads or q and k share entries, a
            weight has no name in the model, or the layer is normalized (``kind="normalized"``).
    """
    generator = generator or torch.Generator(device=q.device).manual_seed(0)
    if generator.device != q.device:
        generator = torch.Generator(device=q.device).manual_seed(int(torch.randint(2**31, size=[1], generator=generator)))
    if q.grad_fn is None or k.grad_fn is None:
        raise NotClippable("q or k does not depend on a trainable weight (no autograd graph)")
    location = QKLocation(module, q.shape[1], 0, [])
    key_sets: list[frozenset[tuple[str, int, int]]] = []
    taken: dict[tuple[str, int], set[int]] = {}  # (param, dim) -> indices already used by a head
    for role, tensor in (("q", q), ("k", k)):
        what = "the query" if role == "q" else "the key"
        leaves_by_id: dict[int, torch.Tensor] = {}
        found = _walk(tensor.grad_fn, what, {}, leaves_by_id, set())
        if not found:
            raise NotClippable(f"{what} does not depend on a trainable weight")
        leaves = [leaves_by_id[i] for i in sorted(found)]
        unnamed = [tuple(leaf.shape) for leaf in leaves if id(leaf) not in names]
        if unnamed:
            raise NotClippable(f"{what} comes from a tensor that is not a parameter of the model (shape {unnamed[0]})")
        per_head = _supports(tensor, leaves, tensor.shape[1], generator, what)
        head_keys: list[set[tuple[str, int, int]]] = [set() for _ in range(tensor.shape[1])]
        for i, leaf in enumerate(leaves):
            name = names[id(leaf)]
            located = _rows(leaf, [grads[i] for grads in per_head], repeats=role == "k")
            if located is None:
                raise NotClippable(f"the heads of {what} read overlapping entries of {name}")
            dim, heads = located
            if role == "q":
                used = taken.setdefault((name, dim), set())
                for idx in heads:
                    used.update(idx)
            else:
                # keys may repeat (GQA expanded before SDPA): identical sets are one shared key head
                overlap = taken.get((name, dim), set())
                if any(overlap.intersection(idx) for idx in heads):
                    raise NotClippable(f"the query and the key read the same entries of {name}")
            location.params.append(ParamRows(name, role, dim, heads))
            for h, idx in enumerate(heads):
                head_keys[h].update((name, dim, j) for j in idx)
        if role == "k":
            key_sets = [frozenset(s) for s in head_keys]
    distinct = list(dict.fromkeys(key_sets))
    for a in range(len(distinct)):
        for b in range(a + 1, len(distinct)):
            if distinct[a] & distinct[b]:
                raise NotClippable("key heads read overlapping but different entries of their weights")
    group_of_key = [distinct.index(s) for s in key_sets]
    heads, key_heads = q.shape[1], k.shape[1]
    location.key_groups = len(distinct)
    location.key_of_query = [group_of_key[h // (heads // key_heads)] for h in range(heads)]
    # Key params: one entry per distinct key group (repeated key heads collapse into one).
    for p in location.params:
        if p.role == "k":
            seen: dict[int, list[int]] = {}
            for h, idx in enumerate(p.heads):
                seen.setdefault(group_of_key[h], idx)
            p.heads = [seen.get(g, []) for g in range(len(distinct))]
    return location
