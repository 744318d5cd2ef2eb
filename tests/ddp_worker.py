"""A sparsifier that moves masks at random, and the worker that ``torchrun`` launches in test_ddp.py.

``SwapSparsifier`` checks the training machinery (resume, DDP, callbacks, compile) without
depending on any particular method: every ``every`` steps it swaps a fraction of each layer's
kept connections with pruned ones, drawing every choice from its generator.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from sparsetorch.sparsifiers.base import Sparsifier


class SwapSparsifier(Sparsifier):
    def __init__(self, sparsity: float = 0.8, every: int = 2, fraction: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        self.sparsity, self.every, self.fraction = sparsity, every, fraction
        self.swaps = 0  # how many updates moved masks (subclass state, checkpointed)

    def initial_masks(self):
        masks = []
        for p in self.params:
            keep = max(1, round((1 - self.sparsity) * p.numel()))
            order = torch.randperm(p.numel(), generator=self.generator)
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[order[:keep]] = True
            masks.append(mask.view(p.shape))
        return masks

    def update(self, step: int) -> None:
        if step % self.every:
            return
        masks = []
        for i in range(len(self.targets)):
            mask = self.current_mask(i).cpu().flatten()
            kept, pruned = mask.nonzero().flatten(), (~mask).nonzero().flatten()
            n = max(1, int(self.fraction * min(len(kept), len(pruned))))
            drop = kept[torch.randperm(len(kept), generator=self.generator)[:n]]
            grow = pruned[torch.randperm(len(pruned), generator=self.generator)[:n]]
            mask[drop], mask[grow] = False, True
            masks.append(mask.view(self.targets[i].param.shape))
        self.swaps += 1
        self.set_masks(masks, swaps=self.swaps)

    def extra_state(self):
        return {"swaps": self.swaps}

    def load_extra_state(self, state):
        self.swaps = int(state["swaps"])
