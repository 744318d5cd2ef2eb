"""Where the memory of an out-of-core one-shot run goes: the process's RSS sampled every few milliseconds and
labelled with the step running (reading a block, collecting its statistics, summing them, each layer's solve,
the next block's inputs, writing), printing each step's RSS when it began and its peak.

tracemalloc does not see torch's allocations, so this reads /proc/self/status (Linux). The checkpoint is
built once (``bench_out_of_core.build_checkpoint``: random weights, one shard per block) and kept in
--workdir; the first call builds it and exits, the next ones profile.

Run:  python benchmarks/profile_out_of_core.py --layers 2 --method sparsegpt          # 2 x 2048 Llama, 0.9 GB
      python benchmarks/profile_out_of_core.py --layers 4 --method wanda --hidden 1024 --intermediate 2752
"""
from __future__ import annotations

import argparse
import functools
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_out_of_core as bench  # noqa: E402 - the checkpoint builder and calibration of the benchmark

RUNS = {"sparsegpt": dict(method="sparsegpt", sparsity=0.5), "wanda": dict(method="wanda", pattern="2:4")}


def rss_mb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) // 1024
    return out


class Phases:
    """The step now running (a label), and per label the RSS when it was first seen and its maximum."""

    def __init__(self) -> None:
        self.label, self.seen, self.running = "start", {}, True

    def sample(self) -> None:
        while self.running:
            now = rss_mb()["VmRSS"]
            first_max = self.seen.setdefault(self.label, [now, now])
            first_max[1] = max(first_max[1], now)
            time.sleep(0.003)

    def wrap(self, owner, name: str, tag=None) -> None:
        real = getattr(owner, name)

        @functools.wraps(real)
        def labelled(*args, **kwargs):
            outer = self.label
            what = tag(args) if tag else name
            self.label = f"{outer.split(' > ')[0]} > {what}" if outer.startswith("block") else what
            try:
                return real(*args, **kwargs)
            finally:
                self.label = outer
        setattr(owner, name, labelled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", choices=sorted(RUNS), default="sparsegpt")
    parser.add_argument("--workdir", default="/tmp/profile_out_of_core")
    args = parser.parse_args()
    folder = Path(args.workdir) / f"llama-{args.layers}x{args.hidden}x{args.intermediate}"
    if not (folder / "config.json").is_file():
        bench.build_checkpoint(folder, bench.llama_config(args.layers, args.hidden, args.intermediate, args.heads,
                                                          args.vocab))
        print(f"built {folder}; run again to profile")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    import sparsetorch
    from sparsetorch.oneshot import activation_store, checkpoint_dir, drivers, layer_pruner, out_of_core

    phases = Phases()
    phases.wrap(checkpoint_dir.CheckpointModel, "load", lambda a: "load " + (
        a[2][0].split(".")[2] if a[2] and ".layers." in a[2][0] else "embeddings"))
    phases.wrap(checkpoint_dir.CheckpointModel, "release")
    phases.wrap(drivers.BlockRunner, "collect")
    phases.wrap(drivers, "_share_stats", lambda a: "sum + float32")
    phases.wrap(layer_pruner.LayerPruner, "prune", lambda a: "prune " + a[1].split(".")[-1])
    phases.wrap(out_of_core, "_write_shard", lambda a: "write")
    phases.wrap(activation_store.ActivationStore, "put_all", lambda a: "next inputs")
    phases.wrap(out_of_core, "_capture", lambda a: "capture")
    real_block = out_of_core._prune_one

    def block(k, *a, **kw):
        phases.label = f"block {k:02d}"
        return real_block(k, *a, **kw)
    out_of_core._prune_one = block
    threading.Thread(target=phases.sample, daemon=True).start()
    out = Path(args.workdir) / f"out-{folder.name}-{args.method}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    sparsetorch.prune_oneshot(str(folder), bench.calibration(args.nsamples, args.seqlen, args.vocab), out=str(out),
                              progress=False, device="cpu", **RUNS[args.method])
    phases.running = False
    time.sleep(0.05)
    shutil.rmtree(out, ignore_errors=True)
    print(f"command: python benchmarks/profile_out_of_core.py {' '.join(sys.argv[1:])}")
    print(f"{args.method}: {time.perf_counter() - started:.1f} s, peak RSS (VmHWM) {rss_mb()['VmHWM']} MB")
    print(f"{'step':40s} {'RSS at start':>12s} {'peak':>6s}  (MB)")
    for label, (first, peak) in phases.seen.items():
        print(f"{label:40s} {first:12d} {peak:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
