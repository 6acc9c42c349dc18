import math

import pytest
import torch
import torch.nn.functional as F

from stabmon import MonitorCore
from stabmon.probes.qk_norm import norm_gains


class _Attention(torch.nn.Module):
    """q and k through a per-head norm (``kind``), rotary-like products, then SDPA."""

    def __init__(self, kind: str, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kind = heads, kind
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        head = dim // heads
        if kind == "layernorm":
            self.q_norm, self.k_norm = torch.nn.LayerNorm(head), torch.nn.LayerNorm(head)
        elif kind == "rmsnorm":
            self.q_norm, self.k_norm = torch.nn.RMSNorm(head), torch.nn.RMSNorm(head)
        elif kind == "by_hand":  # Llama / OLMo style: weight * x * rsqrt(mean(x^2) + eps), over the whole width
            self.q_gain, self.k_gain = torch.nn.Parameter(torch.ones(dim)), torch.nn.Parameter(torch.ones(dim))
        self.register_buffer("cos", torch.rand(head))

    def _norm(self, x: torch.Tensor, role: str) -> torch.Tensor:
        if self.kind in ("layernorm", "rmsnorm"):
            return getattr(self, f"{role}_norm")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        if self.kind == "by_hand":
            q = self.q_gain * (q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6))
            k = self.k_gain * (k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6))
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        q, k = self._norm(q, "q") * self.cos, self._norm(k, "k") * self.cos
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)


@pytest.mark.parametrize("kind,gains", [("layernorm", ("q_norm.weight", "k_norm.weight")),
                                        ("rmsnorm", ("q_norm.weight", "k_norm.weight")),
                                        ("by_hand", ("q_gain", "k_gain")), ("none", ())])
def test_the_gains_are_found_from_the_graph(kind, gains):
    attn = _Attention(kind)
    seen = {}

    def spy(q, k, v, **kwargs):
        seen["q"], seen["k"] = norm_gains(q), norm_gains(k)
        return sdpa(q, k, v, **kwargs)

    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, spy
    try:
        attn(torch.randn(2, 5, 16))
    finally:
        F.scaled_dot_product_attention = sdpa
    params = dict(attn.named_parameters())
    expected = [[params[gains[0]]], [params[gains[1]]]] if gains else [[], []]
    assert [[id(p) for p in seen[r]] for r in ("q", "k")] == [[id(p) for p in e] for e in expected]


def test_the_monitor_emits_the_gain_norms_of_a_qk_layernorm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Attention("layernorm"), _Attention("none"))
    with torch.no_grad():
        model[0].q_norm.weight.mul_(3.0)  # a grown gain
    core = MonitorCore(model, sample_every_n_steps=1, log_every_n_steps=1, all_reduce=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    core.start_step(0)
    loss = model(torch.randn(2, 5, 16)).square().mean()
    core.end_forward()
    core.observe_loss(loss)
    loss.backward()
    core.before_optimizer_step()
    opt.step()
    core.after_optimizer_step()
    metrics = core.end_step()
    assert metrics["attention/q_gain_norm/layer_00"] == pytest.approx(3.0 * math.sqrt(8), rel=1e-6)
    assert metrics["attention/k_gain_norm/layer_00"] == pytest.approx(math.sqrt(8), rel=1e-6)
    assert not any(key.endswith("layer_01") and "gain_norm" in key for key in metrics)  # not normalized
