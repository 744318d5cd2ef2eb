"""One-shot pruning of a small byte-level GPT trained on the Python stdlib's sources.

Validation loss (nats/byte) and perplexity for dense, magnitude (per layer and per output row),
Wanda and SparseGPT at 50%, 60%, 2:4 and 4:8 over several calibration draws, plus each method's time.

    nice .venv/bin/python benchmarks/bench_oneshot.py                 # trains once (500 steps, ~2 min on 2 idle cores), cached
    nice .venv/bin/python benchmarks/bench_oneshot.py --gpt2-small    # SparseGPT timing on a 124M GPT-2 (CPU)

The trained checkpoint is cached under benchmarks/cache/ (gitignored); results go to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsetorch.data.text import load_stdlib_text, random_windows
from sparsetorch.models.gpt import GPT, GPTConfig
from sparsetorch.oneshot import prune_oneshot

HERE = Path(__file__).resolve().parent
SETTINGS = [("50%", 0.5, "unstructured"), ("60%", 0.6, "unstructured"), ("2:4", None, "2:4"), ("4:8", None, "4:8")]
METHODS = [("magnitude/layer", "magnitude", "layer"), ("magnitude/row", "magnitude", "row"),
           ("wanda", "wanda", None), ("sparsegpt", "sparsegpt", None)]


def train(cfg: GPTConfig, data: torch.Tensor, steps: int, batch: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)  # linear warm-up, then cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    t0 = time.perf_counter()
    for step in range(steps):
        loss = model.loss(random_windows(data, batch, cfg.context + 1, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:5d}  train loss {loss.item():.3f}  {time.perf_counter() - t0:6.0f} s", flush=True)
    return model.eval()


@torch.no_grad()
def evaluate(model: GPT, windows: torch.Tensor) -> float:
    """Mean next-byte loss (nats/byte) over fixed validation windows."""
    return sum(model.loss(w).item() * len(w) for w in windows.split(64)) / len(windows)


MODELS = {  # name -> (config, training steps)
    "tiny": (GPTConfig(), 500),
    # deeper, wider and trained 4x longer: outlier features grow with scale and training
    "large": (GPTConfig(layers=6, width=192, heads=6, context=128), 2000),
}


def dense_model(args, split) -> GPT:
    cfg, default_steps = MODELS[args.model]
    args.steps = args.steps or default_steps
    path = HERE / "cache" / f"gpt_byte_{cfg.layers}x{cfg.width}_steps{args.steps}_seed{args.seed}.pt"
    model = GPT(cfg)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        print(f"loaded cached checkpoint {path.relative_to(HERE.parent)}")
        return model.eval()
    print(f"training {cfg} for {args.steps} steps (cached afterwards at {path.relative_to(HERE.parent)})")
    t0 = time.perf_counter()
    model = train(cfg, split.train, args.steps, args.batch, args.seed)
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def run_tiny(args) -> dict:
    split = load_stdlib_text()
    print(f"stdlib corpus: {split.train.numel()} train bytes ({split.train_files} files), "
          f"{split.val.numel()} val bytes ({split.val_files} files)")
    dense = dense_model(args, split)
    if args.train_only:
        return {}
    ctx = dense.cfg.context
    val = random_windows(split.val, args.eval_windows, ctx + 1, torch.Generator().manual_seed(1234))
    dense_loss = evaluate(dense, val)
    rows = [{"setting": "dense", "method": "dense", "losses": [dense_loss], "seconds": [0.0]}]
    for label, sparsity, pattern in SETTINGS:
        for name, method, scope in METHODS:
            draws = 1 if method == "magnitude" else args.draws  # magnitude ignores the calibration data
            losses, seconds = [], []
            for draw in range(draws):
                g = torch.Generator().manual_seed(10_000 + draw)
                calib = list(random_windows(split.train, args.nsamples, ctx, g))  # nsamples x [ctx]
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                prune_oneshot(model, calib, method=method, sparsity=sparsity, pattern=pattern, scope=scope,
                              progress=False)
                seconds.append(time.perf_counter() - t0)
                losses.append(evaluate(model, val))
            rows.append({"setting": label, "method": name, "losses": losses, "seconds": seconds})
            print(f"  {label:4s} {name:16s} loss {statistics.mean(losses):.4f}  ({statistics.mean(seconds):.2f} s)",
                  flush=True)
    return {"dense_loss": dense_loss, "rows": rows}


def summarize(result: dict) -> dict:
    dense = result["dense_loss"]
    print(f"\n{'setting':8s} {'method':16s} {'val loss':>9s} {'± std':>7s} {'ppl':>7s} {'Δ loss':>8s} {'time s':>7s} n")
    by = {}
    for row in result["rows"]:
        mean = statistics.mean(row["losses"])
        std = statistics.stdev(row["losses"]) if len(row["losses"]) > 1 else 0.0
        row.update(mean=mean, std=std, perplexity=math.exp(mean), delta=mean - dense,
                   mean_seconds=statistics.mean(row["seconds"]))
        by[(row["setting"], row["method"])] = row
        print(f"{row['setting']:8s} {row['method']:16s} {mean:9.4f} {std:7.4f} {math.exp(mean):7.3f} "
              f"{mean - dense:8.4f} {row['mean_seconds']:7.2f} {len(row['losses'])}")
    checks = {}
    for label in ("50%", "2:4"):
        sg, mag = by[(label, "sparsegpt")]["delta"], by[(label, "magnitude/layer")]["delta"]
        checks[f"sparsegpt_delta_le_half_magnitude_{label}"] = {"sparsegpt": sg, "magnitude": mag, "ok": sg <= 0.5 * mag}
    wa, mag = by[("50%", "wanda")]["mean"], by[("50%", "magnitude/layer")]["mean"]
    checks["wanda_beats_layer_magnitude_50%"] = {"wanda": wa, "magnitude": mag, "ok": wa < mag}
    slowest = max(r["mean_seconds"] for r in result["rows"])
    checks["pruning_takes_seconds"] = {"slowest_mean_s": slowest, "ok": slowest < 30}
    print("\ntargets:")
    for key, value in checks.items():
        print(f"  {'PASS' if value['ok'] else 'FAIL'}  {key}: " +
              ", ".join(f"{k}={v:.4f}" for k, v in value.items() if k != "ok"))
    return checks


def run_gpt2_small(args) -> dict:
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # 124M, random weights
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, model.config.vocab_size, (1, 512), generator=g) for _ in range(args.gpt2_nsamples)]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"GPT-2 small: {params / 1e6:.1f}M params, {len(calib)} x 512 calibration tokens, SparseGPT 50% on CPU")
    stats = prune_oneshot(model, calib, method="sparsegpt", sparsity=0.5, device="cpu", progress=True).sparsetorch_stats
    out = {"params": params, "nsamples": len(calib), "seqlen": 512, "minutes": stats.seconds / 60,
           "peak_rss_mb": stats.peak_memory_mb, "rss_before_mb": rss_before,
           "model_fp32_mb": params * 4 / 2**20, "layers": len(stats.layers)}
    print(f"SparseGPT 50% on GPT-2 small: {out['minutes']:.1f} min, peak RSS {out['peak_rss_mb']:.0f} MB "
          f"(model fp32 {out['model_fp32_mb']:.0f} MB, process before pruning {rss_before:.0f} MB)")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny", help="which byte GPT to prune")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the model's, 500 or 2000)")
    p.add_argument("--train-only", action="store_true", help="train and cache the dense model, then stop")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=3, help="calibration draws per data-driven method")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences of 128 bytes")
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--gpt2-small", action="store_true", help="instead: time SparseGPT on a 124M GPT-2 on CPU")
    p.add_argument("--gpt2-nsamples", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a crowded machine 1 thread avoids OpenMP spin-waiting
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    print(f"{meta['command']}\n{meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}")
    (HERE / "results").mkdir(exist_ok=True)
    if args.gpt2_small:
        result, path = {**meta, "gpt2_small": run_gpt2_small(args)}, HERE / "results" / "oneshot_gpt2_small.json"
    else:
        result = {**meta, **run_tiny(args)}
        if args.train_only:
            return 0
        result["targets"] = summarize(result)
        path = HERE / "results" / "oneshot.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
