"""Optimizer parameter groups for sparse training from scratch on SparseLinear layers.

A kept weight of a layer at density d has d * in inputs beside it instead of in. For Adam-type optimizers,
whose per-weight step is about lr whatever the gradient's scale, a layer's output moves by about
lr * fan_in per step on a consistent gradient, so the step that suits the dense layer is 1/d too small for the
sparse one: the fan-in rule of maximal-update parametrisation (Yang et al. 2021, muP: Adam's hidden-layer LR
is proportional to 1 / fan_in) applied to the kept fan-in. Measured on the byte-level GPT (docs/training.md):
with the dense model's tuned LR for everything, RigL at 90% FFN sparsity ended 0.29 nats/byte behind dense
(0.20 with rows rescaled at init, ``to_sparse_training(rescale=True)``); with the rescaled rows and the FFN
values at lr / density (10x) it ended 0.06 ahead of dense.
"""
from __future__ import annotations

from torch import nn

from ..errors import SparsityError
from .sparse_linear import SparseLinear


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups for ``torch.optim.AdamW(param_groups(model, lr, wd))`` (or Adam, ...).

    Every SparseLinear's ``values`` get their own group with ``lr / density`` and ``weight_decay * density``
    (AdamW's decoupled decay shrinks a weight by lr * weight_decay per step: that product stays the dense
    model's). Every other parameter (dense layers, biases, norms, embeddings) is in the first group with
    ``lr`` and ``weight_decay`` unchanged. LR schedulers scale each group's own LR, so they work as usual.
    """
    if lr <= 0 or weight_decay < 0:
        raise SparsityError(f"need lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
    sparse = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseLinear)]
    if not sparse:
        raise SparsityError("the model has no SparseLinear layer: call sparsetorch.to_sparse_training(model) "
                            "first, or build the optimizer from model.parameters()")
    values = {id(m.values) for _, m in sparse}
    groups = [{"params": [p for p in model.parameters() if id(p) not in values], "lr": lr,
               "weight_decay": weight_decay, "name": "dense"}]
    for name, m in sparse:
        groups.append({"params": [m.values], "lr": lr / m.density, "weight_decay": weight_decay * m.density,
                       "name": f"{name}.values"})
    return [g for g in groups if g["params"]]
