"""QK-clip: locating the query and key entries of every model family, clipping exactly the
heads above tau, refusing what is not linear, and the monitor acting in real fits."""

import math

import pytest
import torch
import torch.nn.functional as F

from stabmon.interventions import InterventionConfig, QKClipOverride, QKClipper
from stabmon.kernels import attention_max_logit
from stabmon.probes.capture import ForwardCapture
from tests.interventions.attention_zoo import FAMILIES, HEADS, NonlinearQ, QKNorm, Stack, grow_logits

SITES = {"torch_multihead_attention": ".mha", "torch_encoder_layer": ".layer.self_attn"}


def tokens(seed=0, b=3, t=8, vocab=32):
    return torch.randint(vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def run_captured(model, clipper, x):
    """A training forward with the clipper seeing every SDPA call; returns {site: (q, k)}."""
    seen = {}

    def on_attention(q, k, *, module, **kw):
        seen[module] = (q, k, kw)
        clipper.capture(q, k, site=module)

    with ForwardCapture(on_attention=on_attention).watch(model):
        loss = model(x).logsumexp(-1).mean()
    return seen, loss


def head_max(seen):
    return {site: attention_max_logit(q, k, **kw).amax(dim=(0, 2)) for site, (q, k, kw) in seen.items()}


def located_rows(location):
    return {(p.name, p.role): p.heads for p in location.params}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_finds_the_rows_of_every_head(family):
    torch.manual_seed(0)
    model = Stack(family)
    clipper = QKClipper(model, tau=1.0)
    run_captured(model, clipper, tokens())
    assert clipper.locate_pending() == []
    suffix = SITES.get(family, "")
    assert sorted(clipper.located) == [f"blocks.0{suffix}", f"blocks.1{suffix}"]
    for i in (0, 1):
        location = clipper.located[f"blocks.{i}{suffix}"]
        block = model.blocks[i]
        assert located_rows(location) == block.expected(prefix=f"blocks.{i}.")
        assert location.query_heads == HEADS
        shared = family in ("llama_gqa_rotary", "qwen_gqa_rotary_bias", "llama_repeat_kv",
                            "fused_kv_repeat_interleave")
        assert location.shared_keys == shared
        assert location.key_of_query == ([0, 0, 1, 1] if shared else [0, 1, 2, 3])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_clip_sets_the_head_max_to_tau_and_touches_nothing_else(family):
    torch.manual_seed(1)
    model = Stack(family)
    grow_logits(model)
    x = tokens(seed=2)
    clipper = QKClipper(model, tau=1.0)
    seen, _ = run_captured(model, clipper, x)
    clipper.locate_pending()
    site = sorted(clipper.located)[0]
    before_max = head_max(seen)[site]
    tau = float(before_max.sort().values[1]) * 0.999  # heads above the second smallest are clipped
    clipper.tau = tau
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clipper.arm(site, step=0, head_max=before_max)
    clipped = before_max > tau
    assert 0 < int(clipped.sum()) < HEADS
    # On the same batch, the clipped heads now peak exactly at tau; the others did not move.
    with torch.no_grad():
        seen_after, _ = run_captured(model, QKClipper(model, tau=tau), x)
    after_max = head_max(seen_after)[site]
    torch.testing.assert_close(after_max[clipped], torch.full_like(after_max[clipped], tau), rtol=1e-4, atol=0)
    assert torch.equal(after_max[~clipped], before_max[~clipped])
    # Parameters: only the clipped heads' query / key entries changed; V rows, other heads,
    # other layers and every other parameter are bit-identical.
    location = clipper.located[site]
    changed_entries = {}
    for rows in location.params:
        heads = [h for h in range(HEADS) if clipped[h]] if rows.role == "q" else sorted(
            {location.key_of_query[h] for h in range(HEADS) if clipped[h]})
        if rows.role == "k" and location.shared_keys:
            heads = []  # shared key heads are never touched: all of gamma goes on the query
        changed_entries.setdefault(rows.name, set()).update(i for h in heads for i in rows.heads[h])
    for name, p in model.named_parameters():
        unchanged = torch.ones(p.shape[0], dtype=torch.bool)
        for i in changed_entries.get(name, ()):
            unchanged[i] = False
        assert torch.equal(p.detach()[unchanged], before[name][unchanged]), name
        if (~unchanged).any():
            assert not torch.equal(p.detach()[~unchanged], before[name][~unchanged]), name


def test_a_nonlinear_query_is_refused_with_the_reason():
    model = Stack("nanogpt_fused_c_attn")
    model.blocks[0] = NonlinearQ()
    clipper = QKClipper(model, tau=1.0)
    run_captured(model, clipper, tokens())
    messages = clipper.locate_pending()
    assert "blocks.0" in clipper.refused and "blocks.1" in clipper.located
    assert "TanhBackward0" in clipper.refused["blocks.0"] and "not linear" in clipper.refused["blocks.0"]
    assert any("is not clippable" in m and "LR rungs" in m for m in messages)
    assert clipper.arm("blocks.0", step=0) is None


def test_weights_shared_with_another_layer_are_refused():
    model = Stack("llama_gqa_rotary", shared=True)  # both blocks are the same module
    clipper = QKClipper(model, tau=1.0)
    run_captured(model, clipper, tokens())
    clipper.locate_pending()
    assert not clipper.located
    assert all("shared with another layer" in why for why in clipper.refused.values())


def test_qk_layernorm_needs_no_clip():
    model = Stack("nanogpt_fused_c_attn")
    model.blocks[1] = QKNorm()
    clipper = QKClipper(model, tau=1.0)
    run_captured(model, clipper, tokens())
    messages = clipper.locate_pending()
    assert "blocks.1" in clipper.normalized and "NativeLayerNormBackward0" in clipper.normalized["blocks.1"]
    assert any("needs no clip" in m for m in messages)


def test_a_hand_given_location_overrides_the_graph():
    model = Stack("nanogpt_fused_c_attn")
    model.blocks[0] = NonlinearQ()  # refused automatically, clipped by hand
    rows = tuple(tuple(range(4 * h, 4 * h + 4)) for h in range(HEADS))
    override = QKClipOverride("blocks.0", query=(("blocks.0.c_attn.weight", rows),),
                              key=(("blocks.0.c_attn.weight", tuple(tuple(i + 16 for i in r) for r in rows)),))
    clipper = QKClipper(model, tau=1.0, overrides=[override])
    run_captured(model, clipper, tokens())
    clipper.locate_pending()
    assert located_rows(clipper.located["blocks.0"])[("blocks.0.c_attn.weight", "q")] == [list(r) for r in rows]
    with pytest.raises(ValueError, match="`query` must hold"):
        QKClipOverride("blocks.0", query=(), key=())


def test_armed_layers_are_measured_every_step_and_clipped_after_it():
    torch.manual_seed(3)
    model = Stack("llama_gqa_rotary")
    grow_logits(model, factor=20.0)
    clipper = QKClipper(model, tau=2.0)
    run_captured(model, clipper, tokens())
    clipper.locate_pending()
    for site in sorted(clipper.located):
        clipper.arm(site, step=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # weights move only by the clip
    for step in range(3):
        loss = model(tokens(seed=step)).logsumexp(-1).mean()  # an ordinary step: no capture
        loss.backward()
        opt.step()
        clipper.apply()
    seen, _ = run_captured(model, QKClipper(model, tau=2.0), tokens(seed=2))
    for site, m in head_max(seen).items():
        assert float(m.max()) <= 2.0 * (1 + 1e-4), (site, m)  # the last batch's heads sit at or below tau
    out = __import__("stabmon.signals", fromlist=["SignalSet"]).SignalSet()
    clipper.signals(out)
    values = out.reduce()
    assert values["actions/qk_clip_armed"] == 2 and values["actions/qk_clip_count"] > 0
    assert 0 < values["actions/qk_clip_min_gamma"] < 1
    clipper.disarm_all()
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_state_round_trip_rearms_by_name():
    model = Stack("fused_kv_repeat_interleave")
    clipper = QKClipper(model, tau=1.0)
    run_captured(model, clipper, tokens())
    clipper.locate_pending()
    clipper.arm("blocks.1", step=0)
    state = clipper.state_dict()
    assert list(state["armed"]) == ["blocks.1"]
    assert {p["name"] for p in state["armed"]["blocks.1"]["params"]} == {"blocks.1.q.weight", "blocks.1.q.bias",
                                                                          "blocks.1.kv.weight", "blocks.1.kv.bias"}
    fresh = QKClipper(model, tau=1.0)
    fresh.load_state_dict(torch.load(_save(state), weights_only=True))
    assert list(fresh.armed) == ["blocks.1"]
    model(tokens())
    assert fresh.armed["blocks.1"].step_max is not None  # measuring again


def _save(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_config_checks_its_arguments():
    assert InterventionConfig().qk_clip_tau == 80.0 and InterventionConfig(qk_clip_tau=None).qk_clip_tau is None
    with pytest.raises(ValueError, match="`qk_clip_tau`"):
        InterventionConfig(qk_clip_tau=0)
    with pytest.raises(ValueError, match="`qk_clip_alpha`"):
        InterventionConfig(qk_clip_alpha=1.5)
    with pytest.raises(ValueError, match="`qk_clip_overrides`"):
        InterventionConfig(qk_clip_overrides=("blocks.0",))
    with pytest.raises(ValueError, match="`lr_cut_factor`"):
        InterventionConfig(lr_cut_factor=1.0)
    assert math.isclose(F.softmax(torch.zeros(2), 0)[0].item(), 0.5)


def test_a_learned_factor_on_q_is_not_scaled_and_a_frozen_bias_is_refused():
    from stabmon.interventions.qk_locate import NotClippable, locate_qk

    proj = torch.nn.Linear(8, 16)
    temperature = torch.nn.Parameter(torch.full((1, 2, 1, 1), 1.5))  # a learned per-head scale on q
    x = torch.randn(1, 3, 8)
    q, k = proj(x).view(1, 3, 2, 2, 4).permute(2, 0, 3, 1, 4)
    names = {id(proj.weight): "proj.weight", id(proj.bias): "proj.bias", id(temperature): "temperature"}
    location = locate_qk(q * temperature, k, names)
    assert {p.name for p in location.params} == {"proj.weight", "proj.bias"}  # the factor stays as it is
    proj.bias.requires_grad_(False)
    q, k = proj(x).view(1, 3, 2, 2, 4).permute(2, 0, 3, 1, 4)
    with pytest.raises(NotClippable, match="frozen bias|constant"):
        locate_qk(q, k, names)
    gated = torch.nn.Linear(8, 16)
    q, k = gated(x).view(1, 3, 2, 2, 4).permute(2, 0, 3, 1, 4)
    names = {id(gated.weight): "gated.weight", id(gated.bias): "gated.bias"}
    with pytest.raises(NotClippable, match="function of its own weight"):
        locate_qk(q * torch.sigmoid(q), k, names)  # a gate computed from q itself
    with pytest.raises(NotClippable, match="product of two projections"):
        locate_qk(q * q, k, names)


def test_attention_reported_by_hand_is_located_and_measured_every_step():
    import stabmon

    class ByHand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (z.view(b, t, HEADS, 4).transpose(1, 2) for z in self.qkv(x).split(16, dim=2))
            stabmon.record_attention(q, k)
            att = ((q @ k.transpose(-2, -1)) * 0.5).softmax(-1)
            return (att @ v).transpose(1, 2).reshape(b, t, 16)

    model = torch.nn.Sequential(torch.nn.Embedding(32, 16), ByHand())
    clipper = QKClipper(model, tau=1e-3)
    run_captured(model, clipper, tokens())
    clipper.locate_pending()
    assert list(clipper.located) == ["1"]
    clipper.arm("1", step=0)
    model(tokens())  # an ordinary step: no capture, the armed layer still hears record_attention
    assert clipper.armed["1"].step_max is not None
