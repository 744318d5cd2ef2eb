"""How the library reads a model's forward: the one torch.fx tracer, the one table of activations, and hooks
that last for one block (``hooked``).

Used by fusion (``inference``), the edge exporter (``export``) and structured shrinking (``shrink``).
"""
from .activations import (ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, ACTIVATION_MODULES, activation_of,
                          module_activation)
from .fx_walk import TraceFailed, trace
from .hooks import hooked

__all__ = ["trace", "TraceFailed", "hooked", "activation_of", "module_activation", "ACTIVATION_MODULES",
           "ACTIVATION_FUNCTIONS", "ACTIVATION_METHODS"]
