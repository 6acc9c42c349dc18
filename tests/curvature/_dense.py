"""Ground truth for the curvature tests: dense Hessians of tiny models."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def dense_hessian(model: torch.nn.Module, loss_of_outputs, *inputs) -> torch.Tensor:
    """Full Hessian of ``loss_of_outputs(model(*inputs))`` over the trainable parameters, flattened."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat0 = torch.cat([p.detach().flatten() for _, p in named])

    def f(flat):
        chunks = dict(zip(names, (c.view(s) for c, s in zip(flat.split(sizes), shapes))))
        return loss_of_outputs(torch.func.functional_call(model, chunks, inputs))

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, flat0, vectorize=True)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def unflat(vector: torch.Tensor, like) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(vector[i : i + p.numel()].view_as(p).to(p.dtype))
        i += p.numel()
    return out
