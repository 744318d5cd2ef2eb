"""Conformance checks for your own sparsifiers and storage formats, like scikit-learn's ``check_estimator``.

Every check raises ``AssertionError`` with a message saying what broke; none needs pytest::

    from sparsetorch.testing import check_sparsifier, check_format

    check_sparsifier(lambda generator: MySparsifier(sparsity=0.9, generator=generator))
    check_format("csr")                       # or a sparsetorch.formats.Format you registered
    check_oneshot("wanda+owl", sparsity=0.7)  # a one-shot configuration (see sparsetorch.oneshot.specs)

A sparsifier for SparseLinear layers (``CompressedRigL`` and the like) passes
``prepare=sparsetorch.to_sparse_training``-style hook: ``check_sparsifier(factory, prepare=entry.prepare)``.
Its "masks" are then the kept positions of every SparseLinear layer.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import torch
from torch import nn

from .core.masks import get_mask, iter_masks
from .core.patterns import parse_pattern, pattern_mask
from .formats import FORMATS, Format, decode, encode
from .models import MLP
from .oneshot.conformance import check_oneshot
from .sparse_training.sparse_linear import SparseLinear
from .sparsifiers.base import Sparsifier

__all__ = ["check_sparsifier", "check_target_density", "check_masks_binary", "check_pruned_stay_zero",
           "check_state_dict_round_trip", "check_determinism", "check_format", "connectivity", "check_oneshot"]

Factory = Callable[[torch.Generator], Sparsifier]
SIZES = (16, 48, 32, 4)


def default_model() -> nn.Module:
    return MLP(SIZES)


def default_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, SIZES[0], generator=g), torch.randint(0, SIZES[-1], (16,), generator=g)


class Harness:
    """How the checks build, attach and train: one place for the model, batches and the prepare hook."""

    def __init__(self, factory: Factory, *, make_model: Callable[[], nn.Module] | None = None,
                 prepare: Callable[[nn.Module], nn.Module] | None = None,
                 make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None, steps: int = 12,
                 on_step: Callable[[int, Sparsifier], None] | None = None):
        self.factory, self.steps, self.on_step = factory, int(steps), on_step
        self.make_model = make_model or default_model
        self.prepare = prepare or (lambda model: model)
        self.make_batch = make_batch or default_batch

    def setup(self, seed: int = 0, model_seed: int = 0):
        torch.manual_seed(model_seed)
        model = self.prepare(self.make_model())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        sparsifier = self.factory(torch.Generator().manual_seed(seed))
        return model, optimizer, sparsifier.attach(model, optimizer)

    def train(self, model, optimizer, sparsifier, check: Callable[[int], None] | None = None) -> None:
        for step in range(self.steps):
            x, y = self.make_batch(step)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            sparsifier.step()
            if self.on_step is not None:
                self.on_step(step, sparsifier)
            if check is not None:
                check(step)


def connectivity(model: nn.Module) -> list[torch.Tensor]:
    """What a sparsifier decided: the kept positions of every SparseLinear layer, else every mask."""
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if layers:
        return [m.flat_positions().clone() for m in layers]
    return [item.mask.clone() for item in iter_masks(model)]


def sparsifier_tolerance(sparsifier: Sparsifier) -> float:
    """Rounding slack: a weight per layer, or one unit's row per layer for constant fan-in (SRigL)."""
    shapes = [tuple(t.param.shape) if not isinstance(t.module, SparseLinear)
              else (t.module.out_features, t.module.in_features) for t in sparsifier.targets]
    total = sum(torch.Size(s).numel() for s in shapes)
    if "SRigL" in type(sparsifier).__name__:
        return max(s[0] for s in shapes) / total
    return len(shapes) / total


def check_target_density(h: Harness, target_density: float | None = None, tolerance: float | None = None) -> None:
    """After training, ``density()`` is the target (default ``1 - sparsifier.sparsity``) up to rounding."""
    model, optimizer, sparsifier = h.setup()
    h.train(model, optimizer, sparsifier)
    name = type(sparsifier).__name__
    if target_density is None:
        sparsity = getattr(sparsifier, "sparsity", None)
        assert sparsity is not None, f"{name} has no .sparsity; pass target_density= to the check"
        target_density = 1.0 - float(sparsity)
    tol = sparsifier_tolerance(sparsifier) if tolerance is None else tolerance
    got = sparsifier.density()
    assert abs(got - target_density) <= tol, (
        f"{name}: density {got:.5f} after {h.steps} steps, expected {target_density:.5f} +- {tol:.5f}")


def check_masks_binary(h: Harness) -> None:
    """Masks are bool with the parameter's shape (or SparseLinear positions sorted, unique and in range)."""
    model, optimizer, sparsifier = h.setup()
    name = type(sparsifier).__name__

    def check(step: int) -> None:
        layers = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, SparseLinear)]
        for fqn, m in layers:
            flat = m.flat_positions()
            assert flat.numel() == m.nnz, f"{name}: {fqn} has {flat.numel()} positions for {m.nnz} values"
            assert bool((flat[1:] > flat[:-1]).all()), f"{name}: {fqn} positions not sorted/unique at step {step}"
            assert flat.numel() == 0 or (0 <= int(flat.min()) and int(flat.max()) < m.in_features * m.out_features), \
                f"{name}: {fqn} has a position outside [0, out*in) at step {step}"
        if layers:
            return
        assert list(iter_masks(model)), f"{name}: no masks on the model after attach"
        for t in sparsifier.targets:
            mask = get_mask(t.module, t.name)
            assert mask is not None, f"{name}: target {t.qualified_name} has no mask at step {step}"
            assert mask.dtype == torch.bool, f"{name}: mask of {t.qualified_name} is {mask.dtype}, not torch.bool"
            assert mask.shape == t.param.shape, (
                f"{name}: mask of {t.qualified_name} has shape {tuple(mask.shape)}, weight {tuple(t.param.shape)}")

    check(-1)
    h.train(model, optimizer, sparsifier, check)


def check_pruned_stay_zero(h: Harness) -> None:
    """Pruned weights, and their optimizer state, are zero after every optimizer step (SparseLinear: nnz fixed)."""
    model, optimizer, sparsifier = h.setup()
    name = type(sparsifier).__name__
    nnz = [m.nnz for m in model.modules() if isinstance(m, SparseLinear)]

    def check(step: int) -> None:
        if nnz:
            now = [m.nnz for m in model.modules() if isinstance(m, SparseLinear)]
            assert now == nnz, f"{name}: SparseLinear nnz changed from {nnz} to {now} at step {step}"
            return
        for item in iter_masks(model):
            bad = int(torch.count_nonzero(item.param.detach()[~item.mask]))
            assert bad == 0, f"{name}: {bad} pruned weights of {item.qualified_name} are nonzero after step {step}"
            for key, value in optimizer.state.get(item.param, {}).items():
                if torch.is_tensor(value) and value.shape == item.mask.shape:
                    assert torch.count_nonzero(value[~item.mask]) == 0, (
                        f"{name}: optimizer state {key!r} of {item.qualified_name} is nonzero at pruned weights")

    h.train(model, optimizer, sparsifier, check)


def check_state_dict_round_trip(h: Harness) -> None:
    """``load_state_dict(state_dict())`` into a fresh sparsifier on another model restores the same state."""
    model, optimizer, sparsifier = h.setup()
    h.train(model, optimizer, sparsifier)
    name = type(sparsifier).__name__
    state = sparsifier.state_dict()
    model2, _, sparsifier2 = h.setup(seed=5, model_seed=1)
    if any(isinstance(m, SparseLinear) for m in model.modules()):
        model2.load_state_dict(model.state_dict())  # the connectivity lives in the model's own state
    sparsifier2.load_state_dict(state)
    for a, b in zip(connectivity(model), connectivity(model2), strict=True):
        assert torch.equal(a, b), f"{name}: masks differ after load_state_dict"
    assert sparsifier2.step_count == sparsifier.step_count, f"{name}: step_count not restored"
    assert sparsifier2.history == sparsifier.history, f"{name}: history not restored"
    assert torch.equal(sparsifier2.generator.get_state(), sparsifier.generator.get_state()), \
        f"{name}: generator state not restored"
    assert sparsifier2.state_dict()["extra"].keys() == state["extra"].keys(), f"{name}: extra_state keys differ"


def check_determinism(h: Harness) -> None:
    """The same seeds give the same masks after training."""
    runs = []
    for _ in range(2):
        model, optimizer, sparsifier = h.setup(seed=3)
        h.train(model, optimizer, sparsifier)
        runs.append(connectivity(model))
    name = type(sparsifier).__name__
    assert len(runs[0]) == len(runs[1]) and all(torch.equal(a, b) for a, b in zip(*runs)), \
        f"{name}: two runs with the same seed ended with different masks"


CHECKS = (check_target_density, check_masks_binary, check_pruned_stay_zero, check_state_dict_round_trip,
          check_determinism)


def check_sparsifier(factory: Factory, *, make_model: Callable[[], nn.Module] | None = None,
                     prepare: Callable[[nn.Module], nn.Module] | None = None,
                     make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None, steps: int = 12,
                     on_step: Callable[[int, Sparsifier], None] | None = None,
                     target_density: float | None = None, tolerance: float | None = None,
                     checks: Sequence[Callable[..., None]] = CHECKS) -> None:
    """Run every check on sparsifiers made by ``factory(generator)``; AssertionError on the first failure.

    ``make_model()``: a dense model (default a small MLP on 16 inputs, 4 classes); ``prepare(model)``: what the
    sparsifier needs done first (``sparsetorch.to_sparse_training`` for the compressed ones);
    ``make_batch(step)``: (inputs, class labels); ``on_step(step, sparsifier)``: called after each step (e.g. a
    lottery ticket's ``next_round``); ``target_density``/``tolerance`` for ``check_target_density``.
    """
    h = Harness(factory, make_model=make_model, prepare=prepare, make_batch=make_batch, steps=steps,
                on_step=on_step)
    for check in checks:
        if check is check_target_density:
            check(h, target_density, tolerance)
        else:
            check(h)


def format_cases(fmt: Format, pattern: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shapes = [(64, 48), (300, 520)] if pattern != "unstructured" else [(64, 48), (8, 4, 3, 3), (96,), (300, 520)]
    cases = []
    for seed, shape in enumerate(shapes):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(shape, generator=g)
        if pattern == "unstructured":
            mask = torch.rand(shape, generator=g) < 0.3
        else:
            mask = pattern_mask(torch.rand(shape, generator=g), 0.3, parse_pattern(pattern))
        cases.append((w * mask, mask))
    return cases


def check_format(fmt: str | Format, *, pattern: str = "unstructured",
                 cases: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None, values: str = "fp32") -> None:
    """``decode(encode(w, mask))`` gives back exactly ``w`` (dtype too) and ``mask``, and names the format.

    ``fmt``: a registered format's name or a ``Format`` (it is looked up by name, so register it first);
    ``pattern``: the mask pattern the default cases use (BSR needs e.g. "block:4x4"); ``cases``: your own
    (weight, mask) pairs instead.
    """
    name = fmt if isinstance(fmt, str) else fmt.name
    assert name in FORMATS, f"format {name!r} is not registered; call sparsetorch.formats.register_format first"
    for w, mask in (cases if cases is not None else format_cases(FORMATS[name], pattern)):
        parts, meta = encode(name, w, mask, values)
        assert meta.get("format") == name, f"format {name!r}: encode wrote format {meta.get('format')!r}"
        dense, got = decode(parts, meta)
        shape = tuple(w.shape)
        assert dense.dtype == w.dtype, f"format {name!r}: dtype {w.dtype} came back as {dense.dtype} ({shape})"
        assert torch.equal(dense, w), f"format {name!r}: weights of shape {shape} do not round-trip exactly"
        assert got is not None and torch.equal(got, mask), f"format {name!r}: mask of shape {shape} does not round-trip"

