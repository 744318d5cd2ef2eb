"""Physically smaller LLMs: depth vs width pruning at the same parameter cut, each distilled with the same budget,
against the same shrunk architecture trained from scratch on as many tokens; and an MoE with half its experts cut.

A 12-block byte-level Llama (GQA) is trained on the Python stdlib's sources (cached under benchmarks/cache/), then
about 25% of its parameters are removed four ways, scored on calibration windows:

    depth          sparsetorch.shrink.remove_blocks: a quarter of the blocks (ShortGPT's Block Influence)
    width-mlp      remove_mlp_channels: a third of every MLP's neurons (Minitron's activation score)
    width-hidden   remove_hidden: a quarter of the hidden size (embeddings, norms, every projection, the head)
    depth+width    one block of twelve, then a quarter of the MLP neurons

Each is distilled from the unpruned model (logit KL) for the same steps, and the same architecture is trained
from scratch (fresh weights from the pruned model's config, next-token loss) on the same number of tokens:
Minitron's claim is that prune + distil beats that. Reported: held-out loss (nats/byte) after pruning and after
recovery, parameters, and tokens/s at batch 1 and 16 (per CPU second with one thread, so that a shared machine
measures the model rather than its neighbours) for prefill (one forward over the context) and decode
(greedy generation with the KV cache). The MoE part trains a Mixtral-style model (8 experts, top-2), removes half
the experts by REAP saliency (and, for comparison, a random half), distils, and times it the same way.

    nice .venv/bin/python benchmarks/bench_shrink_llm.py --preset small     # 12x64 Llama, 4x64 MoE: 10 min, 4 with cached teachers
    nice .venv/bin/python benchmarks/bench_shrink_llm.py --preset full      # 12x96 Llama trained 2200 steps, 4x96 MoE 1200: about an hour

Every count is configurable (--train-steps, --budget-steps, --layers...). Results go to
benchmarks/results/shrink_llm_<preset>.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsetorch.data.text import load_stdlib_text, random_windows
from sparsetorch.recovery import DistillLoss, distill
from sparsetorch.shrink import remove_blocks, remove_experts, remove_hidden, remove_mlp_channels, width_importance

HERE = Path(__file__).resolve().parent
PRESETS = {
    "small": dict(layers=12, hidden=64, heads=4, kv_heads=2, intermediate=192, context=64, train_steps=500,
                  train_batch=16, budget_steps=100, budget_batch=16, lr=3e-3, distill_lr=1e-3,
                  moe_layers=4, moe_intermediate=96, experts=8, top_k=2, moe_train_steps=400),
    # 12 blocks trained 2200 steps: longer than bench_oneshot's 2000-step model, and about an hour on one thread
    "full": dict(layers=12, hidden=96, heads=6, kv_heads=2, intermediate=288, context=64, train_steps=2200,
                 train_batch=16, budget_steps=250, budget_batch=16, lr=2e-3, distill_lr=1e-3,
                 moe_layers=4, moe_intermediate=144, experts=8, top_k=2, moe_train_steps=1200),
}


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(model, windows: torch.Tensor) -> float:
    """Mean next-byte loss (nats/byte) over fixed windows [N, T+1]."""
    model.eval()
    total = 0.0
    for w in windows.split(32):
        logits = model(w[:, :-1], use_cache=False).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum").item()
    return total / windows[:, 1:].numel()


def train(model, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int, teacher=None):
    """The library's one training loop: next-token loss without a teacher, logit KL with one."""
    loss = DistillLoss() if teacher is not None else DistillLoss(kl=0.0, task=1.0)
    result = distill(model, teacher, data, steps=steps, batch_size=batch, lr=lr, loss=loss,
                     generator=torch.Generator().manual_seed(seed))
    return model.eval(), result.seconds


@torch.inference_mode()
def seconds(model, kind: str, batch: int, args) -> float:
    """One timed run: ``prefill`` (a forward over ``context`` tokens) or ``decode`` (greedy generation of
    ``new_tokens`` tokens with the KV cache after an 8-token prompt)."""
    model.eval()
    ids = torch.randint(0, 256, (batch, args.context), generator=torch.Generator().manual_seed(7))
    clock = clock_for(args)
    t0 = clock()
    if kind == "prefill":
        model(ids, use_cache=False)
    else:
        prompt = ids[:, :8]
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                       min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    return clock() - t0


def clock_for(args):
    """CPU time of this process with one thread: the work done, whatever else the machine runs (on a shared
    machine wall time measures the neighbours); wall time with more threads (their waits are part of the cost)."""
    return time.process_time if args.threads == 1 else time.perf_counter


def paired_speed(reference, model, args) -> dict:
    """Tokens/s of ``model`` and ``reference``, timed alternately (a warm-up each, then ``reps`` pairs) and the
    fastest run of each kept: on a shared machine the least disturbed run is the closest to the true speed."""
    out = {}
    for kind in ("prefill", "decode"):
        for b in (1, 16):
            seconds(reference, kind, b, args), seconds(model, kind, b, args)
            ref, mod = [], []
            for _ in range(args.reps):
                ref.append(seconds(reference, kind, b, args))
                mod.append(seconds(model, kind, b, args))
            tokens = b * (args.context if kind == "prefill" else args.new_tokens)
            out[f"{kind} b{b}"] = {"tokens_per_s": tokens / min(mod), "reference_tokens_per_s": tokens / min(ref),
                                   "ratio": min(ref) / min(mod)}
    return out


def cached_teacher(kind: str, config, data, steps, args):
    """Train ``config`` from scratch (or load the cached result): the model every variant starts from."""
    import transformers

    key = hashlib.sha256(json.dumps([config.to_dict(), steps, args.train_batch, args.lr, args.seed],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = HERE / "cache" / f"shrink_llm_{kind}_{key}"
    if (path / "config.json").is_file():
        print(f"loaded cached {kind} teacher {path.relative_to(HERE.parent)}", flush=True)
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval(), None
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    print(f"training the {kind} teacher ({params(model):,} parameters) for {steps} steps", flush=True)
    model, seconds = train(model, data, steps, args.train_batch, args.lr, args.seed)
    model.save_pretrained(path)
    print(f"  trained in {seconds:.0f} s, cached at {path.relative_to(HERE.parent)}", flush=True)
    return model, seconds


def variants(args) -> dict:
    """name -> (description, function pruning a model in place with calibration windows)."""
    quarter = round(args.layers / 4)
    return {
        "depth": (f"-{quarter} of {args.layers} blocks", lambda m, c: remove_blocks(m, quarter, c)),
        "width-mlp": ("-1/3 MLP neurons", lambda m, c: remove_mlp_channels(m, 1 / 3, c)),
        "width-hidden": ("-1/4 hidden size", lambda m, c: remove_hidden(m, 0.25, c)),
        "depth+width": (f"-1 of {args.layers} blocks, -1/4 MLP",
                        lambda m, c: remove_mlp_channels(remove_blocks(m, 1, c), 0.25, c)),
    }


def run_dense(args, split, out: dict) -> None:
    import transformers

    cfg = transformers.LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   intermediate_size=args.intermediate, vocab_size=256,
                                   max_position_embeddings=2 * args.context, tie_word_embeddings=False,
                                   bos_token_id=0, eos_token_id=None, pad_token_id=0)
    ctx = args.context
    gen = torch.Generator().manual_seed(args.seed)
    pretrain = random_windows(split.train, args.train_steps * args.train_batch, ctx + 1, gen)
    teacher, seconds = cached_teacher("llama", cfg, pretrain, args.train_steps, args)
    budget = random_windows(split.train, args.budget_steps * args.budget_batch, ctx + 1,
                            torch.Generator().manual_seed(20_000))
    calib = list(random_windows(split.train, args.nsamples, ctx, torch.Generator().manual_seed(10_000)))
    val = random_windows(split.val, args.eval_windows, ctx + 1, torch.Generator().manual_seed(1234))
    base = evaluate(teacher, val)
    out.update(pretrain_tokens=pretrain.numel(), budget_tokens=budget.numel(), teacher_seconds=seconds)
    rows = [{"name": "teacher", "what": str(f"{args.layers}x{args.hidden}"), "params": params(teacher), "pruned": base,
             "recovered": base}]
    print(f"teacher: {params(teacher):,} parameters, val loss {base:.4f}; budget {budget.numel():,} tokens "
          f"({100 * budget.numel() / pretrain.numel():.1f}% of pre-training)", flush=True)
    for name, (what, prune) in variants(args).items():
        student = prune(copy.deepcopy(teacher), calib)
        pruned = evaluate(student, val)
        student, secs = train(student, budget, args.budget_steps, args.budget_batch, args.distill_lr, args.seed,
                              teacher=teacher)
        torch.manual_seed(args.seed)
        scratch = type(student)(copy.deepcopy(student.config))  # the same architecture, fresh weights
        assert params(scratch) == params(student), "the pruned model's config does not describe it"
        scratch, scratch_secs = train(scratch, budget, args.budget_steps, args.budget_batch, args.lr, args.seed)
        row = {"name": name, "what": what, "params": params(student), "pruned": pruned, "recovered": evaluate(student, val),
               "scratch": evaluate(scratch, val), "distill_seconds": secs, "scratch_seconds": scratch_secs,
               "speed": paired_speed(teacher, student, args)}
        rows.append(row)
        print(f"  {name:13s} {row['params'] / rows[0]['params']:.3f} params  pruned {pruned:.4f}  distilled "
              f"{row['recovered']:.4f}  scratch {row['scratch']:.4f}", flush=True)
    out["dense"] = {"config": cfg.to_dict(), "rows": rows}


def run_moe(args, split, out: dict) -> None:
    import transformers

    cfg = transformers.MixtralConfig(num_hidden_layers=args.moe_layers, hidden_size=args.hidden,
                                     num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                     intermediate_size=args.moe_intermediate, num_local_experts=args.experts,
                                     num_experts_per_tok=args.top_k, vocab_size=256,
                                     max_position_embeddings=2 * args.context, tie_word_embeddings=False,
                                     bos_token_id=0, eos_token_id=None, pad_token_id=0)
    ctx = args.context
    pretrain = random_windows(split.train, args.moe_train_steps * args.train_batch, ctx + 1,
                              torch.Generator().manual_seed(args.seed + 1))
    teacher, seconds = cached_teacher("mixtral", cfg, pretrain, args.moe_train_steps, args)
    budget = random_windows(split.train, args.budget_steps * args.budget_batch, ctx + 1,
                            torch.Generator().manual_seed(20_000))
    calib = list(random_windows(split.train, args.nsamples, ctx, torch.Generator().manual_seed(10_000)))
    val = random_windows(split.val, args.eval_windows, ctx + 1, torch.Generator().manual_seed(1234))
    base = evaluate(teacher, val)
    half = args.experts // 2
    rows = [{"name": "moe teacher", "params": params(teacher), "pruned": base, "recovered": base}]
    reap = remove_experts(copy.deepcopy(teacher), half, calib)
    randomly = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(args.seed)
    scores = [torch.rand(args.experts, generator=gen) for _ in range(args.moe_layers)]
    remove_experts(randomly, half, scores=scores)
    rows.append({"name": "random half", "params": params(randomly), "pruned": evaluate(randomly, val)})
    pruned = evaluate(reap, val)
    reap, secs = train(reap, budget, args.budget_steps, args.budget_batch, args.distill_lr, args.seed, teacher=teacher)
    rows.append({"name": "REAP half", "params": params(reap), "pruned": pruned, "recovered": evaluate(reap, val),
                 "distill_seconds": secs, "speed": paired_speed(teacher, reap, args),
                 "saliency": [s.tolist() for s in width_importance(teacher, calib).experts]})
    print(f"  moe: teacher {base:.4f}, random half {rows[1]['pruned']:.4f}, REAP half {pruned:.4f} -> distilled "
          f"{rows[2]['recovered']:.4f}", flush=True)
    out["moe"] = {"config": cfg.to_dict(), "teacher_seconds": seconds, "rows": rows}


def summarize(out: dict) -> dict:
    checks = {}
    for part in ("dense", "moe"):
        if part not in out:
            continue
        rows = out[part]["rows"]
        ref = rows[0]
        unit = "tokens per CPU second (1 thread)" if out["threads"] == 1 else "tokens/s"
        print(f"\n{part}: held-out loss (nats/byte); speed: {unit} over {ref['name']}'s, timed alternately "
              f"(prefill b1 / b16, decode b1 / b16)")
        print(f"{'model':14s}{'params':>10s}{'ratio':>7s}{'pruned':>9s}{'distilled':>10s}{'scratch':>9s}"
              f"{'pre b1':>8s}{'pre b16':>8s}{'dec b1':>8s}{'dec b16':>8s}")
        for r in rows:
            sp = r.get("speed")
            cells = "".join(f"{sp[f'{k} {b}']['ratio']:8.2f}" for k in ("prefill", "decode") for b in ("b1", "b16")) \
                if sp else "" if r is not ref else "".join(f"{1:8.2f}" for _ in range(4))
            rec = f"{r['recovered']:10.4f}" if "recovered" in r else f"{'':10s}"
            scr = f"{r['scratch']:9.4f}" if "scratch" in r else f"{'':9s}"
            print(f"{r['name']:14s}{r['params']:10,d}{r['params'] / ref['params']:7.3f}{r['pruned']:9.4f}{rec}{scr}{cells}")
        timed = [r["speed"] for r in rows if r.get("speed")]
        print(f"{ref['name']} {unit} (median over its pairings): " + ", ".join(
            f"{k} {statistics.median(t[k]['reference_tokens_per_s'] for t in timed):,.0f}" for k in timed[0]))
        for r in rows[1:]:
            if "scratch" in r:
                checks[f"prune+distil_beats_scratch_{r['name']}"] = {"distilled": r["recovered"], "scratch": r["scratch"],
                                                                     "ok": r["recovered"] < r["scratch"]}
    if "moe" in out:
        rows = {r["name"]: r for r in out["moe"]["rows"]}
        checks["reap_beats_random_half"] = {"reap": rows["REAP half"]["pruned"], "random": rows["random half"]["pruned"],
                                            "ok": rows["REAP half"]["pruned"] < rows["random half"]["pruned"]}
    print("\nexpectations (PASS = shown here):")
    for key, value in checks.items():
        print(f"  {'PASS' if value['ok'] else 'FAIL'}  {key}: " + ", ".join(f"{k} {v:.4f}" for k, v in value.items()
                                                                       if k != "ok"))
    return checks


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for key, value in PRESETS["small"].items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    p.add_argument("--eval-windows", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode timing")
    p.add_argument("--reps", type=int, default=5, help="timed runs per model and setting (the fastest counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    args = p.parse_args()
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": {k: v for k, v in vars(args).items()}}
    print(f"{meta['command']}\n{meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}")
    split = load_stdlib_text()
    out: dict = dict(meta)
    t0 = time.perf_counter()
    if "dense" in args.parts:
        run_dense(args, split, out)
    if "moe" in args.parts:
        run_moe(args, split, out)
    out["seconds"] = time.perf_counter() - t0
    out["checks"] = summarize(out)
    path = HERE / "results" / f"shrink_llm_{args.preset}.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"total {out['seconds']:.0f} s; wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
