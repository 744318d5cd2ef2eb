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
                                   "block and write the pruned model with save_pretrained to --out. A checkpoint "
                                   "larger than half the available memory (or --out-of-core) is pruned out of core: "
                                   "one block in memory at a time, each written to --out when done, resumable. "
                                   "Launched by torchrun, each rank calibrates on its share of the windows, the "
                                   "statistics are summed over the ranks and rank 0 writes --out.")
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
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out-of-core", action="store_true",
                       help="read and prune one block at a time from the folder's shards and write each pruned block "
                            "to --out as soon as it is done (memory: embeddings + two blocks + activations; "
                            "resumable: rerun the same command after a kill). Default when the checkpoint is larger "
                            "than half the available memory")
    where.add_argument("--in-memory", action="store_true", help="load the whole model (default when it fits)")
    p.add_argument("--activations", choices=["memory", "disk"], default="memory",
                   help="out of core: hold the calibration activations in memory or spill them to --out")
    p.add_argument("--activation-dtype", choices=["float16", "bfloat16"], default=None,
                   help="out of core: hold the activations in half precision (default: the model's dtype)")
    return p


def checkpoint_bytes(model_dir: Path) -> int:
    """Bytes of the folder's safetensors weights (what loading the model in memory at least takes)."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")
               if p.is_file() and p.name != "sparsetorch.safetensors")


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def wants_out_of_core(args: argparse.Namespace, model_dir: Path) -> bool:
    if args.out_of_core or args.in_memory:
        return bool(args.out_of_core)
    free = available_bytes()
    return free is not None and checkpoint_bytes(model_dir) > free / 2


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
    """AutoModelForCausalLM from ``model_dir``, checked (by ``lm_config``, before any weight is read) to be a model
    folder whose context holds ``seqlen``."""
    config = lm_config(model_dir, seqlen)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, config=config)


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


def lm_config(model_dir: Path, seqlen: int):
    """The folder's transformers config, checked to hold ``seqlen`` tokens (nothing loaded)."""
    from ..errors import SparsityError

    try:
        from transformers import AutoConfig
    except ImportError:
        raise ImportError("this command needs transformers: pip install 'sparsetorch[transformers]'") from None
    if not (model_dir / "config.json").is_file():
        raise SparsityError(f"{model_dir} is not a transformers model folder (no config.json); pass the "
                            "folder written by save_pretrained", model_dir=str(model_dir))
    config = AutoConfig.from_pretrained(model_dir)
    limit = _max_positions(config)
    if limit is not None and seqlen > limit:
        raise SparsityError(f"--seqlen {seqlen} exceeds the model's context of {limit} tokens; pass --seqlen {limit}")
    return config


def run(args: argparse.Namespace) -> int:
    """Under torchrun (``torchrun --nproc_per_node=N -m sparsetorch.cli prune-lm ...``) every rank runs this on
    its shard of the calibration windows, the statistics are summed over the ranks (every rank ends with the
    model one process makes from all the windows), and rank 0 alone writes ``--out`` and prints."""
    from ..core.distributed import launched_process_group

    with launched_process_group():
        return _prune(args)


def _prune(args: argparse.Namespace) -> int:
    import torch

    from ..core.distributed import any_rank, rank_and_world
    from ..oneshot import prune_oneshot, shard_calibration
    from ..oneshot.api import skip_to_exclude

    writer = rank_and_world()[0] == 0
    model_dir, out = Path(args.model_dir), Path(args.out)
    sparsity = args.sparsity if args.sparsity is not None else (None if ":" in args.pattern else 0.5)
    exclude = skip_to_exclude(args.skip) if args.skip else None
    options = dict(method=args.method, sparsity=sparsity, pattern=args.pattern, distribution=args.distribution,
                   permute=args.permute, refine=args.refine, bits=args.bits, group_size=args.group_size,
                   exclude=exclude, block_size=args.block_size, damp=args.damp, device=args.device)
    if any_rank(wants_out_of_core(args, model_dir)):  # ranks with different free memory still agree
        vocab = lm_config(model_dir, args.seqlen).get_text_config().vocab_size
        calib = calibration_ids(model_dir, Path(args.calibration), args.nsamples, args.seqlen, args.seed, vocab)
        calib = shard_calibration(calib)  # this rank's windows (one process: all of them)
        half = getattr(torch, args.activation_dtype) if args.activation_dtype else None
        stats = prune_oneshot(model_dir, calib, out=out, activations=args.activations, activation_dtype=half,
                              **options)
    else:
        model = load_lm(model_dir, args.seqlen)
        vocab = model.get_input_embeddings().num_embeddings
        calib = calibration_ids(model_dir, Path(args.calibration), args.nsamples, args.seqlen, args.seed, vocab)
        stats = prune_oneshot(model, shard_calibration(calib), **options).sparsetorch_stats
        if not writer:  # every rank holds the same pruned model; rank 0 writes it
            return 0
        write_lm(model, model_dir, out, {"oneshot": {"method": args.method, "pattern": args.pattern,
                                                     "distribution": args.distribution, "refine": args.refine,
                                                     "bits": args.bits}},
                 values="grid" if args.bits else "fp32")
        (out / "oneshot.json").write_text(json.dumps(stats.to_dict(), indent=2))
    if not writer:
        return 0
    print(f"{'layer':48s} {'sparsity':>8s} {'seconds':>8s}")
    for r in stats.layers:
        print(f"{r.name:48s} {r.sparsity:8.3f} {r.seconds:8.3f}")
    print(f"{args.method} {stats.pattern} ({stats.mode}): {len(stats.layers)} layers in {stats.blocks} blocks, "
          f"{stats.seconds:.1f} s, "
          f"peak memory {stats.peak_memory_mb:.0f} MB ({stats.memory_kind}) on {stats.device}; wrote {out}")
    return 0
