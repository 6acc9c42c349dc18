import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import stabmon
from stabmon.kernels.attention_stats import attention_stats_reference
from stabmon.probes.capture import ForwardCapture, active_capture, record_attention


class Recorder:
    def __init__(self):
        self.attention, self.logits = [], []

    def on_attention(self, q, k, **kw):
        self.attention.append((q, k, kw))

    def on_logits(self, logits, target, **kw):
        self.logits.append((logits, target, kw))


class TwoLayers(nn.Module):
    def __init__(self, mask=None, **sdpa_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.mask, self.sdpa_kwargs = mask, sdpa_kwargs

    def forward(self, x):  # x (B, H, L, 8)
        for layer in self.layers:
            x = layer(x)
            x = F.scaled_dot_product_attention(x, x, x, attn_mask=self.mask, **self.sdpa_kwargs)
        return x


def test_sees_every_sdpa_call_and_names_the_module():
    rec = Recorder()
    model = TwoLayers()
    cap = ForwardCapture(on_attention=rec.on_attention, on_logits=rec.on_logits)
    with cap.watch(model):
        model(torch.randn(2, 2, 5, 8))
        F.cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), ignore_index=1)
    # called twice from TwoLayers.forward itself: two call sites
    assert [kw["module"] for *_, kw in rec.attention] == ["", "#1"]
    assert rec.logits[0][2]["ignore_index"] == 1
    assert active_capture() is None


def test_module_attribution_is_the_innermost_module():
    rec = Recorder()
    outer = nn.Sequential(TwoLayers(), TwoLayers())
    with ForwardCapture(on_attention=rec.on_attention).watch(outer):
        outer(torch.randn(1, 1, 3, 8))
    assert [kw["module"] for *_, kw in rec.attention] == ["0", "0#1", "1", "1#1"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"is_causal": True},
        {"attn_mask": torch.rand(2, 1, 5, 5) > 0.4},
        {"attn_mask": torch.randn(5, 5, dtype=torch.float64)},
        {"scale": 0.3},
    ],
    ids=["causal", "bool", "float", "scale"],
)
def test_arguments_reach_the_probe_exactly(kwargs):
    rec = Recorder()
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    with ForwardCapture(on_attention=rec.on_attention).watch(None):
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True, **kwargs)
    got_q, got_k, kw = rec.attention[0]
    assert got_q is q and got_k is k
    for key, value in kwargs.items():
        assert kw[key] is value or kw[key] == value


def test_result_of_the_watched_call_is_unchanged():
    model = TwoLayers(is_causal=True)
    x = torch.randn(2, 2, 6, 8)
    expected = model(x)
    with ForwardCapture(on_attention=lambda *a, **k: None).watch(model):
        got = model(x)
    assert torch.equal(got, expected)


def test_nothing_is_installed_outside_a_watch():
    model = TwoLayers()
    cap = ForwardCapture(on_attention=lambda *a, **k: None)
    from torch.nn.modules import module as module_state

    before = (len(module_state._global_forward_pre_hooks), len(module_state._global_forward_hooks))
    cap.attach(model)
    assert len(module_state._global_forward_pre_hooks) == before[0] + 1  # two global hooks, none per module
    assert not any(m._forward_pre_hooks for m in model.modules())
    cap.detach()
    cap.detach()  # twice is fine
    assert (len(module_state._global_forward_pre_hooks), len(module_state._global_forward_hooks)) == before
    assert active_capture() is None
    assert torch.overrides._get_current_function_mode_stack() == []


def test_modules_of_another_model_are_not_counted():
    class Attend(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)

    model, other = nn.Sequential(Attend(), Attend()), nn.Sequential(Attend())
    seen = []
    cap = ForwardCapture(on_attention=lambda q, k, **kw: seen.append(kw["module"]))
    with cap.watch(model):
        other(torch.randn(1, 1, 4, 8))  # another model running in the sampled forward: not named
        model(torch.randn(1, 1, 4, 8))
    assert seen == ["", "0", "1"]


def test_hooks_pop_even_when_the_forward_raises():
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(Boom())
    cap = ForwardCapture(on_attention=lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="boom"):
        with cap.watch(model):
            model(torch.zeros(1))
    assert cap.current_module == ""


def test_record_attention_reports_hand_written_attention():
    rec = Recorder()

    class HandAttention(nn.Module):
        def forward(self, q, k):
            stabmon.record_attention(q, k, is_causal=True)
            return q

    model = nn.Sequential()
    model.add_module("attn", HandAttention())
    q = torch.randn(1, 2, 4, 8)
    record_attention(q, q)  # outside a capture: a no-op
    with ForwardCapture(on_attention=rec.on_attention).watch(model):
        model.attn(q, q)
        record_attention(q, q, layer="custom")
    assert [kw["module"] for *_, kw in rec.attention] == ["attn", "custom"]
    assert rec.attention[0][2]["is_causal"] is True


def test_probe_errors_go_through_the_guard():
    seen = []

    def guard(name, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as err:  # noqa: BLE001
            seen.append((name, err))

    def broken(*a, **k):
        raise ValueError("probe bug")

    q = torch.randn(1, 1, 3, 8)
    with ForwardCapture(on_attention=broken, guard=guard).watch(None):
        out = F.scaled_dot_product_attention(q, q, q)
    assert out.shape == q.shape and seen[0][0] == "attention probe"


def test_capture_then_stats_match_reference_through_a_real_forward():
    from stabmon.probes.attention import AttentionProbe

    probe = AttentionProbe()
    mask = torch.rand(1, 1, 6, 6) > 0.5
    mask[..., 0] = True  # no fully masked row
    model = TwoLayers(mask=mask)
    x = torch.randn(1, 3, 6, 8)
    with ForwardCapture(on_attention=probe.observe).watch(model):
        model(x)
        model(x)  # a second forward accumulates into the same layers
    h = model.layers[0](x)
    ref = attention_stats_reference(h.double(), h.double(), attn_mask=mask)
    torch.testing.assert_close(probe.layers["layer_00"].max_logit.double(), ref.max_logit.amax(dim=(0, 2)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probe.layers["layer_00"].entropy_mean.double(), ref.entropy.mean(dim=(0, 2)), atol=1e-5, rtol=1e-5)
    assert list(probe.layers) == ["layer_00", "layer_01"]


@pytest.mark.parametrize("kind", ["mha", "encoder_layer"])
def test_sees_attention_inside_multihead_attention(kind):
    torch.manual_seed(0)
    if kind == "mha":
        model = nn.MultiheadAttention(16, 4, batch_first=True)
        run = lambda x: model(x, x, x, need_weights=False)  # noqa: E731
    else:
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True), 2,
                                      enable_nested_tensor=False)
        run = model
    rec = Recorder()
    cap = ForwardCapture(on_attention=rec.on_attention)
    with cap.watch(model):
        run(torch.randn(2, 5, 16))
    assert len(rec.attention) == (1 if kind == "mha" else 2)
    q, k, kw = rec.attention[0]
    assert q.shape == (2, 4, 5, 4) and k.shape == (2, 4, 5, 4) and q.grad_fn is not None
    assert kw["module"] == ("" if kind == "mha" else "layers.0.self_attn")
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention  # put back
