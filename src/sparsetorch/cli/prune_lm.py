"""``sparsetorch prune-lm MODEL_DIR``: one-shot pruning of a transformers causal LM from a text file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..oneshot.api import DISTRIBUTIONS, METHODS

NAME = "prune-lm"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="prune a transformers causal LM in one shot (SparseGPT, Wanda, magnitude)",
                       description="Load MODEL_DIR with AutoModelForCausalLM, draw calibration windows from a text "
                                   "file (tokenised with the folder's tokenizer, else as raw bytes), prune block by "
                                   "block and write the pruned model with save_pretrained to --out.")
    p.add_argument("model_dir", help="a transformers model folder (config.json + weights)")
    p.add_argument("--method", choices=list(METHODS), default="sparsegpt")
    p.add_argument("--distribution", choices=list(DISTRIBUTIONS), default="uniform",
                   help="layer-wise sparsity: uniform, or owl (more weights kept where activations have outliers)")
    p.add_argument("--permute", action="store_true", help="RIA's input-channel permutation (N:M patterns only)")
    p.add_argument("--refine", choices=["dsnot"], default=None, help="refine the mask without training (DSnoT)")
    p.add_argument("--bits", type=int, choices=[4, 8], default=None,
                   help="quantize the kept weights onto an int8/int4 grid (SparseGPT: jointly with the mask)")
    p.add_argument("--group-size", type=int, default=None, help="inputs per quantization scale (default: per row)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights removed per layer (default 0.5; N:M patterns fix it)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4 (default %(default)s)")
    p.add_argument("--calibration", required=True, metavar="FILE", help="a text file to draw calibration sequences from")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (save_pretrained format)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default %(default)s)")
    p.add_argument("--skip", action="append", default=[], metavar="GLOB", help="layer name glob kept dense (repeatable)")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT column block (default %(default)s)")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT Hessian damping (default %(default)s)")
    p.add_argument("--device", default=None, help="where the math runs (default: cuda if available, else cpu)")
    return p


def calibration_ids(model_dir: Path, text_file: Path, nsamples: int, seqlen: int, seed: int, vocab: int):
    """``nsamples`` random windows of ``seqlen`` tokens from ``text_file``: a list of ``[1, seqlen]`` tensors."""
    import torch

    from ..errors import SparsityError

    if not text_file.is_file():
        raise SparsityError(f"calibration file not found: {text_file}; pass --calibration with a UTF-8 text file",
                            calibration=str(text_file))
    if nsamples < 1 or seqlen < 1:
        raise SparsityError(f"--nsamples and --seqlen must be positive, got {nsamples} and {seqlen}")
    if any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = torch.tensor(tokenizer(text_file.read_text(errors="replace"))["input_ids"], dtype=torch.long)
    else:  # a byte-level model: one token per byte
        if vocab < 256:
            raise SparsityError(f"{model_dir} has no tokenizer and a vocabulary of {vocab} < 256, so the calibration "
                                "text cannot be fed as raw bytes; add the model's tokenizer files to the folder")
        ids = torch.frombuffer(bytearray(text_file.read_bytes()), dtype=torch.uint8).long()
    if ids.numel() < seqlen + 1:
        raise SparsityError(f"{text_file} gives {ids.numel()} tokens, fewer than --seqlen {seqlen}; pass a longer "
                            "file or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return [ids[s : s + seqlen][None, :] for s in starts.tolist()]


def _max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def load_lm(model_dir: Path, seqlen: int):
    """AutoModelForCausalLM from ``model_dir``, checked to be a model folder whose context holds ``seqlen``."""
    from ..errors import SparsityError

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ImportError("this command needs transformers: pip install 'sparsetorch[transformers]'") from None
    if not (model_dir / "config.json").is_file():
        raise SparsityError(f"{model_dir} is not a transformers model folder (no config.json); pass the "
                            "folder written by save_pretrained", model_dir=str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    limit = _max_positions(model.config)
    if limit is not None and seqlen > limit:
        raise SparsityError(f"--seqlen {seqlen} exceeds the model's context of {limit} tokens; pass --seqlen {limit}")
    return model


def write_lm(model, model_dir: Path, out: Path, metadata: dict, values: str = "fp32") -> None:
    """``out``: the model by save_pretrained (any transformers code loads it), the source folder's tokenizer and
    ``sparsetorch.safetensors`` (masks and compressed storage, for sparsetorch.load)."""
    from ..formats.files import save

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    save(model, out / "sparsetorch.safetensors", values=values, metadata=metadata)


def run(args: argparse.Namespace) -> int:
    from ..oneshot import prune_oneshot
    from ..oneshot.api import skip_to_exclude

    model_dir, out = Path(args.model_dir), Path(args.out)
    model = load_lm(model_dir, args.seqlen)
    vocab = model.get_input_embeddings().num_embeddings
    calib = calibration_ids(model_dir, Path(args.calibration), args.nsamples, args.seqlen, args.seed, vocab)
    sparsity = args.sparsity if args.sparsity is not None else (None if ":" in args.pattern else 0.5)
    exclude = skip_to_exclude(args.skip) if args.skip else None
    model = prune_oneshot(model, calib, method=args.method, sparsity=sparsity, pattern=args.pattern,
                          distribution=args.distribution, permute=args.permute, refine=args.refine,
                          bits=args.bits, group_size=args.group_size,
                          exclude=exclude, block_size=args.block_size, damp=args.damp, device=args.device)
    stats = model.sparsetorch_stats
    write_lm(model, model_dir, out, {"oneshot": {"method": args.method, "pattern": args.pattern,
                                                 "distribution": args.distribution, "refine": args.refine,
                                                 "bits": args.bits}},
             values="grid" if args.bits else "fp32")
    (out / "oneshot.json").write_text(json.dumps(stats.to_dict(), indent=2))
    print(f"{'layer':48s} {'sparsity':>8s} {'seconds':>8s}")
    for r in stats.layers:
        print(f"{r.name:48s} {r.sparsity:8.3f} {r.seconds:8.3f}")
    print(f"{args.method} {stats.pattern}: {len(stats.layers)} layers in {stats.blocks} blocks, {stats.seconds:.1f} s, "
          f"peak memory {stats.peak_memory_mb:.0f} MB ({stats.memory_kind}) on {stats.device}; wrote {out}")
    return 0
