"""Training-time sparsity methods, each a ``Sparsifier`` stepped after ``optimizer.step()``.

Masked methods (GMP, Static, SET, RigL, SRigL, SNIP/GraSP/SynFlow, LotteryTicket) work on any model; the
compressed ones (CompressedSET/RigL/SRigL) move the connections of ``SparseLinear`` layers
(``sparsetorch.to_sparse_training``). ``METHODS`` registers them all for the conformance suite.
"""
from .base import Sparsifier
from .compressed import CompressedDST, CompressedRigL, CompressedSET, CompressedSRigL
from .dynamic import SET, DynamicSparsifier, RigL, SRigL
from .gmp import GMP
from .at_init import SNIP, GraSP, SynFlow, grasp_scores, snip_scores, synflow_masks
from .lottery import LotteryTicket, lottery_ticket
from .method_registry import METHODS, make_sparsifier
from .static import Static

__all__ = ["Sparsifier", "GMP", "Static", "DynamicSparsifier", "SET", "RigL", "SRigL", "SNIP", "GraSP", "SynFlow",
           "LotteryTicket", "lottery_ticket", "snip_scores", "grasp_scores", "synflow_masks", "METHODS",
           "make_sparsifier", "CompressedDST", "CompressedSET", "CompressedRigL", "CompressedSRigL"]
