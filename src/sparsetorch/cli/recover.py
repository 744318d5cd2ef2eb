"""``sparsetorch recover MODEL_DIR``: one-shot prune a transformers causal LM, win back its quality, save it."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..oneshot.api import DISTRIBUTIONS, METHODS
from ..recipes.prune_and_recover import RECOVERIES
from .prune_lm import calibration_ids, load_lm, write_lm

NAME = "recover"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="prune a transformers causal LM in one shot, then distil / LoRA / fine-tune it back",
                       description="Prune MODEL_DIR in one shot from --calibration windows, recover it on --train "
                                   "windows (distillation from the dense model by default; the masks stay exact), "
                                   "print loss before/after, sparsity, time, memory and file size, and write the "
                                   "model with save_pretrained to --out.")
    p.add_argument("model_dir", help="a transformers model folder (config.json + weights)")
    p.add_argument("--method", choices=list(METHODS), default="sparsegpt")
    p.add_argument("--distribution", choices=list(DISTRIBUTIONS), default="uniform")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of weights removed per layer (default 0.5; N:M patterns fix it)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4 (default %(default)s)")
    p.add_argument("--recovery", choices=list(RECOVERIES), default="distill",
                   help="distill (logit KL from the dense model), lora (sparse LoRA, merged through the masks), "
                        "finetune (next-token loss only) or none (default %(default)s)")
    p.add_argument("--calibration", required=True, metavar="FILE", help="a text file to draw calibration sequences from")
    p.add_argument("--train", metavar="FILE", default=None, help="text to recover on (default: the calibration file)")
    p.add_argument("--eval", metavar="FILE", default=None,
                   help="text to measure the loss on (default: a tenth of the training windows, held out)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (save_pretrained format)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default %(default)s)")
    p.add_argument("--train-samples", type=int, default=1024, help="training sequences (default %(default)s)")
    p.add_argument("--eval-samples", type=int, default=64, help="sequences of --eval (default %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4; 1e-3 for lora)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank (default %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data draws and the training order")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..recipes.prune_and_recover import recover
    from ..recovery.losses import DistillLoss

    model_dir, out = Path(args.model_dir), Path(args.out)
    model = load_lm(model_dir, args.seqlen)
    vocab = model.get_input_embeddings().num_embeddings
    calib = calibration_ids(model_dir, Path(args.calibration), args.nsamples, args.seqlen, args.seed, vocab)
    train_file = Path(args.train or args.calibration)
    train = torch.cat(calibration_ids(model_dir, train_file, args.train_samples, args.seqlen, args.seed + 1, vocab))
    held = None
    if args.eval:
        held = torch.cat(calibration_ids(model_dir, Path(args.eval), args.eval_samples, args.seqlen, args.seed + 2,
                                         vocab))
    sparsity = args.sparsity if args.sparsity is not None else (None if ":" in args.pattern else 0.5)
    loss = None if args.recovery == "finetune" else DistillLoss(temperature=args.temperature)
    report = recover(model, calib, train, method=args.method, sparsity=sparsity, pattern=args.pattern,
                     recovery=args.recovery, steps=args.steps, batch_size=args.batch_size, lr=args.lr, loss=loss,
                     lora_rank=args.lora_rank, eval_data=held, generator=torch.Generator().manual_seed(args.seed),
                     progress=not args.no_progress, oneshot={"distribution": args.distribution})
    write_lm(report.model, model_dir, out, {"recover": {"method": args.method, "pattern": args.pattern,
                                                        "recovery": args.recovery, "steps": args.steps}})
    report.note_file(out / "sparsetorch.safetensors")
    (out / "recover.json").write_text(json.dumps(report.to_dict(), indent=2))
    print(report)
    return 0
