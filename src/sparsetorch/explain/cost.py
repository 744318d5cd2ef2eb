"""Cost per inference, dense vs sparse: multiply-accumulates, weight bytes moved, energy estimate.

Energy figures (45 nm, 0.9 V) from M. Horowitz, "Computing's energy problem (and what we can
do about it)", ISSCC 2014: 32-bit float multiply 3.7 pJ + add 0.9 pJ; 32-bit read from an 8 KB
SRAM 5 pJ; 32-bit DRAM read 640 pJ. These are order-of-magnitude figures for one process
node, not a measurement of this machine: the result is labelled an estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layer_report import report

__all__ = ["ENERGY_PJ", "CostEstimate", "cost_estimate"]

ENERGY_PJ = {
    "fp32_mac": 3.7 + 0.9,  # multiply + add
    "sram_read_32bit": 5.0,
    "dram_read_32bit": 640.0,
}
SOURCE = "Horowitz, ISSCC 2014 (45 nm): fp32 mult 3.7 pJ, add 0.9 pJ, 8KB SRAM 5 pJ, DRAM 640 pJ per 32-bit access"


@dataclass
class CostEstimate:
    dense_macs: int
    sparse_macs: int
    dense_weight_bytes: int
    sparse_weight_bytes: int
    dense_energy_uj: float
    sparse_energy_uj: float
    source: str = SOURCE
    note: str = "estimate: published per-operation energies, weights read once from DRAM per inference"

    @property
    def energy_ratio(self) -> float:
        return self.dense_energy_uj / self.sparse_energy_uj if self.sparse_energy_uj else float("inf")

    def to_dict(self) -> dict:
        return {**self.__dict__, "energy_ratio": self.energy_ratio}


def _energy_uj(macs: int, weight_bytes: int) -> float:
    """MACs on operands from SRAM, weights streamed once from DRAM; picojoules -> microjoules."""
    pj = macs * (ENERGY_PJ["fp32_mac"] + ENERGY_PJ["sram_read_32bit"]) + weight_bytes / 4 * ENERGY_PJ["dram_read_32bit"]
    return pj / 1e6


def cost_estimate(model: nn.Module, example_inputs: torch.Tensor | tuple) -> CostEstimate:
    """Per-sample MACs and weight bytes (bitmask + values for sparse layers) and the energy estimate."""
    total = report(model, example_inputs).total
    dense_macs, sparse_macs = total.dense_flops // 2, total.sparse_flops // 2
    return CostEstimate(dense_macs, sparse_macs, total.dense_bytes, total.sparse_bytes,
                        _energy_uj(dense_macs, total.dense_bytes), _energy_uj(sparse_macs, total.sparse_bytes))
