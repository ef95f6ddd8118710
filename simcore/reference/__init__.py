"""Plain-PyTorch references: the specification of each compiled kernel.

Short, obviously right, never optimised, and float64-capable. Tests compare
the kernels against these; ``simcore.set_backend("reference")`` runs them
instead of the kernels.
"""
from simcore.reference.cosine_topk import cosine_topk
from simcore.reference.margin_softmax import SIN_EPS, margin_softmax_loss, margin_target
from simcore.reference.row_optimizer import row_adamw_, row_sgd_

__all__ = ["cosine_topk", "margin_softmax_loss", "margin_target", "SIN_EPS", "row_sgd_", "row_adamw_"]
