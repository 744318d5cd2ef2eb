"""The two ways a model's layers get their calibration statistics and are pruned.

* sequential (transformers): the inputs of the first block are captured, then each block collects
  its layers' statistics, is pruned, and is run again to give the next block its (now pruned)
  inputs (SparseGPT/Wanda's recipe). Peak memory: the model plus one block's activations and Hessians.
* one pass (any other module of Linear layers): hooks on every layer, one pass over the data.

With OWL the per-block densities come from the dense model's outlier ratios, collected in a first
pass the same way (block by block) before anything is pruned.

Under torchrun each rank runs its own calibration shard through the same steps: a block's (or the one
pass's) statistics are summed over the ranks as soon as they are collected (``_share_stats``), so every
rank prunes from the whole set's statistics, and the pruned layers are then checked identical on every
rank (``_agree``) before the next block's inputs are computed from them.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..core.distributed import agree_with_rank0, any_rank, is_distributed, rank_and_world
from ..errors import SparsityError, SparsityWarning
from .blocks import capture_block_calls
from .calibration import Calibration
from .layer_pruner import LayerPruner
from .experts import attach_layer_stats, install_expert_masks, layer_module
from .linear_layers import TokenMask, all_reduce_stats, weight_2d
from .owl import OWL, outlier_ratio, owl_densities
from .results import OneshotStats


@dataclass
class Job:
    """One prune_oneshot call: what to prune, with what data, how, and to which densities."""

    model: nn.Module
    targets: dict[str, nn.Module]
    calibration: Calibration
    pruner: LayerPruner
    densities: dict[str, float]  # layer -> density before any OWL reallocation
    owl: OWL | None
    progress: bool | None

    def stats_for(self, name: str) -> OneshotStats:
        r = self.pruner.recipe
        return OneshotStats(r.method, str(r.pattern), name, str(self.pruner.device),
                            distribution="owl" if self.owl else "uniform", bits=r.grid.bits if r.grid else None,
                            refine=r.refine, world_size=rank_and_world()[1])


def forward_error(exc: Exception) -> SparsityError:
    return SparsityError(f"the calibration data could not be run through the model ({type(exc).__name__}: {exc}); "
                         "check the inputs' shape and dtype against what the model's forward takes")


def _no_tokens_note(name: str, out: OneshotStats) -> str:
    warnings.warn(f"{name} received no token from the calibration data (an expert nothing was routed to?); it is "
                  "pruned by magnitude instead and listed in model.sparsetorch_stats", SparsityWarning, stacklevel=4)
    out.unrouted.append(name)
    return "no calibration tokens: pruned by magnitude"


def _share_stats(stats: dict, error: Exception | None) -> None:
    """Sum ``stats`` over the ranks (torchrun), then round them to float32 (``InputStats.finish``); if another
    rank could not run its shard, fail here too rather than wait for it forever. The caller raises its own
    ``error``."""
    if all_reduce_stats(stats, failed=error is not None) and error is None:
        raise _failed_elsewhere()
    for s in stats.values():
        s.finish()


def _failed_elsewhere() -> SparsityError:
    return SparsityError("another rank could not run its calibration shard through the model (see that rank's "
                         "error); every rank must pass inputs the model accepts")


def _agree(layers: dict[str, nn.Module], out: OneshotStats) -> None:
    """Under torchrun, make the pruned layers identical on every rank: rank 0's weights, masks and any input
    order or quantization grid where a rank differs (listed in ``out.from_rank0``).

    The statistics are already bitwise identical on every rank (the all-reduce hands each the same sum), so
    with a deterministic solver on identical hardware the ranks agree by themselves; a fingerprint
    comparison (one small all-reduce per block) proves it rather than broadcasting every weight. Ranks on
    different GPUs or kernels that pick different reduction orders could still break a tie differently,
    and then the broadcast guarantees identical masks (the next block's inputs depend on them)."""
    if not is_distributed():
        return
    owners: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, layer in layers.items():
        owners.setdefault(id(layer_module(layer)), (layer_module(layer), []))[1].append(name)
    tensors, names = [], []
    for module, layer_names in owners.values():
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            tensors.append(t.detach())
            names.append(layer_names)
    for i in agree_with_rank0(tensors):
        out.from_rank0.extend(n for n in names[i] if n not in out.from_rank0)


def prune_group(job: Job, layers: dict[str, nn.Module], stats: dict, density_of, out: OneshotStats) -> None:
    for name, module in layers.items():
        s = stats.pop(name, None)  # freed once its layer is pruned: no Hessian outlives its layer
        note = _no_tokens_note(name, out) if job.pruner.recipe.needs_data and (s is None or s.count == 0) else ""
        out.layers.append(job.pruner.prune(name, module, s, density_of(name), note))
    install_expert_masks(layers)  # expert slices' masks become one mask per fused 3-D parameter
    _agree(layers, out)


def owl_ratio(layers: dict[str, nn.Module], stats: dict, owl: OWL) -> float:
    device = next(iter(stats.values())).device
    scores = [weight_2d(m).detach().to(device, torch.float32).abs() * stats[n].sq_norm.sqrt()[None, :]
              for n, m in layers.items() if stats[n].count]  # Wanda's |W| * ||X||
    return outlier_ratio(scores, owl.m) if scores else 0.0


def owl_reallocate(job: Job, groups: list[list[str]], ratios: list[float], out: OneshotStats) -> dict[str, float]:
    """OWL's per-group densities around the uniform target, spread to every layer of the group."""
    target = next(iter(job.densities.values()))
    sizes = [sum(weight_2d(job.targets[n]).numel() for n in g) for g in groups]
    dens = owl_densities(ratios, sizes, target, job.owl.lam)
    out.outlier_ratios = list(ratios)
    return {n: d for g, d in zip(groups, dens) for n in g}


def run_one_pass(job: Job) -> OneshotStats:
    tokens = TokenMask()
    stats, handles = attach_layer_stats(job.targets, job.pruner.device, job.pruner.recipe.needs_hessian, tokens)
    error = None
    try:
        with torch.no_grad():
            for sample, mask in zip(job.calibration.samples, job.calibration.token_masks):
                tokens.current = mask
                job.calibration.run(sample)
    except Exception as exc:  # noqa: BLE001 - the model is untouched so far
        error = exc
    finally:
        for h in handles:
            h.remove()
    _share_stats(stats, error)
    if error is not None:
        raise forward_error(error) from error
    out = job.stats_for("one-pass")
    densities = job.densities
    if job.owl is not None:
        names = list(job.targets)
        ratios = [owl_ratio({n: job.targets[n]}, stats, job.owl) for n in names]
        densities = owl_reallocate(job, [[n] for n in names], ratios, out)
    prune_group(job, job.targets, stats, densities.__getitem__, out)
    return out


class BlockRunner:
    """Feeds one block its calibration inputs, collecting its layers' statistics without padding.

    ``calls[block][sample]`` says how the model calls each block (captured from the model unless given);
    hidden states are any iterable of tensors, one per sample, so they can stream from disk."""

    def __init__(self, job: Job, blocks: nn.ModuleList, calls: list | None = None) -> None:
        self.job, self.blocks, self.device = job, blocks, job.pruner.device
        self.index = {id(b): i for i, b in enumerate(blocks)}
        if calls is None:
            error = None
            try:  # calls[block][sample]: each block is replayed with the arguments the model gives it
                calls = capture_block_calls(job.model, blocks, job.calibration.run, job.calibration.samples)
            except Exception as exc:  # noqa: BLE001 - the model is untouched so far
                error = exc
            if any_rank(error is not None):  # torchrun: one rank's failure stops every rank before any collective
                if error is not None:
                    raise forward_error(error) from error
                raise _failed_elsewhere()
        self.calls = calls

    def first_inputs(self) -> list[torch.Tensor]:
        return [c.hidden.to(self.device) for c in self.calls[0]]  # one per sample

    def layers_of(self, block: nn.Module) -> dict[str, nn.Module]:
        inside = {id(m) for m in block.modules()}
        return {n: m for n, m in self.job.targets.items() if id(layer_module(m)) in inside}

    def collect(self, block: nn.Module, layers: dict, hidden: Iterable[torch.Tensor], hessian: bool) -> dict:
        tokens = TokenMask()
        stats, handles = attach_layer_stats(layers, self.device, hessian, tokens)
        error = None
        try:
            for call, h, mask in zip(self.calls[self.index[id(block)]], hidden, self.job.calibration.token_masks):
                tokens.current = mask
                call.run(block, h, self.device)
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know
            error = exc
        finally:
            for handle in handles:
                handle.remove()
        _share_stats(stats, error)
        if error is not None:
            raise error
        return stats

    def outputs(self, block: nn.Module, hidden: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The block's output for each sample, one at a time."""
        for call, h in zip(self.calls[self.index[id(block)]], hidden):
            yield call.run(block, h, self.device)

    def forward(self, block: nn.Module, hidden: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.outputs(block, hidden))


def prune_block(job: Job, runner: BlockRunner, block: nn.Module, hidden: Iterable[torch.Tensor],
                densities: dict[str, float], out: OneshotStats) -> None:
    """Collect the statistics of ``block``'s target layers on ``hidden`` and prune them (the block is on the
    runner's device)."""
    layers = runner.layers_of(block)
    stats = runner.collect(block, layers, hidden, job.pruner.recipe.needs_hessian)
    prune_group(job, layers, stats, densities.__getitem__, out)


def owl_block(job: Job, runner: BlockRunner, block: nn.Module,
              hidden: Iterable[torch.Tensor]) -> tuple[list[str], float] | None:
    """OWL's statistic of one dense block: (its target layers, their outlier ratio); None if it has none."""
    layers = runner.layers_of(block)
    if not layers:
        return None
    stats = runner.collect(block, layers, hidden, hessian=False)
    return list(layers), owl_ratio(layers, stats, job.owl)


@torch.no_grad()
def run_sequential(job: Job, blocks: nn.ModuleList) -> OneshotStats:
    from tqdm.auto import tqdm

    runner = BlockRunner(job, blocks)
    out = job.stats_for("sequential")
    out.blocks = len(blocks)
    inside = {id(m) for b in blocks for m in b.modules()}
    outside = {n: m for n, m in job.targets.items() if id(layer_module(m)) not in inside}
    tied = [n for n, m in outside.items() if _shares_an_embedding(job.model, layer_module(m))]
    if tied:
        warnings.warn(f"{tied} share their weight with an embedding (tied weights) and are left dense: pruning them "
                      "would prune the embedding too", SparsityWarning, stacklevel=3)
        outside = {n: m for n, m in outside.items() if n not in tied}
    densities = job.densities
    if job.owl is not None:
        densities = _owl_pass(job, blocks, runner, out)
    hidden = runner.first_inputs()
    auto = None if rank_and_world()[0] == 0 else True  # by default one bar (rank 0's) under torchrun
    bar = tqdm(blocks, desc=f"{job.pruner.recipe.method} blocks",
               disable=auto if job.progress is None else not job.progress)
    for block in bar:
        home = next(block.parameters()).device
        block.to(runner.device)
        prune_block(job, runner, block, hidden, densities, out)
        hidden = runner.forward(block, hidden)  # the next block sees this block's pruned outputs
        block.to(home)
    if outside:  # e.g. a pooler or a layer the user included by name: one pass over the pruned model
        rest = run_one_pass(replace(job, targets=outside, owl=None, densities={n: densities.get(n, job.densities[n])
                                                                                 for n in outside}))
        out.layers.extend(rest.layers)
        out.unrouted.extend(rest.unrouted)
    return out


def _shares_an_embedding(model: nn.Module, layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return weight is not None and any(isinstance(m, nn.Embedding) and m.weight is weight for m in model.modules())


def _owl_pass(job: Job, blocks: nn.ModuleList, runner: BlockRunner, out: OneshotStats) -> dict[str, float]:
    """OWL's statistics: each block's outlier ratio on the dense model, block by block."""
    hidden, groups, ratios = runner.first_inputs(), [], []
    for block in blocks:
        home = next(block.parameters()).device
        block.to(runner.device)
        found = owl_block(job, runner, block, hidden)
        if found is not None:
            groups.append(found[0])
            ratios.append(found[1])
        hidden = runner.forward(block, hidden)
        block.to(home)
    return owl_reallocate(job, groups, ratios, out)
