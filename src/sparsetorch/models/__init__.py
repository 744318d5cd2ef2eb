"""Small built-in models for demos, tests and benchmarks, defined in code (nothing is downloaded)."""
from .mlp import MLP, SmallCNN
from .resnet import MobileNet, MobileNetBlock, ResNet

__all__ = ["MLP", "SmallCNN", "ResNet", "MobileNet", "MobileNetBlock"]
