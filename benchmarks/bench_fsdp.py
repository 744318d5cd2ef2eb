"""Memory per rank and step time of sparse training (RigL) on the byte GPT under FSDP2 vs DDP, 2 processes.

Run:  python benchmarks/bench_fsdp.py [--layers 6 --width 384 --steps 12 --threads 1]
Launches ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU) once per mode. Each rank builds the GPT on
the meta device, wraps it (DDP, or ``fully_shard`` on every block and the root), materialises and
initialises it, attaches RigL (90% on every Linear but lm_head, AdamW) and trains ``--steps`` steps on random
bytes. Per rank it reports: the bytes it holds in steady state (parameters, gradients, optimizer state, masks:
local shards under FSDP2), the peak RSS above the RSS before the model was built (sampled every ms), and the
median step time of plain steps and of RigL update steps (which gather one layer at a time under FSDP2).
Both modes run twice: with glibc's default malloc, whose dynamic mmap threshold keeps freed buffers (FSDP2
all-gathers a block per forward and backward) in the heap, and with ``MALLOC_MMAP_THRESHOLD_=131072``,
which returns them to the OS. Prints a table with the command, machine and date, and writes
benchmarks/results/bench_fsdp.json (and .txt).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The highest RSS seen by a thread sampling /proc/self/statm every millisecond."""

    def __init__(self) -> None:
        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


def held_bytes(model, optimizer) -> dict:
    """Bytes this rank holds for the model: local shards of parameters, gradients, optimizer state, masks."""
    import sparsetorch
    from sparsetorch.core.distributed import local

    def size(t):
        t = local(t)
        return t.numel() * t.element_size()

    params = sum(size(p) for p in model.parameters())
    grads = sum(size(p.grad) for p in model.parameters() if p.grad is not None)
    state = sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    masks = sum(size(item.mask) for item in sparsetorch.iter_masks(model))
    return {"params": params, "grads": grads, "optimizer": state, "masks": masks,
            "total": params + grads + state + masks}


def worker(mode: str, out: str, args) -> None:
    import torch.distributed as dist

    from sparsetorch.models.gpt import GPT, GPTConfig
    from sparsetorch.sparsifiers import RigL

    import torch.distributed.fsdp  # noqa: F401  both modes' modules loaded before the baseline RSS
    import torch.distributed.tensor  # noqa: F401
    import torch.nn.parallel  # noqa: F401

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = rss_bytes()
    sampler = PeakRSS()
    cfg = GPTConfig(layers=args.layers, width=args.width, heads=args.width // 64, context=args.context)
    with torch.device("meta"):
        model = GPT(cfg)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.reset_parameters()
        model.apply(GPT._init)
    forward = model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sparsifier = RigL(sparsity=0.9, distribution="uniform", every=args.every, drop_fraction=0.3,
                      generator=torch.Generator().manual_seed(0)).attach(model, optimizer)
    data = torch.Generator().manual_seed(1 + rank)
    times, updates = [], []
    for step in range(args.steps):
        ids = torch.randint(0, 256, (args.batch, args.context + 1), generator=data)
        start = time.perf_counter()
        logits = forward(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
        optimizer.step()
        held = held_bytes(model, optimizer)  # gradients still there: the steady state's high point
        optimizer.zero_grad()
        sparsifier.step()
        (updates if sparsifier.is_update_step(sparsifier.step_count) else times).append(time.perf_counter() - start)
    peak = sampler.stop()
    params = sum(p.numel() for p in model.parameters())
    result = {"mode": mode, "rank": rank, "world": world, "params": params, "held": held,
              "peak_rss_above_base": peak - base, "base_rss": base, "step_s": times,
              "update_step_s": updates, "median_update_s": statistics.median(updates) if updates else None,
              "median_step_s": statistics.median(times[args.warmup:]), "density": sparsifier.density(),
              "updates": sum(1 for row in sparsifier.history[1:])}
    Path(out, f"{mode}_rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--every", type=int, default=5, help="RigL update period (steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--out", default=str(RESULTS / "bench_fsdp.json"))
    parser.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tmp, args)
        return 0
    allocators = {"default": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
    ranks: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for alloc, alloc_env in allocators.items():
            for mode in ("ddp", "fsdp"):
                cmd = [*torchrun(), "--standalone", "--nproc_per_node=2", __file__, *sys.argv[1:], "--worker", mode,
                       "--tmp", tmp]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **alloc_env}
                subprocess.run(cmd, check=True, env=env)
                ranks[f"{alloc}/{mode}"] = [json.loads(Path(tmp, f"{mode}_rank{r}.json").read_text()) for r in (0, 1)]
    mib = 2 ** 20
    rows = []
    for alloc in allocators:
        for r in (0, 1):
            d, f = ranks[f"{alloc}/ddp"][r], ranks[f"{alloc}/fsdp"][r]
            rows.append({"malloc": alloc, "rank": r, "ddp_held_mib": d["held"]["total"] / mib,
                         "fsdp_held_mib": f["held"]["total"] / mib, "held_ratio": f["held"]["total"] / d["held"]["total"],
                         "ddp_peak_mib": d["peak_rss_above_base"] / mib, "fsdp_peak_mib": f["peak_rss_above_base"] / mib,
                         "peak_ratio": f["peak_rss_above_base"] / d["peak_rss_above_base"],
                         "ddp_step_ms": d["median_step_s"] * 1e3, "fsdp_step_ms": f["median_step_s"] * 1e3,
                         "step_ratio": f["median_step_s"] / d["median_step_s"],
                         "ddp_update_ms": (d["median_update_s"] or 0) * 1e3,
                         "fsdp_update_ms": (f["median_update_s"] or 0) * 1e3})
    command = "python benchmarks/bench_fsdp.py " + " ".join(sys.argv[1:])
    first = ranks["default/ddp"][0]
    lines = [f"# {command}", f"# {platform.node()} {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"# GPT {args.layers} layers x {args.width}, {first['params'] / 1e6:.1f}M parameters, RigL 90% "
             f"(every {args.every}), AdamW, batch {args.batch}x{args.context} per rank, {args.steps} steps "
             f"({args.warmup} warm-up), 2 gloo ranks, {args.threads} thread(s) each; held = parameters + gradients + "
             "optimizer state + masks on the rank; peak = peak RSS above the RSS before the model was built",
             "| malloc | rank | held DDP MiB | held FSDP2 MiB | FSDP2/DDP | peak DDP MiB | peak FSDP2 MiB | FSDP2/DDP "
             "| step DDP ms | step FSDP2 ms | FSDP2/DDP | update step DDP / FSDP2 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['malloc']} | {row['rank']} | {row['ddp_held_mib']:.1f} | {row['fsdp_held_mib']:.1f} "
                     f"| {row['held_ratio']:.2f} | {row['ddp_peak_mib']:.1f} | {row['fsdp_peak_mib']:.1f} "
                     f"| {row['peak_ratio']:.2f} | {row['ddp_step_ms']:.0f} | {row['fsdp_step_ms']:.0f} "
                     f"| {row['step_ratio']:.2f} | {row['ddp_update_ms']:.0f} / {row['fsdp_update_ms']:.0f} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "machine": platform.node(), "rows": rows, "ranks": ranks},
                              indent=1))
    out.with_suffix(".txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
