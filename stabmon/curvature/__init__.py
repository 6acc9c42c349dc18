"""Curvature from Hessian-vector products: HVPs, top eigenvalue, trace, Adam preconditioning."""

from stabmon.curvature.adam import AdamPreconditioner, adam_preconditioner, sgd_threshold
from stabmon.curvature.eigen import EigenEstimate, TraceEstimate, hessian_trace, preconditioned, top_eigenvalue
from stabmon.curvature.hessian_vector import hvp

__all__ = [
    "AdamPreconditioner",
    "EigenEstimate",
    "TraceEstimate",
    "adam_preconditioner",
    "hessian_trace",
    "hvp",
    "preconditioned",
    "sgd_threshold",
    "top_eigenvalue",
]
