"""transformers Llama in the torch-free edge runtime: RMSNorm, rotary positions (the config's rope_theta and static
rope scalings), grouped-query attention, SwiGLU, tied or separate heads; shrunk by sparsetorch.shrink (per-block
widths) and pruned (weights stored compactly); greedy tokens identical to torch's generate, logits within the
exporter's tolerance; what the runtime cannot compute is refused at export, naming it."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparsetorch  # noqa: E402
import sparsetorch.edge as edge  # noqa: E402
from sparsetorch.edge.linear import bitmask_kernels  # noqa: E402
from sparsetorch.errors import SparsityError  # noqa: E402
from sparsetorch.export.edge import FP32_TOLERANCE  # noqa: E402
from sparsetorch.shrink import (from_pretrained, remove_blocks, remove_heads, remove_hidden,  # noqa: E402
                                remove_mlp_channels, save_pretrained)

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
OTHER = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))  # another batch and length
PROMPT = [5, 17, 42, 8, 91, 3]
NEW = 24


def llama(**kw):
    torch.manual_seed(0)
    # initializer_range 0.5 (not 0.02): logits far enough apart that greedy tokens vary, rather than repeat
    cfg = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=96, max_position_embeddings=64, initializer_range=0.5, eos_token_id=None)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})).eval()


def torch_generate(model, prompt=PROMPT, n=NEW):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, attention_mask=None)
    return out[0].tolist()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.numpy()


def edge_matches_torch(model, path, backends=("auto", "numpy"), **export_kw):
    desc = sparsetorch.export_edge(model, IDS, path, **export_kw)
    assert desc["version"] == 3 and desc["nodes"][0]["op"] == "llama"
    want, tokens = logits(model, OTHER), torch_generate(model)
    assert len(set(tokens[len(PROMPT):])) > 3  # a test that can fail: the tokens vary
    for backend in backends:
        runtime = edge.load(path, backend=backend)
        got = runtime(OTHER.numpy())
        assert np.abs(got - want).max() <= FP32_TOLERANCE * max(1.0, np.abs(want).max()), backend
        assert runtime.generate(PROMPT, NEW) == tokens, backend
    return desc


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True,
                                                                      "num_key_value_heads": 1, "rope_theta": 500.0}])
def test_llama_matches_torch_generate(kw, tmp_path):
    if "rope_theta" in kw:  # transformers 5 takes it in rope_parameters
        kw = {**kw, "rope_parameters": {"rope_type": "default", "rope_theta": kw.pop("rope_theta")}}
    model = llama(**kw)
    desc = edge_matches_torch(model, tmp_path / "llama.spt")
    node = desc["nodes"][0]
    assert node["tied"] == bool(kw.get("tie_word_embeddings")) and node["kv_heads"] == [kw.get("num_key_value_heads", 2)] * 3
    if node["tied"]:  # one table in the file, used for the lookup and the output head
        assert "lm_head.weight" not in desc["tensors"]


def test_llama_shrunk_and_pruned_runs_compactly_on_the_kernels(tmp_path):
    model = llama(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4, intermediate_size=64)
    calib = [IDS]
    remove_blocks(model, 1, calib)
    with torch.no_grad():  # block 0's MLP neurons are the weakest: per-block ranking cuts them there
        model.model.layers[0].mlp.up_proj.weight[:24] *= 0.01
    remove_heads(model, 0.25, calib, per_layer=True, unit="query")
    remove_mlp_channels(model, 0.25, calib, per_layer=True)
    remove_hidden(model, 0.25, calib)
    widths = [layer.mlp.up_proj.out_features for layer in model.model.layers]
    assert len(model.model.layers) == 3 and len(set(widths)) > 1 and model.model.embed_tokens.weight.shape[1] == 24
    sparsetorch.prune(model, 0.7)  # 30% dense: "auto" keeps fp32 weights compact at most 35% dense
    desc = edge_matches_torch(model, tmp_path / "small.spt", backends=("auto", "numpy", "dense"))
    assert desc["nodes"][0]["width"] == 24
    # the per-block widths saved with save_pretrained and loaded back (sparsetorch's loader) export the same
    loaded = from_pretrained(save_pretrained(model, tmp_path / "small"))
    sparsetorch.export_edge(loaded, IDS, tmp_path / "loaded.spt")
    np.testing.assert_array_equal(edge.load(tmp_path / "loaded.spt")(OTHER.numpy()),
                                  edge.load(tmp_path / "small.spt")(OTHER.numpy()))
    pruned = [m for n, m in desc["tensors"].items() if "layers" in n]
    assert pruned and all(m["layout"] == "bitmask" for m in pruned)
    runtime = edge.load(tmp_path / "small.spt")
    block = runtime.transformer.blocks[0]
    assert block.up.weight.kind == "bitmask" and block.up.weight.mask.dtype == np.int16
    if bitmask_kernels() is not None:
        assert block.up.backend == "compiled"
    # compact values: the same model in int8 and bf16 is smaller and decodes on the same kernels
    fp32_size = (tmp_path / "small.spt").stat().st_size
    # max |logit error| / max |logit| measured on this random model (init 0.5, errors compound through 3 blocks):
    # bf16 0.020, int8 0.067; the bounds leave about 2x
    for values, bound in (("bf16", 0.04), ("int8", 0.12)):
        desc = sparsetorch.export_edge(model, IDS, tmp_path / f"{values}.spt", values=values)
        assert (tmp_path / f"{values}.spt").stat().st_size < 0.7 * fp32_size
        assert desc["check"]["max_abs_error"] < bound * desc["check"]["max_abs_output"], desc["check"]
        assert len(edge.load(tmp_path / f"{values}.spt").generate(PROMPT, 8)) == len(PROMPT) + 8


@pytest.mark.parametrize("rope", [{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 16},
                                  {"rope_type": "yarn", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}])
def test_static_rope_scalings_run(rope, tmp_path):
    model = llama(rope_parameters={**rope, "rope_theta": 10000.0})
    desc = edge_matches_torch(model, tmp_path / "rope.spt", backends=("auto",))
    assert desc["nodes"][0]["rope_type"] == rope["rope_type"]


@pytest.mark.parametrize("kw, needle", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "rope scaling 'dynamic'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
                          "long_factor": [2.0] * 4, "original_max_position_embeddings": 32}}, "rope scaling 'longrope'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_llama_features_are_refused_naming_them(kw, needle, tmp_path):
    with pytest.raises(SparsityError, match="not supported") as info:
        sparsetorch.export_edge(llama(**kw), IDS, tmp_path / "x.spt")
    assert needle in str(info.value)
    assert not (tmp_path / "x.spt").exists()


def test_generation_stops_at_eos_and_at_the_last_position(tmp_path):
    model = llama()
    eos = torch_generate(model)[len(PROMPT) + 4]
    model.generation_config.eos_token_id = eos
    tokens = torch_generate(model)
    assert tokens[-1] == eos and len(tokens) < len(PROMPT) + NEW
    sparsetorch.export_edge(model, IDS, tmp_path / "eos.spt")
    runtime = edge.load(tmp_path / "eos.spt")
    assert runtime.generate(PROMPT, NEW) == tokens
    with pytest.raises(SparsityError, match="past the model's 64 positions"):
        runtime.generate(PROMPT, 60)


def test_tampered_llama_node_is_refused(tmp_path):
    from safetensors.numpy import save_file

    sparsetorch.export_edge(llama(), IDS, tmp_path / "m.spt")
    desc, arrays = edge.read_file(tmp_path / "m.spt")
    desc["nodes"][0]["heads"] = [3, 4, 4]  # 3 query heads do not fill block 0's 32-wide q_proj
    save_file(arrays, str(tmp_path / "bad.spt"), metadata={"sparsetorch.edge": json.dumps(desc)})
    with pytest.raises(SparsityError, match="corrupted"):
        edge.load(tmp_path / "bad.spt")


def test_llama_runtime_imports_no_torch(tmp_path):
    model = llama(tie_word_embeddings=True)
    sparsetorch.prune(model, 0.5)
    sparsetorch.export_edge(model, IDS, tmp_path / "m.spt", values="bf16")
    code = ("import sys, sparsetorch.edge as e\n"
            f"print(e.load({str(tmp_path / 'm.spt')!r}).generate({PROMPT}, 8))\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True)
    assert len(json.loads(out.stdout)) == len(PROMPT) + 8
