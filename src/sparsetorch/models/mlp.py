"""An MLP and a small CNN sized for scikit-learn's 8x8 digits."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Sequential):
    """``in -> hidden... -> out`` with ReLU; layers are named fc1, fc2, ..., classifier."""

    def __init__(self, sizes: Sequence[int] = (64, 256, 256, 10)):
        layers: list[tuple[str, nn.Module]] = []
        for i, (a, b) in enumerate(zip(sizes[:-2], sizes[1:-1]), start=1):
            layers += [(f"fc{i}", nn.Linear(a, b)), (f"act{i}", nn.ReLU())]
        layers.append(("classifier", nn.Linear(sizes[-2], sizes[-1])))
        super().__init__(OrderedDict(layers))
        self.in_features = sizes[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, in] or [B, 1, 8, 8]
        return super().forward(x.flatten(1))


class SmallCNN(nn.Module):
    """Two 3x3 conv layers and a classifier for 1x8x8 images."""

    def __init__(self, channels: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * channels * 4 * 4, 128)
        self.classifier = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 64] or [B, 1, 8, 8]
        x = x.reshape(-1, 1, 8, 8)
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))  # [B, 2C, 4, 4]
        return self.classifier(torch.relu(self.fc(x.flatten(1))))
