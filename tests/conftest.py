"""Shared fixtures and the helpers several test modules use (as fixtures: test modules import no test module)."""
import copy

import pytest
import torch
from torch import nn

from sparsetorch.models import MLP
from sparsetorch.sparsifiers import LotteryTicket, make_sparsifier
from sparsetorch.sparsifiers.method_registry import NEEDS_BATCH, NEEDS_INPUTS


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
def tiny_net_class():
    return TinyNet


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


# ---- sparsifier runs on a small MLP (test_sparsifiers*.py) ------------------------------------------
OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
}
SIZES = (16, 48, 32, 4)


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (16,), generator=g)


def build(name, seed=0, **overrides):
    kwargs = dict(generator=torch.Generator().manual_seed(seed), **overrides)
    if name in NEEDS_BATCH:
        kwargs.setdefault("batch", batch(-1))
    if name in NEEDS_INPUTS:
        kwargs.setdefault("example_inputs", batch(-1)[0])
    return make_sparsifier(name, **kwargs)


def setup(name, opt="adam", seed=0, model_seed=0, **overrides):
    torch.manual_seed(model_seed)
    model = MLP(SIZES)
    optimizer = OPTIMIZERS[opt](model.parameters())
    return model, optimizer, build(name, seed, **overrides).attach(model, optimizer)


def train(model, optimizer, sparsifier, steps, check=None):
    for step in range(steps):
        x, y = batch(step)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
        if isinstance(sparsifier, LotteryTicket) and step in (5, 11):  # two rounds inside the run
            sparsifier.next_round()
        if check:
            check(step)


@pytest.fixture(name="batch")
def batch_fixture():
    return batch


@pytest.fixture(name="build")
def build_fixture():
    return build


@pytest.fixture(name="setup")
def setup_fixture():
    return setup


@pytest.fixture(name="train")
def train_fixture():
    return train


# ---- channel shrinking (test_shrink*.py) ---------------------------------------------------------------
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (fresh ones are identities)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model.eval()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


@pytest.fixture(name="randomize_bn")
def randomize_bn_fixture():
    return randomize_bn


@pytest.fixture(name="params")
def params_fixture():
    return params


@pytest.fixture(name="assert_same_outputs")
def assert_same_outputs_fixture():
    return assert_same_outputs


# ---- decoders for to_inference (test_bitmask_kernels.py, test_siblings.py) ------------------------------
def pruned_llama(hidden: int = 64, intermediate: int = 128, bias: bool = False):
    """A 2-block Llama (4 heads, 2 KV heads, vocab 96) with ~70% of every block Linear's weights zeroed (and,
    with ``bias``, random biases), seeded."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96, attention_bias=bias)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and "lm_head" not in name:
                mod.weight.mul_(torch.rand(mod.weight.shape) > 0.7)
                if mod.bias is not None:
                    mod.bias.normal_()
    return model


@pytest.fixture(name="pruned_llama")
def pruned_llama_fixture():
    return pruned_llama


def unfused(model):
    """A copy of a converted ``model`` whose siblings (inference/siblings.py) each run their own rows of the
    combined weight."""
    from sparsetorch.inference.siblings import SiblingLinear

    apart = copy.deepcopy(model)
    for name, mod in list(apart.named_modules()):
        if isinstance(mod, SiblingLinear):
            apart.set_submodule(name, mod.layer)
    assert not any(isinstance(m, SiblingLinear) for m in apart.modules())
    return apart


@pytest.fixture(name="unfused")
def unfused_fixture():
    return unfused
