"""Recovery after one-shot pruning: plain fine-tuning vs distillation vs sparse LoRA at the same token budget.

The byte GPTs of bench_oneshot.py (trained on the Python stdlib's sources, cached under benchmarks/cache/) are
pruned by SparseGPT at 50%, 70% and 2:4, then each recovery runs on the same training windows, a fixed share of
the dense model's pre-training tokens:

    finetune        next-token loss only, no teacher (the baseline)
    distill         logit KL from the dense model (T = 1)
    distill+hidden  the same plus normalised MSE on every block's output
    lora            PEFT LoRA (rank 16) trained by distillation through the masks, then merged
    dense+finetune  (control) the dense model fine-tuned on the same tokens: what the budget does without pruning

Each run gets the better of two peak learning rates, chosen on validation windows disjoint from the evaluation
windows. Reported per run: held-out loss over dense (nats/byte), wall time and peak RSS (the teacher's forward
included), and whether the masks came out bit-identical. The literature's expectations are checked and printed
as PASS / FAIL.

    nice .venv/bin/python benchmarks/bench_recovery.py                  # 4x128 GPT, 2% of its 2.1M pre-training bytes
    nice .venv/bin/python benchmarks/bench_recovery.py --model large    # 6x192 GPT, 2% of 8.3M

Results go to benchmarks/results/recovery_<model>.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_oneshot import MODELS, dense_model, evaluate  # noqa: E402

from sparsetorch.core.masks import iter_masks  # noqa: E402
from sparsetorch.data.text import load_stdlib_text, random_windows  # noqa: E402
from sparsetorch.oneshot import prune_oneshot  # noqa: E402
from sparsetorch.recipes.prune_and_recover import PeakRSS  # noqa: E402
from sparsetorch.recovery import DistillLoss, add_lora, distill, merge_lora  # noqa: E402

SETTINGS = {"50%": (0.5, "unstructured"), "70%": (0.7, "unstructured"), "2:4": (None, "2:4")}
RECOVERIES = {  # name -> (teacher used, loss, lora, learning rates tried)
    "finetune": (False, DistillLoss(kl=0.0, task=1.0), False, (3e-4, 1e-3)),
    "distill": (True, DistillLoss(), False, (3e-4, 1e-3)),
    "distill+hidden": (True, DistillLoss(hidden=1.0), False, (3e-4, 1e-3)),
    "lora": (True, DistillLoss(), True, (1e-3, 3e-3)),
}


def masks_of(model) -> dict[str, torch.Tensor]:
    return {m.fqn: m.mask.clone() for m in iter_masks(model)}


def run_one(pruned, teacher, train, name: str, lr: float, steps: int, batch: int, seed: int):
    """One recovery run from a copy of ``pruned``: (model, seconds, peak RSS MB, RSS growth MB, masks exact)."""
    uses_teacher, loss, lora, _ = RECOVERIES.get(name, (False, DistillLoss(kl=0.0, task=1.0), False, ()))
    before = masks_of(pruned)
    with PeakRSS() as mem:
        start_mb = mem.peak_mb
        student = copy.deepcopy(pruned)
        if lora:
            student = add_lora(student, r=16, alpha=32.0, generator=torch.Generator().manual_seed(seed))
        result = distill(student, teacher if uses_teacher else None, train, steps=steps, batch_size=batch, lr=lr,
                         loss=loss, generator=torch.Generator().manual_seed(seed))
        if lora:
            student = merge_lora(student)
    after = masks_of(student)
    exact = after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    return student.eval(), result.seconds, mem.peak_mb, mem.peak_mb - start_mb, exact


def sparsity(model) -> float:
    masks = masks_of(model)
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def run(args) -> dict:
    split = load_stdlib_text()
    dense = dense_model(args, split)
    cfg, _ = MODELS[args.model]
    ctx = cfg.context
    pretrain_tokens = args.steps * args.batch * (ctx + 1)
    rows = max(args.recovery_batch, round(args.budget * pretrain_tokens / ctx))
    steps = max(1, rows // args.recovery_batch)
    train = random_windows(split.train, rows, ctx, torch.Generator().manual_seed(20_000))
    calib = list(random_windows(split.train, args.nsamples, ctx, torch.Generator().manual_seed(10_000)))
    val = random_windows(split.val, args.eval_windows, ctx + 1, torch.Generator().manual_seed(1234))
    select = random_windows(split.val, args.select_windows, ctx + 1, torch.Generator().manual_seed(4321))
    dense_loss = evaluate(dense, val)
    print(f"dense {args.model} {cfg}: val loss {dense_loss:.4f} nats/byte; recovery budget {rows * ctx} tokens "
          f"({100 * rows * ctx / pretrain_tokens:.1f}% of {pretrain_tokens} pre-training tokens), {steps} steps of "
          f"{args.recovery_batch} x {ctx}", flush=True)
    out = {"model": args.model, "config": str(cfg), "dense_loss": dense_loss, "pretrain_tokens": pretrain_tokens,
           "budget_tokens": rows * ctx, "steps": steps, "batch": args.recovery_batch, "runs": []}

    def best_of(pruned, name, lrs):
        tried = []
        for lr in lrs:
            model, seconds, peak, grow, exact = run_one(pruned, dense, train, name, lr, steps, args.recovery_batch,
                                                        args.seed)
            tried.append((evaluate(model, select), lr, model, seconds, peak, grow, exact))
        sel, lr, model, seconds, peak, grow, exact = min(tried, key=lambda t: t[0])
        return {"lr": lr, "select_losses": {str(t[1]): t[0] for t in tried}, "loss": evaluate(model, val),
                "seconds": seconds, "peak_rss_mb": peak, "rss_growth_mb": grow, "masks_exact": exact}

    # control: the dense model given the same budget (masks: none, so "exact" is trivially true)
    control = best_of(dense, "dense+finetune", (3e-4, 1e-3))
    out["runs"].append({"setting": "dense", "recovery": "dense+finetune", **control})
    print(f"  dense  dense+finetune  Δ {control['loss'] - dense_loss:+.4f}", flush=True)
    for label in args.settings:
        spars, pattern = SETTINGS[label]
        pruned = copy.deepcopy(dense)
        with PeakRSS() as mem:
            prune_oneshot(pruned, calib, method="sparsegpt", sparsity=spars, pattern=pattern, progress=False)
        one_shot = evaluate(pruned, val)
        out["runs"].append({"setting": label, "recovery": "sparsegpt", "loss": one_shot, "lr": None,
                            "seconds": pruned.sparsetorch_stats.seconds, "peak_rss_mb": mem.peak_mb,
                            "masks_exact": True, "sparsity": sparsity(pruned)})
        print(f"  {label:5s} sparsegpt       Δ {one_shot - dense_loss:+.4f}", flush=True)
        for name in args.recoveries:
            row = best_of(pruned, name, RECOVERIES[name][3])
            row.update(setting=label, recovery=name, sparsity=sparsity(pruned))
            out["runs"].append(row)
            print(f"  {label:5s} {name:15s} Δ {row['loss'] - dense_loss:+.4f}  lr {row['lr']:g}  "
                  f"{row['seconds']:.1f} s  peak {row['peak_rss_mb']:.0f} MB  masks exact {row['masks_exact']}",
                  flush=True)
    return out


def summarize(result: dict) -> dict:
    dense = result["dense_loss"]
    by = {(r["setting"], r["recovery"]): r for r in result["runs"]}
    settings = [s for s in SETTINGS if (s, "sparsegpt") in by]
    names = ["sparsegpt", *[n for n in RECOVERIES if any((s, n) in by for s in settings)]]
    print(f"\nheld-out loss over dense ({dense:.4f} nats/byte); {result['budget_tokens']} recovery tokens "
          f"({100 * result['budget_tokens'] / result['pretrain_tokens']:.1f}% of pre-training)")
    print(f"{'':16s}" + "".join(f"{s:>10s}" for s in settings) + f"{'s (' + settings[0] + ')':>9s}{'peak MB':>9s}")
    for n in names:
        cells = [by.get((s, n)) for s in settings]
        first = cells[0] or {}
        print(f"{n:16s}" + "".join(f"{c['loss'] - dense:+10.4f}" if c else f"{'':>10s}" for c in cells)
              + f"{first.get('seconds', 0):9.1f}{first.get('peak_rss_mb', 0):9.0f}")
    ctl = by.get(("dense", "dense+finetune"))
    if ctl:
        print(f"{'dense+finetune':16s}{ctl['loss'] - dense:+10.4f}  (control: the dense model given the same tokens)")
    checks = {}

    def gap(s, n):
        return by[(s, n)]["loss"] - dense if (s, n) in by else None

    for s in settings:
        if gap(s, "distill") is not None and gap(s, "finetune") is not None:
            checks[f"distill_beats_finetune_{s}"] = {"distill": gap(s, "distill"), "finetune": gap(s, "finetune"),
                                                     "ok": gap(s, "distill") < gap(s, "finetune")}
    if gap("50%", "distill") is not None:
        checks["distilled_50%_within_0.02"] = {"distill": gap("50%", "distill"), "ok": gap("50%", "distill") <= 0.02}
    if gap("2:4", "distill") is not None:
        won = 1 - gap("2:4", "distill") / gap("2:4", "sparsegpt")
        checks["distilled_2:4_recovers_half"] = {"fraction": won, "ok": won >= 0.5}
    checks["masks_exact_everywhere"] = {"ok": all(r["masks_exact"] for r in result["runs"])}
    print("\nexpectations (PASS = shown here):")
    for key, value in checks.items():
        print(f"  {'PASS' if value['ok'] else 'FAIL'}  {key}: "
              + ", ".join(f"{k} {v:+.4f}" for k, v in value.items() if k != "ok"))
    return checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--steps", type=int, default=None, help="the dense model's training steps (default: its own)")
    p.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help="the dense model's training batch (for its token count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=0.02, help="recovery tokens as a share of pre-training tokens")
    p.add_argument("--recovery-batch", type=int, default=8, help="sequences per recovery step")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences")
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--select-windows", type=int, default=64, help="validation windows that pick the learning rate")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--recoveries", nargs="+", default=list(RECOVERIES), choices=list(RECOVERIES))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    print(f"{meta['command']}\n{meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}")
    result = {**meta, **run(args)}
    result["checks"] = summarize(result)
    path = HERE / "results" / f"recovery_{args.model}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
