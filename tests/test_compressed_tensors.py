"""compressed-tensors (llm-compressor) sparse checkpoints: sparse-bitmask and sparse-24-bitmask read by
sparsetorch without the package, checked both ways against the package's own compressor and decompressor
(compressed-tensors 0.10-0.13: later releases dropped these formats), run on the CPU in one call, and every
damaged checkpoint refused before a weight is set."""
import copy
import json
import shutil

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import sparsetorch  # noqa: E402
from sparsetorch import SparsityError  # noqa: E402
from sparsetorch.formats.compressed_tensors import (INDEX_FILE, load_compressed_tensors,  # noqa: E402
                                                    read_compressed_tensors, save_compressed_tensors)

FORMATS = ["sparse-bitmask", "sparse-24-bitmask"]
IDS = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))


def _package():
    """The package's sparse compressors, or a skip naming why (0.15+ has none)."""
    pytest.importorskip("compressed_tensors")
    return pytest.importorskip("compressed_tensors.compressors.sparse_compressors",
                               reason="this compressed-tensors has no sparse compressors (dropped in 0.15); "
                                      "pip install 'compressed-tensors>=0.10,<0.14'")


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


@torch.no_grad()
def _prune(model, fmt):
    """Zero half of every Linear but lm_head: by magnitude per layer, or the smaller two of each four."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            w = module.weight
            if fmt == "sparse-24-bitmask":
                groups = w.reshape(-1, 4)
                groups.scatter_(1, groups.abs().topk(2, dim=1, largest=False).indices, 0.0)
            else:
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0.0
    return model


@pytest.fixture(scope="module")
def pruned():
    cache = {}

    def make(fmt, dtype=torch.float32):
        if (fmt, dtype) not in cache:
            cache[fmt, dtype] = _prune(_llama(dtype), fmt)
        return cache[fmt, dtype]
    return make


def _same(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8) if a[key].is_floating_point() else a[key],
                           b[key].view(torch.uint8) if b[key].is_floating_point() else b[key]), key  # bitwise


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _write_with_package(model, fmt, directory):
    _package()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    config = (BitmaskConfig if fmt == "sparse-bitmask" else Sparse24BitMaskConfig)(
        targets=["Linear"], ignore=["lm_head"], global_sparsity=0.5)
    compressor = ModelCompressor(sparsity_config=config)
    model.save_pretrained(directory, state_dict=compressor.compress(model))
    compressor.update_config(directory)
    return directory


@pytest.mark.parametrize("fmt,dtype", [("sparse-bitmask", torch.float32), ("sparse-24-bitmask", torch.float32),
                                       ("sparse-24-bitmask", torch.bfloat16)])
def test_reads_what_compressed_tensors_writes(pruned, tmp_path, fmt, dtype):
    model = pruned(fmt, dtype)
    _write_with_package(model, fmt, tmp_path)
    state, info = read_compressed_tensors(tmp_path)
    _same(state, _state(model))
    assert info["format"] == fmt and info["targets"] == ["Linear"] and info["ignore"] == ["lm_head"]
    assert len(info["sparse_weights"]) == 14 and "lm_head.weight" not in info["sparse_weights"]
    assert abs(info["sparsity_of_sparse_weights"] - 0.5) < 0.01
    assert {w["pattern"] for w in info["sparse_weights"].values()} == {"2:4" if "24" in fmt else "unstructured"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_compressed_tensors_decompresses_what_we_write(pruned, tmp_path, fmt):
    _package()
    from compressed_tensors.compressors import ModelCompressor

    model = pruned(fmt)
    save_compressed_tensors(model, tmp_path / "ours", fmt)
    compressor = ModelCompressor.from_pretrained(str(tmp_path / "ours"))
    assert compressor.sparsity_config.format == fmt
    _same(dict(compressor.sparsity_compressor.decompress(str(tmp_path / "ours"))), _state(model))
    # and our files hold exactly the tensors the package writes
    _write_with_package(model, fmt, tmp_path / "theirs")
    _same(load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors"))


@pytest.mark.filterwarnings("ignore:.*stays dense")
def test_one_call_runs_a_24_checkpoint_on_the_cpu(pruned, tmp_path):
    model = pruned("sparse-24-bitmask", torch.bfloat16)
    save_compressed_tensors(model, tmp_path, "sparse-24-bitmask")
    loaded = load_compressed_tensors(tmp_path, dtype=torch.float32)  # float32: the sparse CPU kernels
    assert isinstance(loaded, transformers.LlamaForCausalLM) and not loaded.training
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    dense = copy.deepcopy(model).float()
    fast = sparsetorch.to_inference(loaded, IDS, budget_s=0.02)
    want = dense.generate(IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(fast.generate(IDS, max_new_tokens=5, do_sample=False), want)


def test_sharded_checkpoint_loads_into_a_given_model_with_masks(pruned, tmp_path):
    model = pruned("sparse-bitmask")
    save_compressed_tensors(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1 and "model.layers.0.mlp.up_proj.bitmask" in index["weight_map"]
    target = _llama()
    assert load_compressed_tensors(target, tmp_path, masks=True) is target
    _same(_state(target), _state(model))
    masks = {item.qualified_name: item.mask for item in sparsetorch.iter_masks(target)}
    assert len(masks) == 14 and torch.equal(masks["model.layers.1.self_attn.q_proj.weight"],
                                            model.model.layers[1].self_attn.q_proj.weight != 0)


def test_tied_embeddings_are_stored_once(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    model = _prune(transformers.LlamaForCausalLM(cfg).eval(), "sparse-bitmask")
    save_compressed_tensors(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = load_compressed_tensors(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    _same(_state(loaded), _state(model))


def test_writer_refuses_what_it_cannot_store_exactly(pruned, tmp_path):
    with pytest.raises(SparsityError, match="not 2:4 sparse"):
        save_compressed_tensors(pruned("sparse-bitmask"), tmp_path, "sparse-24-bitmask")
    with pytest.raises(SparsityError, match="format must be one of"):
        save_compressed_tensors(pruned("sparse-bitmask"), tmp_path, "marlin-24")
    assert not list(tmp_path.iterdir())


def test_public_names():
    assert sparsetorch.load_compressed_tensors is load_compressed_tensors
    assert sparsetorch.formats.load_compressed_tensors is load_compressed_tensors


def test_cli_info_describes_a_checkpoint_folder(pruned, tmp_path, capsys):
    from sparsetorch.cli.main import main

    save_compressed_tensors(pruned("sparse-24-bitmask"), tmp_path, "sparse-24-bitmask")
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "sparse-24-bitmask" in out and "model.layers.0.mlp.up_proj.weight" in out and "2:4" in out


# ------------------------------------------------------------------------------------------------ bad input


def _config(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _tensors(d, edit, name="model.safetensors"):
    tensors = load_file(d / name)
    edit(tensors)
    save_file(tensors, d / name, metadata={"format": "pt"})


UP = "model.layers.0.mlp.up_proj"


def _flip_bit(t):
    t[f"{UP}.bitmask"][0, 0] ^= 1  # one weight more or less than the values


def _group_of_three(t):
    b = t[f"{UP}.bitmask"]
    b[0, 0] = (b[0, 0] & 0xF0) | 0x07  # three of the first four weights kept


def _nan(t):
    t[f"{UP}.compressed"][0] = float("nan")


def _offsets(t):
    t[f"{UP}.row_offsets"][3] += 1


BITMASK_CASES = {
    "unknown format": ("cfg", lambda c: c["quantization_config"]["sparsity_config"].update(format="sparse-99"),
                       "sparsity format 'sparse-99' is not supported"),
    "quantized": ("cfg", lambda c: c["quantization_config"].update(format="int-quantized", config_groups={
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8}}}), "quantized compressed-tensors checkpoint"),
    "marlin-24": ("cfg", lambda c: (c["quantization_config"].update(format="marlin-24"),
                                    c["quantization_config"]["sparsity_config"].update(format="dense")),
                  "format marlin-24"),
    "no sparsity config": ("cfg", lambda c: c["quantization_config"].pop("sparsity_config"), "without a sparsity_config"),
    "truncated bitmask": ("st", lambda t: t.update({f"{UP}.bitmask": t[f"{UP}.bitmask"][:-1].clone()}),
                          "bitmask is uint8"),
    "corrupt bitmask": ("st", _flip_bit, "bits but .* values"),
    "padding bits": ("st", lambda t: t.update({f"{UP}.shape": torch.tensor([128, 60])}), "past the 60 columns"),
    "wrong shape tensor": ("st", lambda t: t.update({f"{UP}.shape": torch.tensor([128, 32])}), "bitmask is uint8"),
    "float shape tensor": ("st", lambda t: t.update({f"{UP}.shape": torch.tensor([128.0, 64.0])}), "two integer"),
    "row offsets": ("st", _offsets, "row_offsets says row 3"),
    "missing tensor": ("st", lambda t: t.pop(f"{UP}.bitmask"), f"lacks the tensor {UP}.bitmask"),
    "NaN values": ("st", _nan, "NaN"),
    "NaN in a plain tensor": ("st", lambda t: t["model.norm.weight"].fill_(float("nan")), "model.norm.weight holds NaN"),
    "quantized values": ("st", lambda t: t.update({f"{UP}.compressed": t[f"{UP}.compressed"].to(torch.int8)}),
                         "quantized"),
    "weight and compressed": ("st", lambda t: t.update({f"{UP}.weight": torch.zeros(128, 64)}), "both dense"),
}


@pytest.fixture(scope="module")
def checkpoints(pruned, tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    save_compressed_tensors(pruned("sparse-bitmask"), root / "sparse-bitmask")
    save_compressed_tensors(pruned("sparse-24-bitmask"), root / "sparse-24-bitmask", "sparse-24-bitmask")
    save_compressed_tensors(pruned("sparse-bitmask"), root / "sharded", max_shard_bytes=40_000)
    return root


def _refused(directory, match):
    target = _llama()
    before = _state(target)
    with pytest.raises(SparsityError, match=match):
        load_compressed_tensors(target, directory)
    _same(_state(target), before)  # nothing was set
    with pytest.raises(SparsityError, match=match):
        read_compressed_tensors(directory)


@pytest.mark.parametrize("case", list(BITMASK_CASES))
def test_damaged_bitmask_checkpoint_is_refused_before_any_weight_is_set(checkpoints, tmp_path, case):
    kind, edit, match = BITMASK_CASES[case]
    d = shutil.copytree(checkpoints / "sparse-bitmask", tmp_path / "ckpt")
    _config(d, edit) if kind == "cfg" else _tensors(d, edit)
    _refused(d, match)


@pytest.mark.parametrize("case,edit,match", [
    ("three of four", _group_of_three, "has 3 bits set in group 0"),
    ("values shape", lambda t: t.update({f"{UP}.compressed": t[f"{UP}.compressed"][:, :-1].clone()}),
     "compressed has shape"),
    ("row offsets do not belong", lambda t: t.update({f"{UP}.row_offsets": torch.zeros(128, dtype=torch.int64)}),
     "does not belong to a sparse-24-bitmask weight"),
])
def test_damaged_24_checkpoint_is_refused(checkpoints, tmp_path, case, edit, match):
    d = shutil.copytree(checkpoints / "sparse-24-bitmask", tmp_path / "ckpt")
    _tensors(d, edit)
    _refused(d, match)


def test_damaged_shards_are_refused(checkpoints, tmp_path):
    d = shutil.copytree(checkpoints / "sharded", tmp_path / "missing")
    index = json.loads((d / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    _refused(d, f"lists the shard '{shard}', which is missing")

    d = shutil.copytree(checkpoints / "sharded", tmp_path / "truncated")
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[: len(data) // 2])
    _refused(d, "not a readable safetensors file")

    d = shutil.copytree(checkpoints / "sharded", tmp_path / "hostile")
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    (d / INDEX_FILE).write_text(json.dumps(index))
    _refused(d, "outside the folder")


def test_a_model_that_does_not_match_is_left_unchanged(checkpoints):
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128))
    before = _state(other)
    with pytest.raises(SparsityError, match=r"has shape \[\d+, \d+\] in .* but \[\d+, \d+\] in the model"):
        load_compressed_tensors(other, checkpoints / "sparse-bitmask")
    _same(_state(other), before)
    with pytest.raises(SparsityError, match="does not match the model"):
        load_compressed_tensors(nn.Linear(4, 4), checkpoints / "sparse-bitmask")
