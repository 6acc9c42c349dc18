import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stabmon.curvature import hessian_trace, hvp, preconditioned, top_eigenvalue
from tests.curvature._dense import dense_hessian
from tests.helpers import TinyTransformer


def quadratic(eigenvalues, seed=0):
    """HVP of 0.5 x^T A x with A = Q diag(eigenvalues) Q^T (known spectrum)."""
    n = len(eigenvalues)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return (lambda v: [a @ v[0]]), [torch.zeros(n, dtype=torch.float64)], a


def tiny_models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    yield "mlp", mlp, (lambda out: F.cross_entropy(out, y)), (x,)
    tr = TinyTransformer(vocab=5, dim=8, heads=2, layers=1).double()
    tokens = torch.randint(5, (2, 6))
    targets = torch.randint(5, (2, 6))
    yield "transformer", tr, (lambda out: F.cross_entropy(out.reshape(-1, 5), targets.reshape(-1))), (tokens,)


MODELS = list(tiny_models())
_HESSIANS: dict[str, torch.Tensor] = {}


def hessian_of(case) -> torch.Tensor:
    """Dense Hessian of a case, computed once per test session."""
    name, model, loss_of, inputs = case
    if name not in _HESSIANS:
        _HESSIANS[name] = dense_hessian(model, loss_of, *inputs)
    return _HESSIANS[name]


@pytest.mark.parametrize("case", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("mode,rel", [("autograd", 0.01), ("finite_difference", 0.03)])
@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_matches_dense_hessian(case, mode, rel, method):
    _, model, loss_of, inputs = case
    H = hessian_of(case)
    evals = torch.linalg.eigvalsh(H)
    truth = evals[evals.abs().argmax()].item()
    params = list(model.parameters())
    est = top_eigenvalue(hvp(lambda: loss_of(model(*inputs)), params, mode=mode), params, iters=200, tol=1e-6,
                         method=method)
    assert abs(est.value - truth) <= rel * abs(truth), (est, truth)
    assert est.converged and est.hvps <= 200


def test_lanczos_reaches_one_percent_in_fewer_hvps_than_power():
    # Close top eigenvalues (10 vs 9.5) make power iteration crawl; Lanczos does not care.
    spectrum = [10.0, 9.5, 9.0] + [float(x) for x in torch.linspace(-3, 8, 47)]
    fn, params, _ = quadratic(spectrum)

    def hvps_to_one_percent(method):
        for k in range(1, 200):
            est = top_eigenvalue(fn, params, iters=k, tol=1e-12, method=method, seed=1)
            if abs(est.value - 10.0) <= 0.01 * 10.0:
                return k
        return math.inf

    lanczos, power = hvps_to_one_percent("lanczos"), hvps_to_one_percent("power")
    assert lanczos < power, (lanczos, power)
    assert lanczos <= 15


def test_known_spectrum_and_negative_top():
    fn, params, _ = quadratic([-7.0, 3.0, 1.0, 0.5])
    for method in ("lanczos", "power"):
        est = top_eigenvalue(fn, params, iters=100, tol=1e-8, method=method)
        assert math.isclose(est.value, -7.0, rel_tol=1e-4), (method, est)
    value, hvps = top_eigenvalue(fn, params, iters=100)  # unpacks as (value, hvps)
    assert hvps <= 4  # an exact Krylov space of dimension 4


def test_not_converged_is_reported():
    fn, params, _ = quadratic([10.0, 9.99, 9.98, 1.0])
    est = top_eigenvalue(fn, params, iters=2, tol=1e-9, method="power")
    assert not est.converged and est.hvps == 2


def test_hutchinson_within_three_standard_errors():
    for case in MODELS:
        _, model, loss_of, inputs = case
        H = hessian_of(case)
        params = list(model.parameters())
        est, err = hessian_trace(hvp(lambda: loss_of(model(*inputs)), params), params, samples=64, seed=3)
        assert abs(est - H.trace().item()) <= 3 * err, (est, err, H.trace().item())
        assert err > 0


def test_hutchinson_exact_on_diagonal_and_uses_own_generator():
    d = torch.tensor([1.0, -2.0, 5.0], dtype=torch.float64)
    rng = torch.get_rng_state()
    est, err = hessian_trace(lambda v: [d * v[0]], [torch.zeros(3, dtype=torch.float64)], samples=5)
    assert est == 4.0 and err == 0.0
    assert torch.equal(rng, torch.get_rng_state())


def test_preconditioned_top_eigenvalue_matches_dense():
    _, model, loss_of, inputs = MODELS[0]
    H = hessian_of(MODELS[0])
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(5)
    inv_p = [torch.rand(p.shape, generator=gen, dtype=torch.float64) * 3 + 0.1 for p in params]
    d = torch.cat([x.flatten() for x in inv_p])
    # eigenvalues of P^-1 H equal those of D^1/2 H D^1/2 (similar matrices)
    evals = torch.linalg.eigvalsh(d.sqrt()[:, None] * H * d.sqrt()[None, :])
    truth = evals[evals.abs().argmax()].item()
    dense_nonsym = torch.linalg.eigvals(torch.diag(d) @ H).real
    assert math.isclose(dense_nonsym[dense_nonsym.abs().argmax()].item(), truth, rel_tol=1e-8)
    op = preconditioned(hvp(lambda: loss_of(model(*inputs)), params), [x.sqrt() for x in inv_p])
    est = top_eigenvalue(op, params, iters=100, tol=1e-8)
    assert math.isclose(est.value, truth, rel_tol=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"method": "qr"}, r"`method` must be one of .*'lanczos'.*got 'qr'"), ({"iters": 0}, "`iters`"),
     ({"tol": -1.0}, "`tol`")],
)
def test_bad_arguments(kwargs, match):
    fn, params, _ = quadratic([1.0, 2.0])
    with pytest.raises(ValueError, match=match):
        top_eigenvalue(fn, params, **kwargs)
    with pytest.raises(ValueError, match="`samples`"):
        hessian_trace(fn, params, samples=0)


def test_callback_sees_every_product():
    fn, params, _ = quadratic([4.0, 1.0, 0.5, 0.2, 0.1])
    seen = []
    est = top_eigenvalue(fn, params, iters=10, tol=1e-9, callback=lambda k, v: seen.append((k, v)))
    assert [k for k, _ in seen] == list(range(1, est.hvps + 1)) and seen[-1][1] == est.value


@pytest.mark.parametrize("case", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("vectors", [3, 5])
def test_lanczos_under_a_budget_of_few_vectors_matches_the_dense_hessian(case, vectors):
    """A partial reorthogonalisation (the memory budget of a large model) against the full basis and
    the dense Hessian: the top eigenvalue within 1% of the truth, at a few more products."""
    _, model, loss_of, inputs = case
    evals = torch.linalg.eigvalsh(hessian_of(case))
    truth = evals[evals.abs().argmax()].item()
    params = list(model.parameters())
    fn = hvp(lambda: loss_of(model(*inputs)), params, mode="autograd")
    full = top_eigenvalue(fn, params, iters=200, tol=1e-6)
    budgeted = top_eigenvalue(fn, params, iters=200, tol=1e-6, max_vectors=vectors)
    assert abs(budgeted.value - truth) <= 0.01 * abs(truth), (budgeted, truth)
    assert budgeted.converged and budgeted.hvps <= 4 * full.hvps + 10, (budgeted.hvps, full.hvps)


def test_lanczos_at_the_default_tolerance_keeps_its_accuracy_with_three_vectors():
    """The probe's default tolerance (1e-2) on a spectrum with close top eigenvalues."""
    spectrum = [10.0, 9.5, 9.0] + [float(x) for x in torch.linspace(-3, 8, 197)]
    fn, params, _ = quadratic(spectrum)
    full = top_eigenvalue(fn, params, iters=20, tol=1e-2, seed=1)
    three = top_eigenvalue(fn, params, iters=20, tol=1e-2, seed=1, max_vectors=3)
    assert abs(full.value - 10.0) <= 0.02 * 10.0 and abs(three.value - 10.0) <= 0.02 * 10.0, (full, three)
    with pytest.raises(ValueError, match="`max_vectors` must be at least 3"):
        top_eigenvalue(fn, params, max_vectors=2)
