"""Out-of-core one-shot pruning: a Hugging Face checkpoint folder in, a pruned checkpoint folder out, with one
block of the model in memory at a time.

    stats = sparsetorch.prune_oneshot("llama-7b/", calib, method="sparsegpt", sparsity=0.5, out="llama-7b-50/")

The model is built on the meta device from ``config.json``; the embeddings (and the other small parts that
run before the first block) are read from the shards, then each block in turn: read, pruned from the
calibration activations by the same block-by-block driver as the in-memory run (``drivers``), written as its
own shard as soon as it is done (streamed, no second copy), and dropped. Peak memory is about the embeddings
plus one block, or one block plus its layers' statistics (one X^T X per distinct input) and one layer's solve,
plus the activations, whatever the depth. OWL's first pass runs
block by block over the dense blocks the same way.

The output folder is an ordinary Hugging Face checkpoint with zeros in place: one shard per block plus one
per other module, ``model.safetensors.index.json``, the source's ``config.json`` (and generation config and
tokenizer files), and ``oneshot.json`` (the run's ``OneshotStats``). Bookkeeping lives in
``.sparsetorch-run/``: what run this is, a done marker per block and the activations after the last
finished block, so a killed run restarts at the first unfinished block and gives bitwise the same
checkpoint. The index and config are written last, then ``complete.json``: until then the folder does
not load as a model. Everything checkable is checked before the first file is written: the source
(missing shards, weights that do not match the config, NaN weights), the arguments and calibration,
and the output folder (holding another run or other files).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import SparsityError
from ..formats.atomic import atomic_path, atomic_write
from ..formats.safetensors_file import INDEX_FILE
from .activation_store import ActivationStore
from .blocks import blocks_chain
from .checkpoint_dir import CheckpointModel
from .drivers import BlockRunner, forward_error, owl_block, owl_reallocate, prune_block
from .experts import install_expert_masks, layer_module
from .linear_layers import mask_zeros
from .planning import peak_memory, plan_job
from .results import LayerResult, OneshotStats

__all__ = ["prune_checkpoint", "load_pruned", "RUN_DIR"]

RUN_DIR = ".sparsetorch-run"
_RUN_VERSION = 1
_COPIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
           "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json", "chat_template.jinja")


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _is_writer() -> bool:
    """Rank 0 writes the output (under torchrun every rank runs the blocks; one process writes)."""
    return not _distributed() or torch.distributed.get_rank() == 0


def _calibration_digest(samples: list) -> str:
    h = hashlib.sha256()
    for sample in samples:
        items = sorted(sample.items()) if isinstance(sample, dict) else [("", sample)]
        for key, value in items:
            t = value.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _options_record(options: dict[str, Any]) -> dict[str, str]:
    """The arguments that decide the result, as text (a different value is a different run)."""
    return {k: repr(v) if not isinstance(v, str) else v for k, v in sorted(options.items())
            if k not in ("progress", "device")}


class RunDir:
    """The output folder and its ``.sparsetorch-run`` bookkeeping: which run it holds, which blocks are done."""

    def __init__(self, out: Path, record: dict) -> None:
        self.out, self.state, self.record = out, out / RUN_DIR, record
        self.resuming = False
        if not out.exists():
            return
        if not out.is_dir():
            raise SparsityError(f"out={out} exists and is not a folder; pass a new or empty folder", out=str(out))
        run_file = self.state / "run.json"
        if run_file.is_file():
            try:
                held = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise SparsityError(f"{run_file} is damaged; delete {out} to start over", out=str(out)) from None
            differ = sorted(k for k in set(held) | set(record) if held.get(k) != record.get(k))
            if differ:
                raise SparsityError(f"{out} holds another run (it differs in {differ}); pass a new folder as out= or "
                                    "delete this one. Nothing was written", out=str(out), differ=differ)
            self.resuming = True
        elif any(out.iterdir()):
            raise SparsityError(f"out={out} already holds files that are not a run of this pruning; pass a new or "
                                "empty folder. Nothing was written", out=str(out))

    @property
    def complete(self) -> bool:
        return (self.state / "complete.json").is_file()

    def begin(self) -> None:
        if _is_writer() and not self.resuming:
            atomic_write(self.state / "run.json", json.dumps(self.record, indent=2, sort_keys=True).encode())

    def write_json(self, name: str, value: Any) -> None:
        if _is_writer():
            atomic_write(self.state / name, json.dumps(value, indent=2, sort_keys=True).encode())

    def read_json(self, name: str) -> Any | None:
        path = self.state / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # a marker torn by a kill: that step is redone

    def marker(self, k: int) -> str:
        return f"block-{k:05d}.json"


def _shard_names(src: CheckpointModel) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """Shard file per block, the other tensors grouped by module (embeddings, head, final norm), their names."""
    groups: dict[str, list[str]] = {}
    for key in src.other_keys:
        groups.setdefault(key.rpartition(".")[0], []).append(key)
    total = len(src.blocks) + len(groups)
    names = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    return names[: len(src.blocks)], groups, names[len(src.blocks):]


def _outside_blocks(src: CheckpointModel, targets: dict[str, nn.Module]) -> list[str]:
    inside = {id(m) for b in src.blocks for m in b.modules()}
    return [n for n, m in targets.items() if id(layer_module(m)) not in inside]


class _OnDemand:
    """While active, each block is read from the shards when the model calls it and dropped after: the
    dense forward passes that capture the blocks' arguments never hold more than one block."""

    def __init__(self, src: CheckpointModel) -> None:
        self.src = src
        self.index = {id(b): i for i, b in enumerate(src.blocks)}

    def __enter__(self):
        def pre(module, _args, _kwargs):
            if any(p.device.type == "meta" for p in module.parameters()):  # block 0 stays in while samples reach it
                self.src.load(module, self.src.block_keys[self.index[id(module)]])

        def post(module, _args, _kwargs, _output):
            self.src.release(module)

        self.handles = [b.register_forward_pre_hook(pre, with_kwargs=True, prepend=True) for b in self.src.blocks]
        self.handles += [b.register_forward_hook(post, with_kwargs=True, prepend=True) for b in self.src.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for block in self.src.blocks:
            if any(p.device.type != "meta" for p in block.parameters()):
                self.src.release(block)


def _capture(job, src: CheckpointModel) -> BlockRunner:
    """How the model calls each block (and that the blocks chain), from dense passes with blocks on demand."""
    with _OnDemand(src):
        try:
            chained = blocks_chain(job.model, src.blocks, job.calibration.run, job.calibration.samples[0])
        except SparsityError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the model's forward is a data error
            raise forward_error(exc) from exc
        if not chained:
            raise SparsityError(f"{type(src.model).__name__}'s blocks do not feed each other's outputs directly, so it "
                                "cannot be pruned one block at a time; load it in memory instead")
        return BlockRunner(job, src.blocks)


def _check_all_blocks(src: CheckpointModel) -> None:
    """Without calibration data nothing reads the blocks before pruning: read each once (finite weights)."""
    for i, block in enumerate(src.blocks):
        src.load(block, src.block_keys[i])
        src.release(block)


def _block_dtype(block: nn.Module) -> torch.dtype:
    return next(p.dtype for p in block.parameters() if p.dtype.is_floating_point)


def _owl_first_pass(job, src: CheckpointModel, runner: BlockRunner, store: ActivationStore, run: RunDir,
                    stats: OneshotStats) -> dict[str, float]:
    """OWL's outlier ratios of the dense blocks, block by block (kept in owl.json for a resumed run)."""
    saved = run.read_json("owl.json")
    if saved is None:
        groups, ratios = [], []
        store.put_all(0, runner.first_inputs(), write=False)
        for k, block in enumerate(src.blocks):
            src.load(block, src.block_keys[k])
            block.to(runner.device)
            dtype = _block_dtype(block)
            found = owl_block(job, runner, block, store.inputs(k, runner.device, dtype))
            if found is not None:
                groups.append(found[0])
                ratios.append(found[1])
            if k + 1 < len(src.blocks):
                store.put_all(k + 1, runner.outputs(block, store.inputs(k, runner.device, dtype)), write=False)
            store.drop(k)
            src.release(block)
        store.clear()
        saved = {"groups": groups, "ratios": ratios}
        run.write_json("owl.json", saved)
    return owl_reallocate(job, saved["groups"], saved["ratios"], stats)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Streamed to disk (no second copy of the block in memory), atomically."""
    if _is_writer():
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})


def _finish(src: CheckpointModel, run: RunDir, shard_of: dict[str, str], groups: dict[str, list[str]],
            group_shards: list[str], stats: OneshotStats) -> None:
    """The parts outside the blocks (copied as stored), the copied files, the stats, then the index and the
    config (the folder loads as a model from here on), then the completion marker."""
    for (_, keys), name in zip(groups.items(), group_shards):
        _write_shard(run.out / name, src.checkpoint.read(keys))  # one module's tensors in memory at a time
        shard_of.update(dict.fromkeys(keys, name))
    if not _is_writer():
        return
    for name in _COPIED:
        if (src.directory / name).is_file():
            atomic_write(run.out / name, (src.directory / name).read_bytes())
    atomic_write(run.out / "oneshot.json", json.dumps(stats.to_dict(), indent=2).encode())
    total = sum((run.out / n).stat().st_size for n in set(shard_of.values()))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(shard_of.items()))}
    atomic_write(run.out / INDEX_FILE, json.dumps(index, indent=2).encode())
    atomic_write(run.out / "config.json", src.config_text().encode())
    run.write_json("complete.json", {"blocks": len(src.blocks)})


def _layer_results(saved: list[dict]) -> list[LayerResult]:
    return [LayerResult(**r) for r in saved]


def _open(source, calibration, out: Path, options: dict) -> tuple[CheckpointModel, Any]:
    """The checked source with its embeddings read, and the checked job (nothing written)."""
    src = CheckpointModel(source)
    if out.resolve() == src.directory.resolve():
        raise SparsityError("out= must be another folder than the checkpoint being pruned", out=str(out))
    model = src.model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_keys = {k for k in src.other_keys if head is not None and k.rpartition(".")[0] and
                 model.get_submodule(k.rpartition(".")[0]) is head and k not in src.aliases}
    src.load(model, [k for k in src.other_keys if k not in head_keys])  # the head only runs after the last block
    job = plan_job(model, calibration, **options, check_values=False, calibration_device=torch.device("cpu"))
    outside = _outside_blocks(src, job.targets)
    if outside:
        raise SparsityError(f"out-of-core pruning prunes the layers inside the model's blocks; {outside[:5]} lie "
                            "outside them: leave them out (exclude=[...]) or prune the model in memory",
                            layers=outside[:20])
    return src, job


def _run_record(src: CheckpointModel, job, options: dict, activation_dtype) -> dict:
    """What decides the result: a folder holding a run with another record is another run's."""
    return {"version": _RUN_VERSION, "source": src.describe(), "options": _options_record(options),
            "calibration": _calibration_digest(job.calibration.samples) if job.calibration else None,
            "activation_dtype": repr(activation_dtype), "device": job.pruner.device.type,
            "world_size": torch.distributed.get_world_size() if _distributed() else 1}


def _first_unfinished(src: CheckpointModel, run: RunDir, runner, store: ActivationStore,
                      stats: OneshotStats) -> int:
    """The first block without a done marker (whose inputs are on disk), the finished blocks' results in ``stats``."""
    start = 0
    while start < len(src.blocks) and run.read_json(run.marker(start)) is not None:
        start += 1
    if 0 < start < len(src.blocks) and runner is not None and not store.has(start):
        start = 0  # the activations after the last finished block are gone: redo from the first block
    for k in range(start):
        done = run.read_json(run.marker(k))
        stats.layers.extend(_layer_results(done["layers"]))
        stats.unrouted.extend(done["unrouted"])
        stats.block_seconds.append(done["seconds"])
    return start


def _prune_one(k: int, job, src: CheckpointModel, runner, store: ActivationStore,
               densities: dict[str, float]) -> OneshotStats:
    """Read block ``k``, prune it from its inputs, store the outputs the next block sees; its layers' results."""
    block = src.blocks[k]
    src.load(block, src.block_keys[k])
    out = job.stats_for("out-of-core")
    if runner is None:  # weights only (magnitude)
        inside = {id(x) for x in block.modules()}
        layers = {n: m for n, m in job.targets.items() if id(layer_module(m)) in inside}
        for name, module in layers.items():
            out.layers.append(job.pruner.prune(name, module, None, densities[name]))
        install_expert_masks(layers)
        return out
    block.to(runner.device)
    dtype = _block_dtype(block)
    prune_block(job, runner, block, store.inputs(k, runner.device, dtype), densities, out)
    if k + 1 < len(src.blocks):
        store.put_all(k + 1, runner.outputs(block, store.inputs(k, runner.device, dtype)))
    block.to("cpu")
    return out


@torch.no_grad()
def prune_checkpoint(source: str | os.PathLike, calibration, out: str | os.PathLike | None, *, options: dict,
                     activations: str = "memory", activation_dtype: torch.dtype | None = None) -> OneshotStats:
    """``prune_oneshot(folder, calibration, out=..., **options)``: prune the checkpoint folder ``source`` one block
    at a time into the folder ``out`` (see the module docstring); returns the run's ``OneshotStats``."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if out is None:
        raise SparsityError("pruning a checkpoint folder writes a new one: pass out='pruned-model/' (or load the model "
                            "and pass it instead of the folder)")
    if activations not in ("memory", "disk"):
        raise SparsityError(f"activations must be 'memory' or 'disk' (spilled to the output folder), got "
                            f"{activations!r}", activations=activations)
    out = Path(out)
    src, job = _open(source, calibration, out, options)
    samples = len(job.calibration) if job.calibration else 0
    store = ActivationStore(out / RUN_DIR / "activations", samples, spill=activations == "disk", dtype=activation_dtype)
    run = RunDir(out, _run_record(src, job, options, activation_dtype))
    if run.complete:
        saved = json.loads((out / "oneshot.json").read_text(encoding="utf-8"))
        return OneshotStats(**{**saved, "layers": _layer_results(saved["layers"])})
    runner = _capture(job, src) if job.calibration is not None else None
    if runner is None and not run.resuming:
        _check_all_blocks(src)
    src.release(src.model)  # the embeddings' work is done: block 0's inputs are captured
    run.begin()  # every check passed: from here on the output folder is written
    stats = job.stats_for("out-of-core")
    stats.blocks = len(src.blocks)
    densities = job.densities
    if job.owl is not None:
        owl_store = ActivationStore(out / RUN_DIR / "owl-activations", samples, spill=store.spill,
                                    dtype=activation_dtype)
        densities = _owl_first_pass(job, src, runner, owl_store, run, stats)
    start = _first_unfinished(src, run, runner, store, stats)
    if runner is not None:
        if start == 0:
            store.put_all(0, runner.first_inputs(), write=False)
        for call in runner.calls[0]:
            call.hidden = None  # block 0's captured inputs now live in the store
    block_shards, groups, group_shards = _shard_names(src)
    auto = None if _is_writer() else True  # by default one bar (rank 0's) under torchrun
    bar = tqdm(range(start, len(src.blocks)), desc=f"{job.pruner.recipe.method} blocks (out of core)",
               disable=auto if job.progress is None else not job.progress)
    for k in bar:
        t0 = time.perf_counter()
        block_stats = _prune_one(k, job, src, runner, store, densities)
        block = src.blocks[k]
        prefix = f"{src.prefix}.{k}."
        _write_shard(out / block_shards[k], {prefix + n: t.contiguous() for n, t in block.state_dict().items()})
        seconds = time.perf_counter() - t0
        run.write_json(run.marker(k), {"layers": [asdict(r) for r in block_stats.layers],
                                       "unrouted": block_stats.unrouted, "seconds": seconds})
        store.drop(k)
        src.release(block)
        stats.layers.extend(block_stats.layers)
        stats.unrouted.extend(block_stats.unrouted)
        stats.block_seconds.append(seconds)
    shard_of = {key: block_shards[k] for k, keys in enumerate(src.block_keys) for key in keys}
    stats.seconds = time.perf_counter() - started
    stats.peak_memory_mb, stats.memory_kind = peak_memory(job.pruner.device)
    _finish(src, run, shard_of, groups, group_shards, stats)
    store.clear()
    return stats


def load_pruned(folder: str | os.PathLike, **from_pretrained: Any) -> nn.Module:
    """A pruned checkpoint folder (written by the out-of-core run, or by ``save_pretrained`` of any pruned
    model) as a sparsetorch model: ``AutoModelForCausalLM.from_pretrained(folder, **from_pretrained)`` with a
    mask on every Linear layer that holds zeros, so fine-tuning keeps them zero and ``sparsetorch.save`` /
    ``to_inference`` store and run it sparse. A folder whose run did not finish is refused."""
    folder = Path(folder)
    if (folder / RUN_DIR).is_dir() and not (folder / RUN_DIR / "complete.json").is_file():
        raise SparsityError(f"{folder} holds an unfinished out-of-core run; run the same prune_oneshot call again to "
                            "finish it", path=str(folder))
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SparsityError("load_pruned needs transformers: pip install 'sparsetorch[transformers]'") from None
    model = AutoModelForCausalLM.from_pretrained(str(folder), **from_pretrained)
    mask_zeros(model)
    return model
