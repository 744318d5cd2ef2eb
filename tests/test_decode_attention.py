"""One query token's attention on the compiled kernel: SDPA's results on every ISA this CPU runs, compiled too."""
import pytest
import torch
import torch.nn.functional as F

from sparsetorch.errors import SparsityError
from sparsetorch.kernels import custom_ops, inference_ops
from sparsetorch.kernels.decode_attention import decode_attention, supported

pytestmark = pytest.mark.skipif(not inference_ops.available(), reason="compiled kernels not built")

SHAPES = [(1, 4, 8, 256, 64, 64),  # the 1B preset: 32 query heads over 4 key/value heads
          (2, 2, 3, 37, 80, 80),   # rows and head sizes off the vector width
          (1, 1, 1, 5, 16, 24),    # one head, value width != key width
          (2, 3, 2, 130, 128, 64)]


def _inputs(b, kv, group, L, d, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, kv, group, d, generator=g)
    k = torch.randn(b, kv, 2 * L, d, generator=g)[:, :, :L]  # a view of a longer cache, as a static cache slice
    v = torch.randn(b, kv, L, dv, generator=g)
    keep = torch.rand(b, L, generator=g) > 0.3
    keep[:, 0] = True
    return q, k, v, keep


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_sdpa_with_and_without_a_mask(isa, shape, monkeypatch):
    level = ("generic", "avx2", "avx512").index(isa)
    if level > inference_ops.isa_level():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setattr(inference_ops, "isa_level", lambda: level)
    q, k, v, keep = _inputs(*shape)
    b, kv, group, L, d, dv = shape
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=0.3)
    torch.testing.assert_close(decode_attention(q, k, v, keep, 0.3).view(b, kv, group, dv), want,
                               rtol=1e-4, atol=1e-5)
    want = F.scaled_dot_product_attention(q, k, v)  # no mask: every row; scale 1/sqrt(d)
    torch.testing.assert_close(decode_attention(q, k, v, None).view(b, kv, group, dv), want, rtol=1e-4, atol=1e-5)


def test_large_scores_stay_finite_and_exact():
    """Scores in the hundreds: the softmax subtracts the max first (e^x of the rest underflows to 0, not NaN)."""
    q, k, v, keep = _inputs(1, 2, 4, 100, 64, 64, seed=3)
    q = q * 30
    got = decode_attention(q, k, v, keep, 1.0)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=keep[:, None, None, :],
                                          scale=1.0)  # in float64: fp32 scores in the hundreds round by ~1e-5
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.view_as(want).double(), want, rtol=1e-3, atol=1e-4)


def test_bad_inputs_are_refused_with_the_fix():
    q, k, v, keep = _inputs(1, 2, 2, 10, 16, 16)
    assert not supported(q.double(), k, v, keep)
    with pytest.raises(SparsityError, match="float32 CPU tensors"):
        decode_attention(q.double(), k, v, keep)
    with pytest.raises(SparsityError, match="disagree in shape"):
        decode_attention(q, k, v[:, :, :5], keep)
    with pytest.raises(SparsityError, match="disagree in shape"):
        decode_attention(q[:, :1], k, v, keep)
    assert not supported(q, k, v, keep.float())


def test_operator_compiles_in_one_graph():
    q, k, v, keep = _inputs(1, 2, 4, 33, 32, 32, seed=5)

    def attend(q, k, v, keep):
        return custom_ops.decode_attention(q, k, v, keep, 0.2) * 2

    compiled = torch.compile(attend, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, keep), attend(q, k, v, keep))
