"""``sparsetorch export CHECKPOINT --edge OUT.spt [--values bf16|fp16|int8]``: one compact file for the torch-free
runtime. CHECKPOINT is a file from ``sparsetorch.save`` or a transformers Llama folder (plain, or shrunk and
saved by ``sparsetorch.shrink.save_pretrained``; pruned weights are the zeros in it)."""
from __future__ import annotations

import argparse
import os

from ..errors import SparsityError

NAME = "export"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="export a saved sparse model for the torch-free edge runtime",
                       description="Write a checkpoint (from sparsetorch.save) as one .spt file that "
                                   "sparsetorch.edge runs with numpy only: sparse weights compressed (CSR or "
                                   "bitmask), optionally bf16 / fp16 / int8, and the layer graph. Unsupported layers are "
                                   "reported now, not on the device.")
    p.add_argument("checkpoint", help="a .safetensors file written by sparsetorch.save, or a transformers "
                                      "LlamaForCausalLM folder (from save_pretrained, shrunk ones included)")
    p.add_argument("--edge", metavar="OUT.spt", required=True, help="the edge file to write")
    p.add_argument("--values", choices=("fp32", "bf16", "fp16", "int8"), default=None,
                   help="stored weight values: fp32 (exact, the default), bf16 / fp16 (half the value bytes) or "
                        "int8 with a float32 scale per output row (about 4x smaller values)")
    p.add_argument("--int8", action="store_true", help="the same as --values int8")
    p.add_argument("--model", metavar="MODULE:FACTORY",
                   help="import path of a function returning the (dense) architecture; not needed for files "
                        "of sparsetorch's built-in models")
    p.add_argument("--input-shape", metavar="D1,D2,...",
                   help="one sample's input shape, e.g. 64 or 1,8,8 (default: the file's 'input_shape')")
    return p


def _shape(text: str | None, user: dict) -> list[int]:
    if text is not None:
        try:
            shape = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise SparsityError(f"--input-shape must be comma-separated integers like 1,8,8, got {text!r}") from None
    else:
        shape = user.get("input_shape")
        if not (isinstance(shape, list) and all(isinstance(s, int) for s in shape)):
            raise SparsityError("the checkpoint does not record its input shape; pass --input-shape (one sample's "
                                "shape, e.g. 64 or 1,8,8)")
    if not shape or any(s < 1 for s in shape):
        raise SparsityError(f"the input shape must be positive integers, got {shape}")
    return shape


def example_input(model, shape_text: str | None, user: dict):
    """A random example (the exporter checks the edge output against torch on it)."""
    import torch

    from ..export.edge import leaf_handlers

    g = torch.Generator().manual_seed(0)
    if any(isinstance(model, cls) for cls in leaf_handlers()):  # token models take ids [1, T]
        cfg = getattr(model, "cfg", None)  # sparsetorch's GPT; else a transformers config
        vocab, context = (cfg.vocab, cfg.context) if cfg is not None else \
            (model.config.vocab_size, model.config.max_position_embeddings)
        return torch.randint(0, vocab, (1, min(8, context)), generator=g)
    return torch.rand(1, *_shape(shape_text, user), generator=g)


def run(args: argparse.Namespace) -> int:
    from ..export.edge import export_edge
    from ..formats.files import load, read_header
    from .report import build_model

    if args.int8 and args.values not in (None, "int8"):
        raise SparsityError(f"--int8 and --values {args.values} disagree; pass one of them")
    values = "int8" if args.int8 else args.values or "fp32"

    if os.path.isdir(args.checkpoint):
        model, user = _hf_folder(args.checkpoint), {}
    else:
        header, _ = read_header(args.checkpoint)
        user = header.get("user") or {}
        model = build_model(args.model, user)
        load(model, args.checkpoint)
    desc = export_edge(model, example_input(model, args.input_shape, user), args.edge,
                       values=values)
    layouts: dict[str, int] = {}
    for meta in desc["tensors"].values():
        layouts[meta["layout"]] = layouts.get(meta["layout"], 0) + 1
    size, before = os.path.getsize(args.edge), _bytes(args.checkpoint)
    print(f"wrote {args.edge}: {size / 1024:.1f} KiB (checkpoint {before / 1024:.1f} KiB), {len(desc['nodes'])} "
          f"nodes, weights {', '.join(f'{n} {k}' for k, n in sorted(layouts.items()))}, {desc['values']} values; "
          f"max |edge - torch| on a random input: {desc['check']['max_abs_error']:.2g} "
          f"(outputs up to {desc['check']['max_abs_output']:.2g})")
    return 0


def _bytes(path: str) -> int:
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if f.endswith(".safetensors") and os.path.isfile(os.path.join(path, f)))


def _hf_folder(path: str):
    """A transformers causal-LM folder, loaded with sparsetorch.shrink.from_pretrained (plain or shrunk)."""
    from ..export.edge import leaf_handlers
    from ..shrink import from_pretrained

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SparsityError(f"{path} is a folder without config.json; pass a .safetensors file from sparsetorch.save "
                            "or a transformers model folder")
    model = from_pretrained(path).eval()
    if not any(isinstance(model, cls) for cls in leaf_handlers()):
        raise SparsityError(f"{path} holds a {type(model).__name__}; the edge runtime runs transformers "
                            "LlamaForCausalLM folders. Export other decoders to ONNX: sparsetorch.export_onnx("
                            "sparsetorch.export.DecoderLogits(model), ids, 'model.onnx', dynamic_sequence=True)")
    return model
