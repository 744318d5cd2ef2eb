"""sparsetorch's byte GPT shrunk by depth, heads, MLP width and hidden size (per-block widths included) in the
torch-free edge runtime: same logits and the same greedy text as torch, through save_shrunk / load_shrunk too."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import sparsetorch
import sparsetorch.edge as edge
from sparsetorch.errors import SparsityError
from sparsetorch.export.edge_gpt import torch_generate
from sparsetorch.models.gpt import GPT, GPTConfig
from sparsetorch.shrink import (load_shrunk, remove_blocks, remove_heads, remove_hidden, remove_mlp_channels,
                                save_shrunk)

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = GPTConfig(layers=3, width=32, heads=4, context=16)
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
CALIB = [IDS]


def gpt():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def edge_matches_torch(model, path):
    """Export, load with the edge runtime: torch's logits on another batch and length, and its greedy text past
    the context window (the runtime's KV cache, then its sliding recomputation)."""
    desc = sparsetorch.export_edge(model, IDS, path)
    runtime = edge.load(path)
    other = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(runtime(other.numpy()), logits(model, other).numpy(), rtol=1e-4, atol=1e-5)
    assert runtime.generate(b"def f(x):", 20) == torch_generate(model, b"def f(x):", 20)
    return desc


def test_zero_heads_and_neurons_go_without_changing_the_byte_gpt():
    model = gpt()
    with torch.no_grad():
        for block in model.blocks:  # head 1: zero values (rows 64 + 8..16 of qkv); MLP neurons 0..31: zero
            block.attn.qkv.weight[64 + 8:64 + 16] = 0
            block.attn.qkv.bias[64 + 8:64 + 16] = 0
            block.mlp.fc.weight[:32] = 0
    expected = logits(model)
    remove_heads(model, 1, CALIB)
    remove_mlp_channels(model, 32, CALIB)
    assert [b.attn.heads for b in model.blocks] == [3] * 3 and model.cfg.heads == 3
    assert model.blocks[0].attn.qkv.weight.shape == (72, 32) and model.blocks[0].mlp.proj.in_features == 96
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-6)


def test_byte_gpt_shrunk_every_way_runs_in_the_edge_runtime(tmp_path):
    model = gpt()
    remove_blocks(model, 1, CALIB)
    with torch.no_grad():  # block 0's heads 0 and 1 output nothing: per-block ranking takes them from block 0
        model.blocks[0].attn.qkv.weight[64:80] = 0
        model.blocks[0].attn.qkv.bias[64:80] = 0
    remove_heads(model, 1, CALIB, per_layer=True)  # 2 heads in all, both from block 0
    remove_mlp_channels(model, 0.25, CALIB, per_layer=True)
    remove_hidden(model, 0.25, CALIB)
    heads = [b.attn.heads for b in model.blocks]
    assert len(model.blocks) == 2 and heads[0] < heads[1] and model.tok.weight.shape == (256, 24)
    desc = edge_matches_torch(model, tmp_path / "small.spt")
    gpt_node = desc["nodes"][0]
    assert desc["version"] == 2 and gpt_node["heads"] == heads and gpt_node["width"] == 24
    # save_shrunk records the head counts; LayerNorm / embedding sizes follow the loaded tensors
    save_shrunk(model, tmp_path / "small.safetensors")
    loaded = load_shrunk(tmp_path / "small.safetensors", lambda: GPT(dataclasses.replace(CFG, layers=2))).eval()
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    edge_matches_torch(loaded, tmp_path / "loaded.spt")


def test_depth_and_mlp_cuts_keep_the_format_older_runtimes_read(tmp_path):
    model = gpt()
    remove_blocks(model, 1, CALIB)
    remove_mlp_channels(model, 0.5, CALIB)
    desc = edge_matches_torch(model, tmp_path / "v1.spt")
    assert desc["version"] == 1 and desc["nodes"][0]["heads"] == 4


def test_tampered_head_counts_are_refused(tmp_path):
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    from sparsetorch.formats.safetensors_file import read_safetensors

    model = gpt()
    remove_heads(model, 1, CALIB)
    sparsetorch.export_edge(model, IDS, tmp_path / "m.spt")
    desc, arrays = edge.read_file(tmp_path / "m.spt")
    desc["nodes"][0]["heads"], desc["version"] = [5, 3, 3], 2  # 5 heads do not split block 0's 72-wide qkv
    save_file(arrays, str(tmp_path / "bad.spt"), metadata={"sparsetorch.edge": json.dumps(desc)})
    with pytest.raises(SparsityError, match="corrupted"):
        edge.load(tmp_path / "bad.spt")
    save_shrunk(model, tmp_path / "m.safetensors")
    header, state = read_safetensors(tmp_path / "m.safetensors", "sparsetorch_shrunk", newest_version=1,
                                     written_by="save_shrunk")
    header["attrs"]["blocks.0.attn"] = {"heads": 5}
    save_torch(state, str(tmp_path / "bad.safetensors"), metadata={"sparsetorch_shrunk": json.dumps(header)})
    with pytest.raises(SparsityError, match="do not split evenly"):
        load_shrunk(tmp_path / "bad.safetensors", lambda: GPT(CFG))
