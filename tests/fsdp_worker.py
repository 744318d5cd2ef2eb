"""The worker test_fsdp.py launches with torchrun: sparse training under FSDP2 (``fully_shard``) and, for
comparison, DDP, on 2 gloo processes; each rank trains on its half of every global batch.

After every step the gathered (full) weights and masks are recorded; rank 0 writes them to
``fsdp.safetensors`` and both ranks write their histories and checks to ``rank<r>.json``. The test compares
them with a single process on the whole batch (computed there with the same functions).
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import sparsetorch
from sparsetorch.core.distributed import full, is_sharded

from ddp_worker import _build, METHOD_KWARGS, global_batch, make_model

METHODS = ["GMP", "RigL", "SET", "Static", "SRigL"]
# GMP's other masks under FSDP2: N:M (per group, gathered layer by layer) and blocks ranked globally
PATTERNS = {"GMP_2:4": dict(sparsity=None, pattern="2:4", start=1, end=8, every=2),
            "GMP_block": dict(sparsity=0.8, pattern="block:4x4", start=1, end=8, every=2)}
RESUME_AT = 3
ONESHOT = ["before", "after", "zeros", "before_gmp"]


def build(method: str):
    from sparsetorch import sparsifiers

    if method in PATTERNS:
        return sparsifiers.GMP(**PATTERNS[method])
    return _build(getattr(sparsifiers, method), METHOD_KWARGS[method], torch.Generator().manual_seed(7))


def shard(model):
    """FSDP2 on every layer and the root, as for a transformer's blocks."""
    from torch.distributed.fsdp import fully_shard

    for layer in (model.fc1, model.fc2, model.classifier):
        fully_shard(layer)
    return fully_shard(model)


def make_optimizer(model, kind: str = "sgd"):
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every weight and mask, whole (gathered from the shards under FSDP2)."""
    out = {name: full(p.detach()).clone() for name, p in model.named_parameters()}
    out.update({f"{item.qualified_name}_mask": full(item.mask).clone() for item in sparsetorch.iter_masks(model)})
    return out


def micro_batches(step: int, rank: int, world: int, micro: int, emulate: int = 1) -> list:
    """Rank ``rank``'s slice of the global batch in ``micro`` micro-batches. ``emulate=W`` on one process: each
    micro-batch joins what W ranks would take, so the summed micro-batch gradients equal their average."""
    x, y = global_batch(step)
    parts = []
    for m in range(micro):
        rows = [torch.arange(len(x))[r::world * emulate][m::micro] for r in range(rank, rank + emulate)]
        rows = torch.cat(rows)
        parts.append((x[rows], y[rows]))
    return parts


def train(model, optimizer, sparsifier, steps: range, rank: int = 0, world: int = 1, forward=None,
          micro: int = 1, emulate: int = 1) -> list[dict]:
    """Train over ``steps`` on this rank's slice of each global batch; a snapshot after every step."""
    forward = forward or model
    snaps = []
    for step in steps:
        for x, y in micro_batches(step, rank, world, micro, emulate):
            F.cross_entropy(forward(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if sparsifier is not None:
            sparsifier.step()
        snaps.append(snapshot(model))
    return snaps


def run_method(method: str, steps: int, rank: int, world: int, wrap: str, optimizer_kind: str = "sgd",
               micro: int = 1, emulate: int = 1):
    model = make_model()
    forward = model
    if wrap == "fsdp":
        shard(model)
    elif wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(model)
    optimizer = make_optimizer(model, optimizer_kind)
    sparsifier = build(method).attach(model, optimizer)
    snaps = [snapshot(model)] + train(model, optimizer, sparsifier, range(steps), rank, world, forward, micro, emulate)
    return model, sparsifier, snaps


def run_oneshot(steps: int, rank: int, world: int, when: str):
    """sparsetorch.prune (global magnitude, 70%) before or after fully_shard, then plain training: the masks
    stay where prune put them and pruned weights stay zero. ``"zeros"``: a pruned checkpoint (zeros in place,
    no masks) sharded, its masks derived from the zeros of the sharded weights and kept by ``Static``."""
    from sparsetorch.core.layer_selection import select_targets

    model = make_model()
    if when in ("before", "zeros"):
        sparsetorch.prune(model, 0.7)
    if when == "before_gmp":
        sparsetorch.prune(model, 0.5)
    if when == "zeros":
        sparsetorch.remove_masks(model)
    if world > 1:
        shard(model)
    if when == "after":
        sparsetorch.prune(model, 0.7)
    optimizer = make_optimizer(model)
    sparsifier = None
    if when == "zeros":
        zeros = {t.qualified_name: t.param.detach() != 0 for t in select_targets(model)}
        sparsifier = sparsetorch.Static(masks=zeros).attach(model, optimizer)
    if when == "before_gmp":  # GMP prunes on from the one-shot masks at once (their full masks meet DTensors)
        sparsifier = sparsetorch.GMP(sparsity=0.8, initial_sparsity=0.6, start=0, end=6, every=2).attach(model, optimizer)
    snaps = [snapshot(model)] + train(model, optimizer, sparsifier, range(steps), rank, world)
    sharded = all(is_sharded(item.mask) for item in sparsetorch.iter_masks(model))
    return model, snaps, sharded


def check_resume(steps: int, rank: int, world: int, folder: str) -> bool:
    """RigL + AdamW under FSDP2, saved with torch.distributed.checkpoint at RESUME_AT and resumed in fresh objects:
    the resumed run is bitwise the uninterrupted one."""
    from sparsetorch.integrations.distributed_checkpoint import load_distributed_state, save_distributed_state

    model = shard(make_model())
    optimizer = make_optimizer(model, "adamw")
    sparsifier = build("RigL").attach(model, optimizer)
    train(model, optimizer, sparsifier, range(RESUME_AT), rank, world)
    save_distributed_state(model, folder, optimizer, sparsifier, extra={"step": RESUME_AT})
    straight = train(model, optimizer, sparsifier, range(RESUME_AT, steps), rank, world)

    model = shard(make_model())
    optimizer = make_optimizer(model, "adamw")
    sparsifier = build("RigL")
    extra = load_distributed_state(model, folder, optimizer, sparsifier)
    resumed = train(model, optimizer, sparsifier, range(extra["step"], steps), rank, world)
    return len(straight) == len(resumed) == steps - RESUME_AT and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(straight, resumed))


def attach_before_wrap_error(rank: int, world: int) -> str:
    """A sparsifier attached before fully_shard replaced the parameters: a SparsityError at its first step."""
    model = make_model()
    sparsifier = build("RigL").attach(model)
    shard(model)
    optimizer = make_optimizer(model)
    try:
        train(model, optimizer, sparsifier, range(1), rank, world)
    except sparsetorch.SparsityError as error:
        return str(error)
    return ""


def refusals(tmp: str) -> list[str]:
    """What FSDP2 does not support says so: LotteryTicket, the one-file safetensors checkpoints."""
    from sparsetorch.integrations import save_sparsifier_state, save_training_state
    from sparsetorch.sparsifiers import LotteryTicket

    model = shard(make_model())
    optimizer = make_optimizer(model)
    sparsifier = build("RigL").attach(model, optimizer)
    messages = []
    for attempt in (lambda: LotteryTicket(sparsity=0.8).attach(model, optimizer),
                    lambda: save_training_state(model, os.path.join(tmp, "state"), optimizer, sparsifier),
                    lambda: save_sparsifier_state(os.path.join(tmp, "sparsifier.safetensors"), sparsifier)):
        try:
            attempt()
            messages.append("")
        except sparsetorch.SparsityError as error:
            messages.append(str(error))
    return messages


def check_compile(rank: int, world: int) -> dict:
    """torch.compile over an FSDP2 model with RigL moving masks: one graph, pruned weights and gradients zero."""
    from torch._dynamo.utils import counters

    counters.clear()
    model = shard(make_model())
    compiled = torch.compile(model)
    optimizer = make_optimizer(model, "adamw")
    sparsifier = build("RigL").attach(model, optimizer)
    zero = True
    for step in range(6):
        x, y = global_batch(step)
        F.cross_entropy(compiled(x[rank::world]), y[rank::world]).backward()
        for item in sparsetorch.iter_masks(model):
            zero &= not bool(full(item.param.grad)[~full(item.mask)].any())
        optimizer.step()
        optimizer.zero_grad()
        sparsifier.step()
        for item in sparsetorch.iter_masks(model):
            zero &= not bool(full(item.param.detach())[~full(item.mask)].any())
    moved = [row["moved"] for row in sparsifier.history]
    return {"zero": zero, "moved": moved, "unique_graphs": counters["stats"]["unique_graphs"]}


def main(out_dir: str, steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors, report = {}, {}
    for method in METHODS:
        for wrap in ("fsdp", "ddp"):
            _, sparsifier, snaps = run_method(method, steps, rank, world, wrap)
            report[f"{wrap}/{method}"] = sparsifier.history
            tensors.update({f"{wrap}/{method}/{i}/{k}": v for i, snap in enumerate(snaps) for k, v in snap.items()})
    for method in PATTERNS:
        _, sparsifier, snaps = run_method(method, steps, rank, world, "fsdp")
        tensors.update({f"fsdp/{method}/{i}/{k}": v for i, snap in enumerate(snaps) for k, v in snap.items()})
    _, sparsifier, snaps = run_method("RigL", steps, rank, world, "fsdp", "adamw")
    tensors.update({f"fsdp/RigL_adamw/{i}/{k}": v for i, snap in enumerate(snaps) for k, v in snap.items()})
    _, sparsifier, snaps = run_method("RigL", steps, rank, world, "fsdp", micro=2)
    tensors.update({f"fsdp/RigL_micro/{i}/{k}": v for i, snap in enumerate(snaps) for k, v in snap.items()})
    for when in ONESHOT:
        model, snaps, sharded = run_oneshot(steps, rank, world, when)
        if when == "after":  # fine-tuned without a sparsifier: the checkpoint carries the model's masks
            from sparsetorch.integrations.distributed_checkpoint import save_distributed_state

            save_distributed_state(model, os.path.join(out_dir, "oneshot_ckpt"))
        report[f"oneshot_{when}_sharded"] = sharded
        tensors.update({f"oneshot_{when}/{i}/{k}": v for i, snap in enumerate(snaps) for k, v in snap.items()})
    report["attach_before_wrap"] = attach_before_wrap_error(rank, world)
    report["refusals"] = refusals(os.path.join(out_dir, f"refused{rank}"))
    folder = os.path.join(out_dir, "ckpt")
    report["resume_bitwise"] = check_resume(steps, rank, world, folder)
    if os.environ.get("FSDP_TEST_COMPILE") == "1":
        report["compile"] = check_compile(rank, world)
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "fsdp.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
