"""Out-of-core one-shot pruning of checkpoint folders: the same masks and weights as the in-memory run, resume
after a kill equal to an uninterrupted run, bad input refused before anything is written, and the output
loading with plain transformers and with sparsetorch."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

import sparsetorch
from sparsetorch import SparsityError
from sparsetorch.core.masks import iter_masks
from sparsetorch.oneshot import load_pruned, out_of_core, prune_oneshot

transformers = pytest.importorskip("transformers")
VOCAB = 256


def _llama(layers=3):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()  # tied lm_head, one model.safetensors


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _llama().save_pretrained(path, max_shard_size="40KB")  # several shards + index
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    _gpt2().save_pretrained(path)
    return path


def _calib(n=3, seq=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (2, seq), generator=g) for _ in range(n)]


def _tensors(folder):
    """Every tensor of a checkpoint folder by name."""
    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _same_as_in_memory(folder, out, kwargs, loader):
    ref = loader.from_pretrained(folder).eval()
    prune_oneshot(ref, _calib(), progress=False, **kwargs)
    got = _tensors(out)
    state = ref.state_dict()
    for key, value in got.items():
        assert torch.equal(value, state[key]), key
    masks = list(iter_masks(ref))
    assert masks
    for item in masks:  # the masks are the zeros of the written weights
        kept = got[item.qualified_name] != 0
        if kwargs.get("bits"):  # a kept weight can round to 0 on the grid
            assert not (kept & ~item.mask).any() and kept.float().mean() > 0.45
        else:
            assert torch.equal(kept, item.mask), item.qualified_name


CASES = [
    ("llama", dict(method="sparsegpt", sparsity=0.5)),
    ("llama", dict(method="wanda", pattern="2:4")),
    ("llama", dict(method="magnitude", sparsity=0.6)),
    ("llama", dict(method="ria", pattern="2:4", permute=True)),
    ("llama", dict(method="alps", sparsity=0.5)),
    ("llama", dict(method="wanda", distribution="owl", sparsity=0.6)),
    ("llama", dict(method="wanda", refine="dsnot", sparsity=0.5)),
    ("llama", dict(method="sparsegpt", bits=8, sparsity=0.5)),
    ("gpt2", dict(method="sparsegpt", distribution="owl", sparsity=0.5)),
    ("gpt2", dict(method="wanda", pattern="2:4")),
]


@pytest.mark.parametrize("arch, kwargs", CASES, ids=[f"{a}-{'-'.join(map(str, k.values()))}" for a, k in CASES])
def test_same_weights_and_masks_as_in_memory(arch, kwargs, llama_dir, gpt2_dir, tmp_path):
    folder = llama_dir if arch == "llama" else gpt2_dir
    out = tmp_path / "out"
    stats = prune_oneshot(folder, _calib(), out=out, progress=False, **kwargs)
    assert stats.mode == "out-of-core" and stats.blocks == (3 if arch == "llama" else 2)
    assert len(stats.block_seconds) == stats.blocks
    _same_as_in_memory(folder, out, kwargs, transformers.AutoModelForCausalLM)
    if kwargs.get("distribution") == "owl":
        assert len(stats.outlier_ratios) == stats.blocks


def test_spilled_and_half_precision_activations(llama_dir, tmp_path):
    kwargs = dict(method="sparsegpt", sparsity=0.5, progress=False)
    prune_oneshot(llama_dir, _calib(), out=tmp_path / "mem", **kwargs)
    prune_oneshot(llama_dir, _calib(), out=tmp_path / "disk", activations="disk", **kwargs)
    mem, disk = _tensors(tmp_path / "mem"), _tensors(tmp_path / "disk")
    assert mem.keys() == disk.keys() and all(torch.equal(mem[k], disk[k]) for k in mem)
    stats = prune_oneshot(llama_dir, _calib(), out=tmp_path / "half", activation_dtype=torch.float16, **kwargs)
    assert stats.sparsity == pytest.approx(0.5, abs=0.01)
    assert not (tmp_path / "half" / out_of_core.RUN_DIR / "activations").exists()  # cleaned up at the end


class _Killed(Exception):
    pass


def _kill_at(monkeypatch, name, after):
    real = getattr(out_of_core, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(out_of_core, name, wrapper)


@pytest.mark.parametrize("kwargs", [dict(method="sparsegpt", sparsity=0.5), dict(method="wanda", distribution="owl",
                                                                                 sparsity=0.6)], ids=["sparsegpt", "owl"])
@pytest.mark.parametrize("activations", ["memory", "disk"])
def test_resume_after_a_kill_equals_an_uninterrupted_run(kwargs, activations, llama_dir, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    prune_oneshot(llama_dir, _calib(), out=whole, progress=False, **kwargs)
    out = tmp_path / "out"
    _kill_at(monkeypatch, "prune_block", after=2)  # dies while pruning the third of three blocks
    with pytest.raises(_Killed):
        prune_oneshot(llama_dir, _calib(), out=out, progress=False, activations=activations, **kwargs)
    assert not (out / "config.json").exists() and not (out / "model.safetensors.index.json").exists()
    with pytest.raises(Exception):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(SparsityError, match="unfinished"):
        load_pruned(out)
    monkeypatch.undo()
    resumed = []
    real = out_of_core.prune_block
    monkeypatch.setattr(out_of_core, "prune_block", lambda job, runner, block, *a: resumed.append(block) or
                        real(job, runner, block, *a))
    stats = prune_oneshot(llama_dir, _calib(), out=out, progress=False, activations=activations, **kwargs)
    assert len(resumed) == 1  # only the unfinished block was redone
    assert len(stats.layers) == 3 * 7 and len(stats.block_seconds) == 3
    a, b = _tensors(whole), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / out_of_core.RUN_DIR / "complete.json").is_file()


def test_kill_between_writing_a_block_and_its_marker(llama_dir, tmp_path, monkeypatch):
    kwargs = dict(method="wanda", sparsity=0.5, progress=False)
    prune_oneshot(llama_dir, _calib(), out=tmp_path / "whole", **kwargs)
    real = out_of_core.RunDir.write_json

    def torn(self, name, value):
        if name == self.marker(1):
            raise _Killed
        return real(self, name, value)

    monkeypatch.setattr(out_of_core.RunDir, "write_json", torn)
    with pytest.raises(_Killed):
        prune_oneshot(llama_dir, _calib(), out=tmp_path / "out", **kwargs)
    monkeypatch.undo()
    prune_oneshot(llama_dir, _calib(), out=tmp_path / "out", **kwargs)
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_run_is_not_redone(llama_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = prune_oneshot(llama_dir, _calib(), out=out, method="wanda", progress=False)
    _kill_at(monkeypatch, "prune_block", after=0)
    again = prune_oneshot(llama_dir, _calib(), out=out, method="wanda", progress=False)
    assert [r.name for r in again.layers] == [r.name for r in first.layers]


def _listing(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_output_holding_another_run_or_other_files_is_refused(llama_dir, tmp_path):
    out = tmp_path / "out"
    prune_oneshot(llama_dir, _calib(), out=out, method="wanda", sparsity=0.5, progress=False)
    before = _listing(out)
    for kwargs, calib in ((dict(method="wanda", sparsity=0.6), _calib()), (dict(method="sparsegpt", sparsity=0.5),
                                                                           _calib()),
                          (dict(method="wanda", sparsity=0.5), _calib(n=2))):
        with pytest.raises(SparsityError, match="another run"):
            prune_oneshot(llama_dir, calib, out=out, progress=False, **kwargs)
    assert _listing(out) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SparsityError, match="already holds files"):
        prune_oneshot(llama_dir, _calib(), out=other, method="wanda", progress=False)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _set_config(key, value):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _nan_in_last_block(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "model.layers.2.mlp.down_proj.weight"
    shard = folder / index["weight_map"][key]
    with safe_open(str(shard), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors[key][0, 0] = float("nan")
    from safetensors.torch import save_file
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _truncate_a_shard(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])


BAD_SOURCES = {
    "truncated shard": (_truncate_a_shard, "corrupted or truncated"),
    "missing shard": (lambda f: (f / json.loads((f / "model.safetensors.index.json").read_text())["weight_map"]
                                 ["model.layers.1.mlp.up_proj.weight"]).unlink(), "missing"),
    "more layers in config": (_set_config("num_hidden_layers", 4), "do not match config.json"),
    "wider mlp in config": (_set_config("intermediate_size", 256), "shape"),
    "nan weight": (_nan_in_last_block, "NaN"),
    "no config": (lambda f: (f / "config.json").unlink(), "no config.json"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_bad_checkpoint_refused_before_anything_is_written(case, method, llama_dir, tmp_path):
    edit, message = BAD_SOURCES[case]
    source = _broken_copy(llama_dir, tmp_path / "src", edit)
    with pytest.raises(SparsityError, match=message):
        prune_oneshot(source, _calib(), out=tmp_path / "out", method=method, progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_refused_before_anything_is_written(llama_dir, gpt2_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SparsityError, match="out="):
        prune_oneshot(llama_dir, _calib(), progress=False)
    with pytest.raises(SparsityError, match="another folder"):
        prune_oneshot(llama_dir, _calib(), out=llama_dir, progress=False)
    with pytest.raises(SparsityError, match="outside"):
        prune_oneshot(llama_dir, _calib(), out=out, include=["*"], progress=False)
    with pytest.raises(SparsityError, match="token ids"):
        prune_oneshot(llama_dir, [torch.randn(2, 8)], out=out, progress=False)
    with pytest.raises(SparsityError, match="activations"):
        prune_oneshot(llama_dir, _calib(), out=out, activations="gpu", progress=False)
    with pytest.raises(SparsityError, match="activation_dtype"):
        prune_oneshot(llama_dir, _calib(), out=out, activation_dtype=torch.int8, progress=False)
    with pytest.raises(SparsityError, match="checkpoint folder"):
        prune_oneshot(_llama(), _calib(), out=out, progress=False)
    assert not out.exists()


def test_output_loads_with_transformers_and_sparsetorch(gpt2_dir, tmp_path):
    out = tmp_path / "out"
    (gpt2_dir / "tokenizer_config.json").write_text("{}")  # copied along
    try:
        prune_oneshot(gpt2_dir, _calib(), out=out, method="sparsegpt", pattern="2:4", progress=False)
    finally:
        (gpt2_dir / "tokenizer_config.json").unlink()
    assert (out / "tokenizer_config.json").is_file() and (out / "oneshot.json").is_file()
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.lm_head.weight is plain.transformer.wte.weight  # still tied
    ids = _calib(1)[0]
    generated = plain.generate(ids[:1, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 8)
    model = load_pruned(out).eval()
    masks = list(iter_masks(model))
    assert len(masks) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block; the tied head stays dense
    assert all((~m.mask).float().mean() == 0.5 for m in masks)
    path = tmp_path / "pruned.safetensors"
    sparsetorch.save(model, path)
    again = sparsetorch.load(_gpt2(), path)
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(masks, iter_masks(again)))
    assert torch.equal(model(ids).logits, plain(ids).logits)


def test_cli_out_of_core_equals_in_memory(gpt2_dir, tmp_path, capsys):
    from sparsetorch.cli.main import main

    (tmp_path / "calib.txt").write_text("def f(x):\n    return x + 1\n" * 100)
    common = ["prune-lm", str(gpt2_dir), "--method", "sparsegpt", "--pattern", "2:4", "--calibration",
              str(tmp_path / "calib.txt"), "--nsamples", "4", "--seqlen", "16"]
    assert main(common + ["--out", str(tmp_path / "mem"), "--in-memory"]) == 0
    assert main(common + ["--out", str(tmp_path / "ooc"), "--out-of-core", "--activations", "disk"]) == 0
    assert "out-of-core" in capsys.readouterr().out
    mem, ooc = _tensors(tmp_path / "mem"), _tensors(tmp_path / "ooc")
    mem.pop("lm_head.weight", None)
    assert all(torch.equal(mem[k], ooc[k]) for k in ooc) and set(ooc) <= set(mem)
    assert main(common + ["--out", str(tmp_path / "mem"), "--out-of-core"]) == 2  # holds another (in-memory) output


@pytest.mark.parametrize("kwargs", [dict(method="sparsegpt"), dict(method="wanda", distribution="owl"),
                                    dict(method="magnitude")], ids=["sparsegpt", "owl", "magnitude"])
def test_one_block_in_memory_at_a_time(kwargs, llama_dir, tmp_path, monkeypatch):
    from sparsetorch.oneshot.checkpoint_dir import CheckpointModel

    real, most = CheckpointModel.load, []

    def load(self, module, keys, prefix=""):
        real(self, module, keys, prefix)
        most.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.blocks))

    monkeypatch.setattr(CheckpointModel, "load", load)
    prune_oneshot(llama_dir, _calib(), out=tmp_path / "out", progress=False, **kwargs)
    assert max(most) == 1 and len(most) > 3
