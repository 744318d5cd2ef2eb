"""`sparsetorch report` writes one self-contained page that a real browser renders without errors."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import sparsetorch
from sparsetorch.models import MLP

pytest.importorskip("matplotlib")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def html_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = MLP((64, 32, 32, 10))
    sparsetorch.prune(model, 0.9, scope="layer")
    ckpt = sparsetorch.save(model, tmp / "mlp.safetensors", metadata={
        "architecture": {"factory": "sparsetorch.models:MLP", "kwargs": {"sizes": [64, 32, 32, 10]}},
        "input_shape": [64], "image_shape": [8, 8],
        "history": [{"step": 10 * i, "moved": 50 - i, "density": 0.1} for i in range(6)]})
    out = tmp / "report.html"
    bench = tmp / "bench.json"  # the training-quality benchmark's layout
    bench.write_text('{"results": {"mlp": {"gmp": {"0.9": {"mean": 0.98, "std": 0.01}, "0.95": {"mean": 0.97}}}}}')
    run = subprocess.run([sys.executable, "-m", "sparsetorch.cli", "report", str(ckpt), "--data", "digits",
                          "--bench", str(bench), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return out


def test_page_is_self_contained(html_report):
    text = html_report.read_text()
    assert "<script" not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:)?//', text)
    for section in ("Layers", "Which connections survive", "Which input features matter", "Mask dynamics",
                    "Cost per inference (estimate)", "file on disk", "Accuracy vs sparsity"):
        assert section in text


def test_report_needs_architecture_for_foreign_files(tmp_path):
    path = sparsetorch.save(torch.nn.Sequential(torch.nn.Linear(3, 3)), tmp_path / "x.safetensors")
    run = subprocess.run([sys.executable, "-m", "sparsetorch.cli", "report", str(path), "--out", str(tmp_path / "r.html")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--model" in run.stderr


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_renders_in_headless_chromium(html_report, tmp_path):
    assert CHROMIUM, "CI installs chromium (see .ci/run); it is missing"
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--log-level=0",
         "--window-size=1200,1600", f"--screenshot={shot}", html_report.as_uri()],
        capture_output=True, text=True, timeout=120)
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    assert shot.exists(), run.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    non_white = (pixels < 0.9).any(axis=-1).mean()
    assert non_white > 0.02 and pixels.std() > 0.05  # text, tables and figures, not a blank page
