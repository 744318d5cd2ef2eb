"""The Lightning callback with a real lightning.Trainer on CPU."""
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import sparsetorch  # noqa: E402
from sparsetorch.integrations.lightning import SparsityCallback  # noqa: E402
from sparsetorch.models import MLP  # noqa: E402

from ddp_worker import SwapSparsifier  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = MLP((12, 24, 16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(24, 12, generator=g), torch.randint(0, 3, (24,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)  # 3 batches per epoch


def trainer(sparsifier, **kwargs):
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[SparsityCallback(sparsifier)],
                      **kwargs)


def swap():
    return SwapSparsifier(sparsity=0.75, every=2, generator=torch.Generator().manual_seed(4))


def test_lightning_run_keeps_masks_and_sparsity():
    module, sparsifier = Classifier(), swap()
    trainer(sparsifier, max_steps=4, accumulate_grad_batches=2).fit(module, data())
    assert sparsifier.step_count == 4  # per optimizer step, not per batch
    assert [row["step"] for row in sparsifier.history] == [0, 2, 4]
    assert all(row["moved"] > 0 for row in sparsifier.history[1:])
    masked = list(sparsetorch.iter_masks(module))
    assert [m.qualified_name for m in masked] == ["net.fc1.weight", "net.fc2.weight"]
    for item in masked:
        assert (item.param[~item.mask] == 0).all()
    assert sparsifier.density() == pytest.approx(0.25, abs=0.01)


def rigl():
    from sparsetorch import sparsifiers

    if not hasattr(sparsifiers, "RigL"):
        pytest.skip("RigL is not available")
    return sparsifiers.RigL(sparsity=0.75, every=2, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("make", [swap, rigl], ids=["swap", "RigL"])
def test_lightning_resume_continues_the_run_bitwise(tmp_path, make):
    # whole epochs (3 steps each): Lightning replays data differently when stopped mid-epoch
    ref, ref_sparsifier = Classifier(), make()
    trainer(ref_sparsifier, max_epochs=2).fit(ref, data())

    first = Classifier()
    t = trainer(make(), max_epochs=1)
    t.fit(first, data())
    t.save_checkpoint(tmp_path / "half.ckpt")
    module, sparsifier = Classifier(seed=9), make()  # a new process
    trainer(sparsifier, max_epochs=2).fit(module, data(), ckpt_path=tmp_path / "half.ckpt", weights_only=True)

    assert sparsifier.step_count == 6 and sparsifier.history == ref_sparsifier.history
    for item, other in zip(sparsetorch.iter_masks(module), sparsetorch.iter_masks(ref)):
        assert torch.equal(item.mask, other.mask)
    for (name, value), other in zip(module.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(value, other), name


def test_lightning_with_rigl():
    from sparsetorch import sparsifiers

    if not hasattr(sparsifiers, "RigL"):
        pytest.skip("RigL is not available")
    module = Classifier()
    sparsifier = sparsifiers.RigL(sparsity=0.75, every=2, generator=torch.Generator().manual_seed(0))
    trainer(sparsifier, max_steps=6, accumulate_grad_batches=2).fit(module, data())
    assert sparsifier.step_count == 6 and sum(row["moved"] for row in sparsifier.history[1:]) > 0
    assert sparsifier.density() == pytest.approx(0.25, abs=0.01)
    for item in sparsetorch.iter_masks(module):
        assert (item.param[~item.mask] == 0).all()
