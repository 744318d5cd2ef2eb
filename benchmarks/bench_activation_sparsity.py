"""Activation sparsity (TEAL) on CPU: the column kernel's speed per layer and the loss it costs a trained model.

Speed: single Linear layers of the ``small`` decode preset's shapes (1024x1024 attention, 2816x1024 gate/up,
1024x2816 down; out x in), pruned by magnitude per row (50%, 70%, 2:4), fp32 and bf16 values, at batch 1:
the weight-sparse row kernel (``BitmaskWeight``, what ``to_inference`` runs without activation sparsity)
and the same values dense (``dense-rows``: zeros stored, no mask) against the column kernels, kept values in
tiles (``col``: ``ColumnBitmaskWeight``) and every value in whole columns (``dcol``: ``DenseColumnWeight``), with
0/40/50% of the inputs under the threshold (``--shapes 2048x2048,5632x2048,2048x5632`` for the 1B preset's). Enough
copies of each layer are cycled that they do not fit in the last-level cache (decode streams weights from
memory); kernels are timed in interleaved rounds and the medians kept (the machine is shared: with
``--threads 1`` the clock is the thread's CPU time, which other jobs' time slices do not inflate).

Quality: a byte-level Llama (4 x 128) trained on the Python stdlib's sources with the library's training loop
(cached under benchmarks/cache/), pruned the same way; mean next-byte cross-entropy on held-out windows with
0/40/50% activation sparsity (thresholds calibrated on training windows, applied in torch; the kernels give
the same numbers up to float order, tests/test_activation_sparsity.py).

    nice python benchmarks/bench_activation_sparsity.py --threads 2

Results go to benchmarks/results/activation_sparsity.json (``--out`` for another file).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_decode import prune
from sparsetorch.data.text import load_stdlib_text, random_windows
from sparsetorch.inference import PackedLinear, calibrate_activation_sparsity
from sparsetorch.inference.activation_sparsity import magnitude_threshold
from sparsetorch.kernels.bitmask_weight import BitmaskWeight
from sparsetorch.kernels.column_bitmask import ColumnBitmaskWeight
from sparsetorch.kernels.dense_columns import DenseColumnWeight
from sparsetorch.kernels.microbench import machine
from sparsetorch.recovery import DistillLoss, distill

HERE = Path(__file__).resolve().parent


def pruned(out: int, n: int, sparsity, gen: torch.Generator) -> torch.Tensor:
    layer = torch.nn.Linear(n, out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out, n, generator=gen) * n ** -0.5)
    prune(layer, sparsity)
    return layer.weight.detach()


def clock_for(args):
    """CPU time of this thread with one thread: the work done, whatever else the shared machine runs; wall
    time with more threads (their waits are part of the cost, and so is the neighbours' load)."""
    return time.thread_time if args.threads == 1 else time.perf_counter


def layer_speed(args) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for out, n in (tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")):
        x = torch.randn(1, n, generator=gen)
        for sp in args.sparsities.split(","):
            sp = sp if sp == "2:4" else float(sp)
            w = pruned(out, n, sp, gen)
            for values in args.values.split(","):
                row_w = BitmaskWeight.from_dense(w, values)
                copies = max(1, -(-args.cycle_mb * 2**20 // row_w.nbytes))  # more bytes than the caches hold
                # each copy scaled a little so no two share memory the hardware could dedupe (none does; cheap)
                ws = [w * (1 + 1e-3 * i) for i in range(copies)]
                kernels = {"row": [PackedLinear(n, out, None, "bitmask", BitmaskWeight.from_dense(c, values)) for c in ws],
                           "dense-rows": [PackedLinear(n, out, None, "bitmask",
                                                       BitmaskWeight.from_dense(c, values, dense=True)) for c in ws]}
                for a in args.activation_sparsity:
                    t = magnitude_threshold(x, a)
                    kernels[f"col{a:g}"] = [PackedLinear(n, out, None, "bitmask-columns",
                                                         ColumnBitmaskWeight.from_dense(c, t, values)) for c in ws]
                    kernels[f"dcol{a:g}"] = [PackedLinear(n, out, None, "dense-columns",
                                                          DenseColumnWeight.from_dense(c, t, values)) for c in ws]
                times = {k: [] for k in kernels}
                clock = clock_for(args)
                with torch.no_grad():
                    for mods in kernels.values():
                        for m in mods:
                            m(x)
                    for _ in range(args.rounds):
                        for k, mods in kernels.items():
                            t0 = clock()
                            for m in mods:
                                m(x)
                            times[k].append((clock() - t0) / len(mods))
                us = {k: 1e6 * statistics.median(v) for k, v in times.items()}
                row = {"shape": [out, n], "weight_sparsity": str(sp), "values": values, "copies": copies,
                       "us": us, "bytes_row": row_w.nbytes, "bytes_col": kernels["col0"][0].packed.nbytes
                       if "col0" in kernels else None}
                rows.append(row)
                ratios = "  ".join(f"{k}={v:.0f}us ({us['row'] / v:.2f}x)" for k, v in us.items())
                print(f"{out}x{n} {sp} {values}: {ratios}", flush=True)
    return rows


def trained_model(args, split):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=256, max_position_embeddings=256)
    path = HERE / "cache" / f"teal_llama_4x128_steps{args.train_steps}"
    if (path / "config.json").is_file():
        return transformers.LlamaForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    data = random_windows(split.train, args.train_steps * 16, 129, torch.Generator().manual_seed(0))
    result = distill(model, None, data, steps=args.train_steps, batch_size=16, lr=3e-3,
                     loss=DistillLoss(kl=0.0, task=1.0), generator=torch.Generator().manual_seed(0))
    print(f"trained the byte-level Llama in {result.seconds:.0f} s", flush=True)
    model.save_pretrained(path)
    return model.eval()


@torch.no_grad()
def loss(model, windows: torch.Tensor) -> float:
    """Mean next-byte cross-entropy (nats) over windows [N, T+1]."""
    logits = model(windows[:, :-1], use_cache=False).logits
    return float(F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))


def quality(args) -> list[dict]:
    split = load_stdlib_text()
    calib = random_windows(split.train, 8, 128, torch.Generator().manual_seed(1))
    evals = random_windows(split.val, 64, 129, torch.Generator().manual_seed(2))
    rows = []
    for sp in ["0"] + args.sparsities.split(","):
        model = trained_model(args, split)
        if sp != "0":
            prune(model, sp if sp == "2:4" else float(sp))
        plain = loss(model, evals)
        for a in args.activation_sparsity:
            if a == 0:
                value = plain
            else:
                act = calibrate_activation_sparsity(model, calib, sparsity=a)
                with act.attach(model):
                    value = loss(model, evals)
            rows.append({"weight_sparsity": sp, "activation_sparsity": a, "loss": value, "increase": value - plain})
            print(f"weights {sp} activations {a:g}: loss {value:.4f} nats/byte (+{value - plain:.4f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default="1024x1024,2816x1024,1024x2816", help="out x in of each layer")
    ap.add_argument("--sparsities", default="0.5,0.7,2:4")
    ap.add_argument("--values", default="fp32,bf16")
    ap.add_argument("--activation-sparsity", default="0,0.4,0.5")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cycle-mb", type=int, default=96, help="weight bytes cycled per kernel (beyond the caches)")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "activation_sparsity.json")
    args = ap.parse_args()
    args.activation_sparsity = [float(a) for a in args.activation_sparsity.split(",")]
    torch.set_num_threads(args.threads)
    out = {"date": str(dt.date.today()), "machine": machine(), "threads": args.threads,
           "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    if not args.skip_speed:
        out["layers"] = layer_speed(args)
    if not args.skip_quality:
        out["quality"] = quality(args)
    path = args.out
    if path.is_file():  # a --skip-speed / --skip-quality run keeps the other part's last results
        kept = json.loads(path.read_text())
        out = {**{k: kept[k] for k in ("layers", "quality") if k in kept and k not in out}, **out}
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
