"""What a one-shot run reports: one ``LayerResult`` per pruned layer inside a ``OneshotStats``,
attached to the model as ``model.sparsetorch_stats``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerResult:
    name: str
    sparsity: float
    seconds: float
    damp: float | None = None  # SparseGPT/ALPS: the damping that made H invertible
    rel_error: float | None = None  # ||(W - W')X||^2 / ||WX||^2 on the calibration inputs (when H was collected)
    numel: int = 0
    target: float | None = None  # the sparsity this layer was given (OWL makes it differ per block)
    note: str = ""  # e.g. "no calibration tokens: pruned by magnitude"


@dataclass
class OneshotStats:
    """What a one-shot run did: per-layer results, time, where it ran and its peak memory."""

    method: str
    pattern: str
    mode: str  # "sequential" (block by block), "one-pass" (hooks on every layer), "weights-only" or "out-of-core"
    device: str
    blocks: int = 0
    seconds: float = 0.0
    peak_memory_mb: float = 0.0
    memory_kind: str = ""  # "cuda max allocated" or "process peak RSS"
    distribution: str = "uniform"
    refine: str | None = None
    bits: int | None = None
    outlier_ratios: list[float] = field(default_factory=list)  # OWL: one per block (or layer)
    unrouted: list[str] = field(default_factory=list)  # layers/experts no calibration token reached (on any rank)
    world_size: int = 1  # processes whose calibration shards were pooled (torchrun)
    from_rank0: list[str] = field(default_factory=list)  # layers a rank solved differently: rank 0's result taken
    block_seconds: list[float] = field(default_factory=list)  # out of core: wall time of each block (read, prune, write)
    layers: list[LayerResult] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of weights removed over all pruned layers."""
        total = sum(r.numel for r in self.layers)
        return sum(r.sparsity * r.numel for r in self.layers) / total if total else 0.0

    def to_dict(self) -> dict:
        return asdict(self)
