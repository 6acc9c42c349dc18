import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stabmon.curvature import hvp
from tests.curvature._dense import dense_hessian, flat, unflat
from tests.helpers import TinyTransformer


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def data(dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 3, generator=gen, dtype=dtype), torch.randint(0, 2, (16,), generator=gen)


def rand_vec(params, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


@pytest.mark.parametrize("mode,rtol", [("autograd", 1e-10), ("finite_difference", 1e-5)])
def test_hvp_matches_dense_hessian_on_mlp(mode, rtol):
    model = mlp()
    x, y = data()
    params = list(model.parameters())
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    v = rand_vec(params)
    got = flat(hvp(lambda: F.cross_entropy(model(x), y), params, mode=mode)(v))
    torch.testing.assert_close(got, H @ flat(v), rtol=rtol, atol=rtol * (H @ flat(v)).abs().max().item())


@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_hvp_through_sdpa_on_a_tiny_transformer(mode):
    # torch's default CPU SDPA kernel has no double backward: autograd mode must still work.
    torch.manual_seed(0)
    model = TinyTransformer(vocab=7, dim=8, heads=2, layers=1).double()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(7, (2, 6), generator=gen)
    targets = torch.randint(7, (2, 6), generator=gen)
    params = list(model.parameters())

    def loss_of(out):
        return F.cross_entropy(out.reshape(-1, 7), targets.reshape(-1))

    H = dense_hessian(model, loss_of, tokens)
    v = rand_vec(params)
    got = flat(hvp(lambda: loss_of(model(tokens)), params, mode=mode)(v))
    expected = H @ flat(v)
    tol = 1e-9 if mode == "autograd" else 1e-5
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_finite_difference_agrees_with_autograd_in_float32():
    model = mlp(torch.float32)
    x, y = data(torch.float32)
    params = list(model.parameters())
    v = rand_vec(params)
    exact = flat(hvp(lambda: F.cross_entropy(model(x), y), params)(v))
    approx = flat(hvp(lambda: F.cross_entropy(model(x), y), params, mode="finite_difference")(v))
    assert (approx - exact).norm() / exact.norm() < 1e-2


@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_parameters_grads_and_global_rng_are_left_alone(mode):
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1)).train()
    x = torch.randn(4, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    fn = hvp(lambda: model(x).square().mean(), list(model.parameters()), mode=mode)
    out1 = fn(rand_vec(list(model.parameters())))
    out2 = fn(rand_vec(list(model.parameters())))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    # the same dropout mask in every evaluation: the operator is a fixed (linear) map
    torch.testing.assert_close(flat(out1), flat(out2))


@pytest.mark.parametrize("mode", ["autograd", "finite_difference"])
def test_frozen_parameters_get_zero_rows(mode):
    model = mlp()
    model[0].requires_grad_(False)
    x, y = data()
    params = list(model.parameters())
    out = hvp(lambda: F.cross_entropy(model(x), y), params, mode=mode)(rand_vec(params))
    assert out[0].abs().sum() == 0 and out[1].abs().sum() == 0 and out[2].abs().sum() > 0
    H = dense_hessian(model, lambda o: F.cross_entropy(o, y), x)  # over the trainable ones only
    v = rand_vec(params)
    got = hvp(lambda: F.cross_entropy(model(x), y), params, mode=mode)(v)
    expected = unflat(H @ flat(v[2:]), params[2:])
    for g, e in zip(got[2:], expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_bad_mode_names_the_argument():
    with pytest.raises(ValueError, match=r"`mode` must be one of .*'autograd'.*got 'exact'"):
        hvp(lambda: torch.zeros(()), [torch.zeros(1)], mode="exact")
    with pytest.raises(ValueError, match="`params`"):
        hvp(lambda: torch.zeros(()), [])
