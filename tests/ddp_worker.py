"""A sparsifier that moves masks at random, and the worker that ``torchrun`` launches in test_ddp.py.

``SwapSparsifier`` checks the training machinery (resume, DDP, callbacks, compile) without
depending on any particular method: every ``every`` steps it swaps a fraction of each layer's
kept connections with pruned ones, drawing every choice from its generator.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys

import torch
import torch.distributed as dist

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


# methods checked by the DDP and resume tests once they exist; keyword arguments a method does
# not take are left out, so each gets the subset it understands
METHOD_KWARGS = {
    "GMP": dict(sparsity=0.8, start=1, end=8, every=2),
    "RigL": dict(sparsity=0.8, every=2),
    "SET": dict(sparsity=0.8, every=2),
    "SRigL": dict(sparsity=0.8, every=2),
    "Static": dict(sparsity=0.8),
}


def methods() -> dict:
    """name -> build(generator): the random-swap check plus every landed method of METHOD_KWARGS."""
    from sparsetorch import sparsifiers as mod

    found = {"swap": lambda g: SwapSparsifier(sparsity=0.8, every=2, generator=g)}
    for name, kwargs in METHOD_KWARGS.items():
        cls = getattr(mod, name, None)
        if cls is not None:
            found[name] = lambda g, cls=cls, kwargs=kwargs: _build(cls, kwargs, g)
    return found


def _build(cls, kwargs, generator):
    # a subclass's __init__(..., **kwargs) forwards to its bases: accept what any of them names
    accepted = {name for klass in cls.__mro__ if "__init__" in vars(klass)
                for name in inspect.signature(vars(klass)["__init__"]).parameters}
    return cls(**{k: v for k, v in kwargs.items() if k in accepted}, generator=generator)


def global_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)


def make_model():
    from sparsetorch.models import MLP

    torch.manual_seed(0)
    return MLP((12, 24, 16, 3))


def digest(model) -> str:
    """One hash of every mask and weight, to compare replicas after each step."""
    import sparsetorch

    h = hashlib.sha256()
    for item in sparsetorch.iter_masks(model):
        h.update(item.mask.numpy().tobytes())
    for value in model.state_dict().values():
        h.update(value.detach().numpy().tobytes())
    return h.hexdigest()


def run(name: str, build, steps: int, rank: int, world: int, seed: int, attach_before_wrap: bool):
    """Train ``steps`` steps under DDP, each rank on its slice of the global batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    sparsifier = build(torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # DDP keeps these parameters
    if attach_before_wrap:  # the masks become buffers that DDP broadcasts too
        sparsifier.attach(model, optimizer)
    ddp = DDP(model)
    if not attach_before_wrap:
        sparsifier.attach(ddp.module, optimizer)
    return model, sparsifier, train(ddp, optimizer, sparsifier, steps, rank, world)


def train(model, optimizer, sparsifier, steps: int, rank: int = 0, world: int = 1) -> list[str]:
    """``steps`` steps on this rank's slice of each global batch (all of it with world=1); a digest of the
    (inner) model before training and after every step."""
    inner = getattr(model, "module", model)
    digests = [digest(inner)]
    for step in range(steps):
        x, y = global_batch(step)
        torch.nn.functional.cross_entropy(model(x[rank::world]), y[rank::world]).backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
        digests.append(digest(inner))
    return digests


def make_compressed_model():
    """make_model() with every Linear but the classifier a compressed 80%-sparse SparseLinear."""
    from sparsetorch.sparse_training import to_sparse_training

    return to_sparse_training(make_model(), 0.8, generator=torch.Generator().manual_seed(3))


def compressed_rigl(generator):
    from sparsetorch.sparse_training import CompressedRigL

    return CompressedRigL(every=2, drop_fraction=0.5, generator=generator)


def connectivity(model) -> dict:
    """Sorted flat kept positions of every SparseLinear, by name."""
    from sparsetorch.sparse_training import SparseLinear

    return {name: m.flat_positions() for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def run_compressed(steps: int, rank: int, world: int):
    """CompressedRigL on SparseLinear layers under DDP (its dense gradient is all-reduced on update steps)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_compressed_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = compressed_rigl(torch.Generator().manual_seed(7)).attach(model, optimizer)
    return model, sparsifier, train(DDP(model), optimizer, sparsifier, steps, rank, world)


def distill_pair():
    """A random dense GPT (teacher) and a 60%-magnitude-pruned copy (student), with its training rows, in float64:
    half-batch gradients averaged by DDP and whole-batch ones differ in summation order, and Adam's g / sqrt(v)
    magnifies that float32 noise past the comparison's tolerance (1.2e-5 seen with one thread)."""
    import copy

    from sparsetorch.models.gpt import GPT, GPTConfig
    from sparsetorch.oneshot import prune_oneshot

    torch.manual_seed(0)
    teacher = GPT(GPTConfig(layers=1, width=16, heads=2, context=8)).double().eval()
    student = copy.deepcopy(teacher)
    prune_oneshot(student, None, method="magnitude", sparsity=0.6, progress=False)
    data = torch.randint(0, 256, (16, 8), generator=torch.Generator().manual_seed(1))
    return teacher, student, data


def run_distill(steps: int, world: int = 1):
    """distill() under DDP when world > 1: each rank takes its half of every batch, DDP averages the gradients."""
    from sparsetorch.recovery import distill

    teacher, student, data = distill_pair()
    trained = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        trained = DDP(student)
    distill(trained, teacher, data, steps=steps, batch_size=4, lr=1e-2, generator=torch.Generator().manual_seed(3))
    return student


def main(out_dir: str, steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from safetensors.torch import save_file

    import sparsetorch

    report, tensors = {}, {}
    for name, build in methods().items():
        # swap draws from a different seed on every rank: only the broadcast keeps replicas equal
        seed = 7 + (rank if name == "swap" else 0)
        for before in ([False, True] if name == "swap" else [False]):
            key = f"{name}{'_before_wrap' if before else ''}"
            model, sparsifier, digests = run(name, build, steps, rank, world, seed, before)
            report[key] = {"digests": digests, "history": sparsifier.history}
            for item in sparsetorch.iter_masks(model):
                tensors[f"{key}/{item.qualified_name}"] = item.mask.clone()
    model, sparsifier, digests = run_compressed(steps, rank, world)
    report["compressed_rigl"] = {"digests": digests, "history": sparsifier.history}
    for name, positions in connectivity(model).items():
        tensors[f"compressed_rigl/{name}"] = positions
    for name, value in run_distill(steps, world).state_dict().items():
        tensors[f"distill/{name}"] = value.clone()
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
