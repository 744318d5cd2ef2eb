"""Ready-made pipelines that string the library's parts together.

``recover`` (one-shot prune -> distil / sparse LoRA / fine-tune -> save, with a summary table) and ``fit``
(the small training loop the demos and benchmarks use).
"""
from __future__ import annotations

from .prune_and_recover import RecoveryReport, recover
from .training_loop import fit

__all__ = ["recover", "RecoveryReport", "fit"]
