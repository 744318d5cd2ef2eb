"""Out-of-core one-shot pruning: peak memory against checkpoint size, flat in depth.

Builds Llama-architecture checkpoints from a config with random weights, written shard by shard (the whole
model is never in memory), prunes each out of core (``prune_oneshot(folder, calib, out=...)``) with
SparseGPT 50% and Wanda 2:4 in a fresh process per run, and reports that process's peak RSS against the
checkpoint size, for two depths (peak RSS should not grow with depth), the seconds per block, and whether
a model small enough for both gives the same masks and weights out of core as in memory.

Run:  python benchmarks/bench_out_of_core.py                      # full: 12 vs 24 layers x 2048 (24: ~5 GB fp32)
      python benchmarks/bench_out_of_core.py --preset reduced     # 12 vs 24 layers x 512, short calibration
Sizes are flags (--layers, --hidden, --intermediate, --vocab, --nsamples, --seqlen, --threads); --workdir DIR --keep
keeps the checkpoints and reuses them in the next run (writing the 5 GB one takes minutes). Prints a table
with the command, machine and date; writes benchmarks/results/bench_out_of_core[_PRESET].json and .txt.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {  # the size, and one a shared 2-core machine runs in minutes
    "full": dict(layers=[12, 24], hidden=2048, intermediate=5504, heads=16, vocab=32000, nsamples=16, seqlen=512),
    "reduced": dict(layers=[12, 24], hidden=512, intermediate=1376, heads=8, vocab=32000, nsamples=8, seqlen=128),
}
RUNS = [("sparsegpt", dict(method="sparsegpt", sparsity=0.5)), ("wanda 2:4", dict(method="wanda", pattern="2:4"))]
TARGET = 0.30  # peak RSS at most 30% of the checkpoint


def llama_config(layers: int, hidden: int, intermediate: int, heads: int, vocab: int):
    import transformers

    return transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                                    num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                    max_position_embeddings=2048, tie_word_embeddings=False, dtype="float32")


def build_checkpoint(folder: Path, config, seed: int = 0) -> int:
    """A save_pretrained-style folder with random weights, one shard per block (plus one for the rest), each
    shard generated and written before the next: at most one block is ever in memory. Returns its bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        groups.setdefault(f"block{int(parts[2]):03d}" if parts[1] == "layers" else "other", []).append(key)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    names = sorted(groups)
    for i, group in enumerate(names):
        shard = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {k: torch.ones(shapes[k]) if len(shapes[k]) == 1 else torch.randn(shapes[k], generator=gen) * 0.02
                   for k in groups[group]}
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        total += (folder / shard).stat().st_size
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    config.save_pretrained(folder)
    return total


def reused(folder: Path, config) -> int | None:
    """The bytes of a checkpoint a previous ``--keep`` run built in ``folder`` for this config, None if there is none."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file() or not (folder / "config.json").is_file():
        return None
    held = json.loads((folder / "config.json").read_text())
    wanted = config.to_dict()
    if any(held.get(k) != wanted.get(k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                  "num_attention_heads", "vocab_size")):
        return None
    shards = set(json.loads(index.read_text())["weight_map"].values())
    if not all((folder / name).is_file() for name in shards):
        return None
    return sum((folder / name).stat().st_size for name in shards)


def calibration(nsamples: int, seqlen: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (1, seqlen), generator=g) for _ in range(nsamples)]


def child(spec: dict) -> dict:
    """One measured run in this (fresh) process: import only, or one out-of-core pruning."""
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    import transformers  # noqa: F401 - part of the floor: the run imports it too

    import sparsetorch

    if spec["kind"] == "floor":  # with the model's code imported and its skeleton built, as a run does
        with torch.device("meta"):
            transformers.LlamaForCausalLM(llama_config(2, 64, 128, 4, 256))
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    calib = calibration(spec["nsamples"], spec["seqlen"], spec["vocab"])
    started = time.perf_counter()
    stats = sparsetorch.prune_oneshot(spec["folder"], calib, out=spec["out"], progress=False, device="cpu",
                                      **spec["options"])
    return {"seconds": time.perf_counter() - started, "block_seconds": stats.block_seconds,
            "sparsity": stats.sparsity, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_child(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    if done.returncode != 0:
        raise RuntimeError(f"child run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def masks_identical(work: Path, threads: int) -> dict:
    """A model small enough for both: out-of-core weights (hence masks, the zeros) == in-memory ones."""
    import torch
    import transformers
    from safetensors import safe_open

    import sparsetorch
    from sparsetorch.core.masks import iter_masks

    torch.set_num_threads(threads)
    folder = work / "small"
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config(4, 256, 688, 4, 1000)).save_pretrained(folder, max_shard_size="2MB")
    calib = calibration(8, 64, 1000)
    result = {}
    for name, options in RUNS:
        out = work / f"small-{options['method']}"
        shutil.rmtree(out, ignore_errors=True)  # a kept workdir: prune again, not resume
        sparsetorch.prune_oneshot(folder, calib, out=out, progress=False, device="cpu", **options)
        ref = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
        sparsetorch.prune_oneshot(ref, calib, progress=False, device="cpu", **options)
        written = {}
        for shard in out.glob("model*.safetensors"):
            with safe_open(str(shard), "pt") as fh:
                written.update({k: fh.get_tensor(k) for k in fh.keys()})
        masks = list(iter_masks(ref))
        state = ref.state_dict()
        same = all(torch.equal(written[m.qualified_name] != 0, m.mask) for m in masks) and \
            all(torch.equal(v, state[k]) for k, v in written.items())
        result[name] = {"layers": len(masks), "identical": bool(same)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    for key in ("hidden", "intermediate", "heads", "vocab", "nsamples", "seqlen"):
        parser.add_argument(f"--{key}", type=int, default=None)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="depths to compare (default 12 24)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=[n.split()[0] for n, _ in RUNS], default=None,
                        help="which runs (default: sparsegpt and wanda)")
    parser.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir, and reuse those a "
                                                            "previous --keep run left there (same sizes)")
    args = parser.parse_args()
    if args.keep and not args.workdir:
        parser.error("--keep needs --workdir")
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    size = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if k in PRESETS["full"] and v is not None}}
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_ooc_"))
    work.mkdir(parents=True, exist_ok=True)
    lines = [f"command: python benchmarks/bench_out_of_core.py {' '.join(sys.argv[1:])}",
             f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, {args.threads} threads; "
             f"python {platform.python_version()}", f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"size: {size}"]
    floor = in_child({"kind": "floor", "threads": args.threads})["peak_rss_mb"]
    lines.append(f"floor (python + torch + transformers + sparsetorch imported): {floor:.0f} MB")
    rows = []
    try:
        for layers in size["layers"]:
            folder = work / f"llama-{layers}"
            t0 = time.perf_counter()
            config = llama_config(layers, size["hidden"], size["intermediate"], size["heads"], size["vocab"])
            nbytes = reused(folder, config) if args.keep else None
            if nbytes is None:
                shutil.rmtree(folder, ignore_errors=True)
                nbytes = build_checkpoint(folder, config)
            build_s = time.perf_counter() - t0
            for name, options in RUNS:
                if args.methods and name.split()[0] not in args.methods:
                    continue
                out = work / f"out-{layers}-{options['method']}"
                shutil.rmtree(out, ignore_errors=True)
                got = in_child({"kind": "run", "threads": args.threads, "folder": str(folder), "out": str(out),
                                "options": options, "nsamples": size["nsamples"], "seqlen": size["seqlen"],
                                "vocab": size["vocab"]})
                rows.append({"layers": layers, "checkpoint_mb": nbytes / 2**20, "build_s": build_s, "method": name,
                             **got, "rss_ratio": got["peak_rss_mb"] / (nbytes / 2**20),
                             "s_per_block": sum(got["block_seconds"]) / layers})
                shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        check = masks_identical(work, args.threads)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    lines.append(f"{'layers':>6} {'checkpoint':>11} {'method':>10} {'peak RSS':>9} {'RSS/ckpt':>9} {'s/block':>8} "
                 f"{'total s':>8} {'sparsity':>8}")
    for r in rows:
        lines.append(f"{r['layers']:6d} {r['checkpoint_mb']:9.0f}MB {r['method']:>10} {r['peak_rss_mb']:7.0f}MB "
                     f"{r['rss_ratio']:9.1%} {r['s_per_block']:8.2f} {r['seconds']:8.1f} {r['sparsity']:8.3f}")
    for name in dict(RUNS):
        by_depth = [r for r in rows if r["method"] == name]
        if len(by_depth) >= 2:
            lines.append(f"{name}: peak RSS at {by_depth[-1]['layers']} layers / at {by_depth[0]['layers']} layers = "
                         f"{by_depth[-1]['peak_rss_mb'] / by_depth[0]['peak_rss_mb']:.2f} (checkpoint "
                         f"{by_depth[-1]['checkpoint_mb'] / by_depth[0]['checkpoint_mb']:.2f}x)")
    lines.append(f"target: peak RSS <= {TARGET:.0%} of the checkpoint at the largest depth: " + ", ".join(
        f"{r['method']} {'yes' if r['rss_ratio'] <= TARGET else 'no'}" for r in rows if r["layers"] == max(size["layers"])))
    lines.append("masks identical to the in-memory run (4 x 256 Llama): " + ", ".join(
        f"{k} {'yes' if v['identical'] else 'NO'} ({v['layers']} layers)" for k, v in check.items()))
    text = "\n".join(lines)
    print(text)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    stem = "bench_out_of_core" + ("" if args.preset == "full" else f"_{args.preset}") + \
        ("" if not args.methods else "_" + "_".join(args.methods))
    (results / f"{stem}.json").write_text(json.dumps({"size": size, "threads": args.threads, "floor_mb": floor,
                                                      "rows": rows, "masks_identical": check}, indent=2))
    (results / f"{stem}.txt").write_text(text + "\n")
    return 0 if all(v["identical"] for v in check.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
