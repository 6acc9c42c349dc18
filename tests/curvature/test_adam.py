import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from stabmon.curvature import adam_preconditioner, hvp, preconditioned, sgd_threshold, top_eigenvalue
from tests.curvature._dense import dense_hessian


def trained(opt_cls, steps=3, **opt_kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (16,))
    opt = opt_cls(model.parameters(), **opt_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_preconditioner_is_read_from_the_optimizer_state(opt_cls, amsgrad):
    model, opt, *_ = trained(opt_cls, lr=0.01, betas=(0.8, 0.99), eps=1e-6, amsgrad=amsgrad)
    pre = adam_preconditioner(opt, list(model.parameters()))
    assert math.isclose(pre.threshold, (2 + 2 * 0.8) / (1 - 0.8))
    p = next(model.parameters())
    state = opt.state[p]
    v = state["max_exp_avg_sq" if amsgrad else "exp_avg_sq"] / (1 - 0.99 ** float(state["step"]))
    torch.testing.assert_close(pre.inv_sqrt_p[0] ** 2, 0.01 / (v.sqrt() + 1e-6))


def test_adam_preconditioned_sharpness_against_dense():
    model, opt, x, y = trained(torch.optim.Adam, lr=0.05)
    params = list(model.parameters())
    pre = adam_preconditioner(opt, params)
    H = dense_hessian(model, lambda out: F.cross_entropy(out, y), x)
    p_inv = torch.cat([s.flatten() ** 2 for s in pre.inv_sqrt_p])
    dense = torch.linalg.eigvals(torch.diag(p_inv) @ H).real  # P^-1 H, not symmetric
    truth = dense[dense.abs().argmax()].item()
    est = top_eigenvalue(preconditioned(hvp(lambda: F.cross_entropy(model(x), y), params), pre.inv_sqrt_p), params,
                         iters=60, tol=1e-8)
    assert math.isclose(est.value, truth, rel_tol=1e-3)


def test_no_preconditioner_before_the_first_step_or_for_other_optimizers():
    model = nn.Linear(2, 1)
    assert adam_preconditioner(torch.optim.Adam(model.parameters()), list(model.parameters())) is None
    model, opt, *_ = trained(torch.optim.SGD, lr=0.1)
    assert adam_preconditioner(opt, list(model.parameters())) is None


def test_sgd_threshold():
    model, opt, *_ = trained(torch.optim.SGD, lr=0.1, momentum=0.5)
    assert sgd_threshold(opt) == (0.1, 3.0)
    assert sgd_threshold(torch.optim.Adam(model.parameters())) is None
