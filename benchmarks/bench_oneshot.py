"""One-shot pruning of byte-level GPTs trained on the Python stdlib's sources: the method x
distribution x sparsity table.

Held-out loss increase over dense (nats/byte) for magnitude, Wanda, RIA, SparseGPT and ALPS, each
with uniform and OWL sparsity, with and without DSnoT, at 50/60/70/80% unstructured and 2:4/4:8
(RIA with and without its permutation), joint sparse+int8/int4 against prune-then-round; mean and
spread over calibration draws, seconds per method, and the dense model's outlier statistics. The
papers' orderings are printed as PASS (reproduced) or FAIL.

    nice .venv/bin/python benchmarks/bench_oneshot.py                 # tiny 4x128 GPT (trains 500 steps once, cached)
    nice .venv/bin/python benchmarks/bench_oneshot.py --model large   # 6x192 GPT trained 2000 steps
    nice .venv/bin/python benchmarks/bench_oneshot.py --gpt2-small    # time and memory per method on a 124M GPT-2

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
from sparsetorch.oneshot.specs import applies_to, parse_spec, uses_data

HERE = Path(__file__).resolve().parent
SETTINGS = [("50%", 0.5, "unstructured"), ("60%", 0.6, "unstructured"), ("70%", 0.7, "unstructured"),
            ("80%", 0.8, "unstructured"), ("2:4", None, "2:4"), ("4:8", None, "4:8")]
BASE = ["magnitude", "wanda", "ria", "sparsegpt", "alps"]
SPECS = ([*BASE, *(f"{m}+owl" for m in BASE), *(f"{m}+dsnot" for m in BASE), *(f"{m}+owl+dsnot" for m in BASE),
          "ria+perm", "ria+perm+dsnot",
          "sparsegpt+int8", "sparsegpt+rtn8", "sparsegpt+int4g128", "sparsegpt+rtn4g128"])


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


def outlier_statistics(model: GPT, calib: list[torch.Tensor]) -> dict:
    """How heavy-tailed the dense model's activations are: per block, OWL's outlier ratio (share of
    |W| * ||X|| above 5x its mean) and the largest feature's RMS over the median feature's RMS at the
    block input (LLM.int8()-style outlier features)."""
    probe = copy.deepcopy(model)
    prune_oneshot(probe, calib, method="wanda", sparsity=0.5, distribution="owl", progress=False)
    rms = []
    hooks = [b.register_forward_pre_hook(lambda _m, a: rms.append(a[0].square().mean(dim=(0, 1)).sqrt()))
             for b in model.blocks]
    with torch.no_grad():
        model(torch.stack(calib[:8]))
    for h in hooks:
        h.remove()
    ratios = [float(r.max() / r.median()) for r in rms]
    return {"owl_outlier_ratio": probe.sparsetorch_stats.outlier_ratios, "max_over_median_feature_rms": ratios}


def prune_with_spec(model: GPT, calib, spec: str, sparsity, pattern: str) -> None:
    kwargs, extra = parse_spec(spec)
    prune_oneshot(model, calib, sparsity=sparsity, pattern=pattern, progress=False, **kwargs)
    if "rtn" in extra:  # the baseline of joint quantization: prune, then round each kept weight to the grid
        round_model_to_grid(model, *extra["rtn"])


def round_model_to_grid(model: GPT, bits: int, group_size: int | None) -> None:
    from sparsetorch.core.masks import iter_masks
    from sparsetorch.oneshot.quantize import QuantGrid, round_to_nearest

    grid = QuantGrid(bits, group_size)
    with torch.no_grad():
        for item in iter_masks(model):
            w, _ = round_to_nearest(item.module.weight.detach().float(), item.mask, grid)
            item.module.weight.copy_(w)


def run_table(args) -> dict:
    split = load_stdlib_text()
    print(f"stdlib corpus: {split.train.numel()} train bytes ({split.train_files} files), "
          f"{split.val.numel()} val bytes ({split.val_files} files)")
    dense = dense_model(args, split)
    if args.train_only:
        return {}
    ctx = dense.cfg.context
    val = random_windows(split.val, args.eval_windows, ctx + 1, torch.Generator().manual_seed(1234))
    dense_loss = evaluate(dense, val)
    print(f"dense val loss {dense_loss:.4f} nats/byte")
    draws = [list(random_windows(split.train, args.nsamples, ctx, torch.Generator().manual_seed(10_000 + d)))
             for d in range(args.draws)]  # nsamples x [ctx] each; calibration comes from the training split
    outliers = outlier_statistics(dense, draws[0])
    print("outlier statistics:", {k: [round(x, 3) for x in v] for k, v in outliers.items()})
    rows = [{"setting": "dense", "spec": "dense", "losses": [dense_loss], "seconds": [0.0]}]
    settings = [st for st in SETTINGS if st[0] in args.settings]
    for label, sparsity, pattern in settings:
        for spec in args.specs:
            if not applies_to(spec, pattern):
                continue
            losses, seconds = [], []
            for calib in draws if uses_data(spec) else draws[:1]:
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                prune_with_spec(model, calib, spec, sparsity, pattern)
                seconds.append(time.perf_counter() - t0)
                losses.append(evaluate(model, val))
            rows.append({"setting": label, "spec": spec, "losses": losses, "seconds": seconds})
            print(f"  {label:4s} {spec:24s} Δloss {statistics.mean(losses) - dense_loss:+.4f}  "
                  f"({statistics.mean(seconds):.2f} s)", flush=True)
    return {"model": args.model, "config": str(dense.cfg), "dense_loss": dense_loss, "outliers": outliers,
            "rows": rows}


def summarize(result: dict) -> dict:
    """The table (Δ loss mean ± std per spec and setting) and the papers' orderings, each checked."""
    dense = result["dense_loss"]
    by = {}
    for row in result["rows"]:
        mean = statistics.mean(row["losses"])
        row.update(mean=mean, std=statistics.stdev(row["losses"]) if len(row["losses"]) > 1 else 0.0,
                   delta=mean - dense, mean_seconds=statistics.mean(row["seconds"]))
        by[(row["setting"], row["spec"])] = row
    labels = [lab for lab, *_ in SETTINGS if any(k[0] == lab for k in by)]
    specs = list(dict.fromkeys(r["spec"] for r in result["rows"] if r["spec"] != "dense"))
    print(f"\nΔ loss over dense ({dense:.4f} nats/byte) on held-out files, mean ± std over calibration draws")
    print(f"{'spec':24s}" + "".join(f"{lab:>16s}" for lab in labels) + f"{'s (50%)':>9s}")
    for spec in specs:
        cells = [by.get((lab, spec)) for lab in labels]
        print(f"{spec:24s}" + "".join(f"{c['delta']:+9.4f} ±{c['std']:.3f}" if c else f"{'':>16s}" for c in cells)
              + (f"{by[(labels[0], spec)]['mean_seconds']:9.2f}" if (labels[0], spec) in by else ""))
    checks = {}

    def compare(key, better, worse, setting, slack=0.0):
        a, b = by.get((setting, better)), by.get((setting, worse))
        if a and b:
            checks[key] = {better: a["delta"], worse: b["delta"], "ok": a["delta"] <= b["delta"] + slack}

    compare("owl_lowers_wanda_70%", "wanda+owl", "wanda", "70%")
    compare("owl_lowers_sparsegpt_70%", "sparsegpt+owl", "sparsegpt", "70%")
    compare("ria_at_or_below_wanda_50%", "ria", "wanda", "50%")
    compare("permutation_improves_ria_2:4", "ria+perm", "ria", "2:4")
    compare("dsnot_lowers_wanda_70%", "wanda+dsnot", "wanda", "70%")
    compare("alps_at_or_below_sparsegpt_70%", "alps", "sparsegpt", "70%")
    compare("joint_int8_at_or_below_rtn_50%", "sparsegpt+int8", "sparsegpt+rtn8", "50%")
    compare("joint_int4_at_or_below_rtn_50%", "sparsegpt+int4g128", "sparsegpt+rtn4g128", "50%")
    compare("sparsegpt_beats_magnitude_50%", "sparsegpt", "magnitude", "50%")
    print("\npapers' orderings (PASS = reproduced here):")
    for key, value in checks.items():
        print(f"  {'PASS' if value['ok'] else 'FAIL'}  {key}: " +
              ", ".join(f"{k} {v:+.4f}" for k, v in value.items() if k != "ok"))
    return checks


def run_gpt2_small(args) -> dict:
    """Seconds and peak memory of each spec on a 124M GPT-2 (random weights: timing only), one
    spec per fresh process so that peak RSS belongs to that spec alone."""
    import subprocess

    out = {}
    for spec in args.gpt2_specs:
        cmd = [sys.executable, __file__, "--gpt2-one", spec, "--gpt2-nsamples", str(args.gpt2_nsamples)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[spec] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {spec:20s} {out[spec]['minutes']:6.2f} min  peak RSS {out[spec]['peak_rss_mb']:6.0f} MB", flush=True)
    base = out.get("sparsegpt")
    if base:
        print("\ntime relative to SparseGPT: " + ", ".join(f"{k} {v['minutes'] / base['minutes']:.2f}x"
                                                         for k, v in out.items()))
    return out


def run_gpt2_one(args) -> dict:
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()  # 124M, random weights
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, model.config.vocab_size, (1, 512), generator=g) for _ in range(args.gpt2_nsamples)]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kwargs, extra = parse_spec(args.gpt2_one)
    sparsity, pattern = (None, "2:4") if kwargs.get("permute") else (0.5, "unstructured")
    stats = prune_oneshot(model, calib, sparsity=sparsity, pattern=pattern, device="cpu", progress=False,
                          **kwargs).sparsetorch_stats
    return {"spec": args.gpt2_one, "params": params, "nsamples": len(calib), "seqlen": 512,
            "minutes": stats.seconds / 60, "peak_rss_mb": stats.peak_memory_mb, "rss_before_mb": rss_before,
            "model_fp32_mb": params * 4 / 2**20, "layers": len(stats.layers), "pattern": pattern}


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
    p.add_argument("--specs", nargs="+", default=SPECS, help="configurations (see benchmarks/oneshot_specs.py)")
    p.add_argument("--settings", nargs="+", default=[lab for lab, *_ in SETTINGS], help="sparsities/patterns")
    p.add_argument("--append", action="store_true", help="merge these rows into the model's existing results file")
    p.add_argument("--gpt2-small", action="store_true", help="instead: time SparseGPT on a 124M GPT-2 on CPU")
    p.add_argument("--gpt2-nsamples", type=int, default=128)
    p.add_argument("--gpt2-specs", nargs="+", default=["sparsegpt", "magnitude", "wanda", "ria", "alps", "wanda+owl",
                                                        "wanda+dsnot", "sparsegpt+int8", "ria+perm"])
    p.add_argument("--gpt2-one", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # on a crowded machine 1 thread avoids OpenMP spin-waiting
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    print(f"{meta['command']}\n{meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}")
    (HERE / "results").mkdir(exist_ok=True)
    if args.gpt2_one:  # a child process of --gpt2-small: one spec, JSON on the last line
        print(json.dumps(run_gpt2_one(args)))
        return 0
    if args.gpt2_small:
        result, path = {**meta, "gpt2_small": run_gpt2_small(args)}, HERE / "results" / "oneshot_gpt2_small.json"
    else:
        path = HERE / "results" / f"oneshot_{args.model}.json"
        result = {**meta, **run_table(args)}
        if args.train_only:
            return 0
        if args.append and path.is_file():  # add these specs' rows to an earlier run of the same model
            old = json.loads(path.read_text())
            assert old["dense_loss"] == result["dense_loss"], "--append needs the same model and evaluation windows"
            new_keys = {(r["setting"], r["spec"]) for r in result["rows"]}
            result["rows"] = [r for r in old["rows"] if (r["setting"], r["spec"]) not in new_keys] + \
                [r for r in result["rows"] if r["spec"] != "dense" or not any(o["spec"] == "dense" for o in old["rows"])]
            result["commands"] = old.get("commands", [old["command"]]) + [meta["command"]]
        result["targets"] = summarize(result)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
