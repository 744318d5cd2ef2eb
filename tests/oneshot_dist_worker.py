"""The worker ``torchrun`` launches in test_oneshot_distributed.py: one-shot pruning with the calibration set
sharded over the ranks (gloo, CPU), plus the collectives it relies on and the errors every rank must raise.

Every case is built from a seed, so the test rebuilds it in one process on the whole calibration set and
compares. Each rank writes ``rank{r}.safetensors`` (every case's state dict and masks) and ``rank{r}.json``.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

# name -> (model builder, calibration builder, prune_oneshot keyword arguments)
GPT_KW = dict(device="cpu", progress=False)


def byte_gpt():
    from sparsetorch.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(layers=2, width=32, heads=2, context=16)).eval()
    with torch.no_grad():  # a few large input weights in block 0: OWL gets outliers to find there, not in block 1
        model.blocks[0].mlp.fc.weight[:, :2] *= 40
    return model


def gpt_items():
    """Items of different shapes, so the ranks hold different numbers of tokens (5 items: 2 on rank 0, 3 on 1)."""
    g = torch.Generator().manual_seed(1)
    shapes = [(1, 16), (2, 9), (1, 12), (3, 5), (1, 7)]
    return [torch.randint(0, 256, s, generator=g) for s in shapes]


def mlp():
    from sparsetorch.models import MLP

    torch.manual_seed(2)
    return MLP((24, 48, 32, 10)).eval()


def mlp_items():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, 24, generator=g) for n in (7, 3, 11, 5)]


def mixtral():
    import transformers as T

    torch.manual_seed(4)
    cfg = T.MixtralConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, num_local_experts=4,
                          num_experts_per_tok=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return T.MixtralForCausalLM(cfg).eval()


def mixtral_items():
    """Padded batches (right padding of different lengths): padding must count on no rank."""
    g = torch.Generator().manual_seed(5)
    items = []
    for batch, seq, real in [(2, 10, (10, 6)), (1, 8, (5,)), (2, 7, (7, 3)), (1, 12, (12,))]:
        mask = torch.zeros(batch, seq, dtype=torch.long)
        for row, n in enumerate(real):
            mask[row, :n] = 1
        items.append({"input_ids": torch.randint(1, 64, (batch, seq), generator=g), "attention_mask": mask})
    return items


CASES = {
    "wanda": (byte_gpt, gpt_items, dict(method="wanda", sparsity=0.5)),
    "wanda_2:4": (byte_gpt, gpt_items, dict(method="wanda", pattern="2:4")),
    "sparsegpt": (byte_gpt, gpt_items, dict(method="sparsegpt", sparsity=0.5)),
    "sparsegpt_2:4": (byte_gpt, gpt_items, dict(method="sparsegpt", pattern="2:4")),
    "alps": (byte_gpt, gpt_items, dict(method="alps", sparsity=0.6)),
    "owl": (byte_gpt, gpt_items, dict(method="wanda", sparsity=0.6, distribution="owl")),
    "ria_dsnot": (byte_gpt, gpt_items, dict(method="ria", sparsity=0.5, refine="dsnot")),
    "one_pass": (mlp, mlp_items, dict(method="sparsegpt", sparsity=0.5)),  # no blocks: hooks on every layer
    "moe": (mixtral, mixtral_items, dict(method="sparsegpt", sparsity=0.5)),
}


def prune_case(name: str, items=None):
    """The pruned model of ``CASES[name]`` on ``items`` (default: the whole calibration set)."""
    from sparsetorch.oneshot import prune_oneshot

    build, calibration, kwargs = CASES[name]
    model = build()
    prune_oneshot(model, calibration() if items is None else items, **GPT_KW, **kwargs)
    return model


def tensors_of(model) -> dict[str, torch.Tensor]:
    """The state dict plus every mask, as plain tensors."""
    import sparsetorch

    out = {f"state/{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out |= {f"mask/{m.qualified_name}": m.mask.clone() for m in sparsetorch.iter_masks(model)}
    return out


def collectives(rank: int) -> dict:
    """The helpers themselves: uneven statistics summed, an expert routed on one rank only, rank 0's copy."""
    from sparsetorch.core.distributed import agree_with_rank0
    from sparsetorch.oneshot.linear_layers import InputStats, all_reduce_stats

    g = torch.Generator().manual_seed(10 + rank)
    stats = {"a": InputStats(4, torch.device("cpu"), True), "expert": InputStats(4, torch.device("cpu"), True)}
    stats["a"].add(torch.randn(3 + rank, 4, generator=g))
    if rank == 1:  # the expert got tokens on rank 1 only
        stats["expert"].add(torch.randn(2, 4, generator=g))
    failed_elsewhere = all_reduce_stats(stats, failed=False)
    mine = torch.arange(6.0).reshape(2, 3) + rank  # differs on rank 1
    same = torch.ones(5, dtype=torch.bool)
    taken = agree_with_rank0([same, mine])
    return {"counts": {k: s.count for k, s in stats.items()}, "failed": failed_elsewhere, "taken": taken,
            "agreed": mine.tolist(),
            "hessians": {k: s.xtx.flatten().tolist() for k, s in stats.items()}}


def errors(rank: int) -> dict:
    """An invalid shard, a forward failing on one item, different weights, each on rank 1 only: every rank
    raises, none hangs."""
    from sparsetorch import SparsityError
    from sparsetorch.oneshot import prune_oneshot

    out = {}
    items = gpt_items()[:2]
    if rank == 1:
        items = [items[0].float()]  # token ids as floats: rejected by this rank's checks
    try:
        prune_oneshot(byte_gpt(), items, method="wanda", **GPT_KW)
    except SparsityError as exc:
        out["bad_shard"] = str(exc)
    items = gpt_items()[:2]
    if rank == 1:  # valid ids, but the second item is longer than the model's context: its forward fails
        items = [items[0], torch.randint(0, 256, (1, 40))]
    try:
        prune_oneshot(byte_gpt(), items, method="sparsegpt", **GPT_KW)
    except SparsityError as exc:
        out["failed_forward"] = str(exc)
    model = byte_gpt()
    if rank == 1:
        with torch.no_grad():
            model.blocks[1].attn.proj.weight[0, 0] += 1.0
    try:
        prune_oneshot(model, gpt_items()[:2], method="wanda", **GPT_KW)
    except SparsityError as exc:
        out["different_models"] = str(exc)
    return out


def disagreeing_solver(rank: int):
    """The sparsegpt case with a rank that solves differently (as a GPU whose kernels round differently could):
    rank 1's SparseGPT sees a perturbed Hessian. After each block every rank must hold rank 0's result."""
    from sparsetorch.oneshot import shard_calibration, solvers

    original = solvers.sparsegpt_solve

    def perturbed(weight, hessian, *args, **kwargs):
        noise = torch.rand(hessian.shape[0], generator=torch.Generator().manual_seed(9)) * hessian.diagonal().mean()
        return original(weight, hessian + rank * torch.diag(noise), *args, **kwargs)

    solvers.sparsegpt_solve = perturbed
    try:
        return prune_case("sparsegpt", shard_calibration(gpt_items()))
    finally:
        solvers.sparsegpt_solve = original


def ooc_llama():
    """A tiny Llama to save as a checkpoint folder for the out-of-core case."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        vocab_size=1000)
    return T.LlamaForCausalLM(cfg)


def ooc_items() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 1000, (1, 16 + 4 * i), generator=g) for i in range(5)]


def folder_tensors(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out |= load_file(os.path.join(folder, name))
    return out


def out_of_core(out_dir: str, rank: int) -> tuple[dict, dict]:
    """A checkpoint folder pruned out of core under torchrun: each rank its shard, rank 0 writes the output."""
    from sparsetorch.oneshot import prune_oneshot, shard_calibration

    src, pruned = os.path.join(out_dir, "checkpoint"), os.path.join(out_dir, "pruned")
    if rank == 0:
        ooc_llama().save_pretrained(src)
    dist.barrier()
    stats = prune_oneshot(src, shard_calibration(ooc_items()), method="sparsegpt", sparsity=0.5, out=pruned,
                          progress=False)
    dist.barrier()  # rank 0's files are complete
    report = {"world_size": stats.world_size, "complete": os.path.exists(os.path.join(pruned, ".sparsetorch-run",
                                                                                     "complete.json"))}
    return report, folder_tensors(pruned)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from safetensors.torch import save_file

    from sparsetorch.oneshot import shard_calibration

    tensors, report = {}, {"collectives": collectives(rank), "errors": errors(rank), "cases": {}}
    for name, (_, calibration, _) in CASES.items():
        model = prune_case(name, shard_calibration(calibration()))
        stats = model.sparsetorch_stats
        report["cases"][name] = {"world_size": stats.world_size, "from_rank0": stats.from_rank0,
                                 "mode": stats.mode, "unrouted": stats.unrouted,
                                 "targets": [r.target for r in stats.layers]}
        tensors |= {f"{name}/{k}": v for k, v in tensors_of(model).items()}
    report["ooc"], written = out_of_core(out_dir, rank)
    tensors |= {f"ooc/{k}": v for k, v in written.items()}
    model = disagreeing_solver(rank)
    report["disagree"] = {"from_rank0": model.sparsetorch_stats.from_rank0}
    tensors |= {f"disagree/{k}": v for k, v in tensors_of(model).items()}
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(report, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
