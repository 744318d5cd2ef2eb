"""Explain the sparsity: which inputs and connections matter (pure analysis; plots live in ``explain.plots``)."""
from .connectivity import LayerConnectivity, connectivity, dead_units
from .dynamics import MaskDynamics, MaskRecorder, mask_dynamics
from .cost import CostEstimate, ENERGY_PJ, cost_estimate
from .importance import critical_connections, feature_importance, top_paths

__all__ = [
    "feature_importance", "critical_connections", "top_paths", "connectivity", "dead_units",
    "LayerConnectivity", "MaskRecorder", "MaskDynamics", "mask_dynamics", "cost_estimate", "CostEstimate", "ENERGY_PJ",
]
