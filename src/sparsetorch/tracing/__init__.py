"""How the library reads a model's forward: the one torch.fx tracer and the one table of activations.

Used by fusion (``inference``), the edge exporter (``export``) and structured shrinking (``shrink``).
"""
from .activations import (ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES, activation_of,
                          module_activation)
from .fx_walk import TraceFailed, trace

__all__ = ["trace", "TraceFailed", "activation_of", "module_activation", "ACTIVATION_MODULES",
           "ACTIVATION_FUNCTIONS", "ACTIVATION_METHODS"]
