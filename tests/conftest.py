import pytest
import torch
from torch import nn


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class TinyNet(nn.Module):
    """Linear + Conv layers of awkward sizes, a classifier, and a bias-free layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, 2)
        self.fc1 = nn.Linear(8 * 4 * 3, 48)
        self.fc2 = nn.Linear(48, 32, bias=False)
        self.classifier = nn.Linear(32, 5)

    def forward(self, x):  # x: [B, 4, 4, 4]
        x = torch.relu(self.conv(x))  # [B, 8, 4, 4]
        x = torch.relu(self.conv1d(x.flatten(2)))  # [B, 8, 15]
        x = x[..., :12].flatten(1)  # [B, 96]
        return self.classifier(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, 4, 4, generator=g), torch.randint(0, 5, (16,), generator=g)


@pytest.fixture
def one_thread():
    """Tiny convolutions on a shared 2-core machine: extra threads only spin-wait (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
