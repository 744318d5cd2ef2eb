"""The edge runtime's operators on float32 numpy arrays (torch semantics, NCHW / NCL layouts)."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .linear import Linear


def erf(x: np.ndarray) -> np.ndarray:
    # Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7: below float32 resolution near erf's range of [-1, 1]
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    if approximate == "tanh":  # Hendrycks & Gimpel's tanh form, as torch's approximate="tanh"
        return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x ** 3)))
    return 0.5 * x * (1.0 + erf(x * np.float32(0.7071067811865476)))


def sigmoid(x: np.ndarray) -> np.ndarray:
    # split by sign so exp never overflows
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


ACTIVATIONS = {
    "relu": lambda x, **_: np.maximum(x, np.float32(0)),
    "gelu": lambda x, approximate="none", **_: gelu(x, approximate),
    "silu": lambda x, **_: x * sigmoid(x),
    "tanh": lambda x, **_: np.tanh(x),
    "sigmoid": lambda x, **_: sigmoid(x),
}


def softmax(x: np.ndarray, dim: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=dim, keepdims=True))
    return e / e.sum(axis=dim, keepdims=True)


def layer_norm(x: np.ndarray, ndim: int, weight, bias, eps: float) -> np.ndarray:
    axes = tuple(range(-ndim, 0))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(eps))
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(np.float32, copy=False)


def _pad(x: np.ndarray, pads: list[list[int]], value: float) -> np.ndarray:
    if not any(lo or hi for lo, hi in pads):
        return x
    return np.pad(x, [(0, 0), (0, 0), *map(tuple, pads)], constant_values=value)


def _windows(x: np.ndarray, kernel, stride, dilation) -> np.ndarray:
    """[B, C, *spatial] -> [B, C, *out_spatial, *kernel] views of every window."""
    nd = len(kernel)
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    w = sliding_window_view(x, span, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None), *(slice(None, None, s) for s in stride),
             *(slice(None, None, d) for d in dilation))
    return w[index]


def conv(x: np.ndarray, linears: list[Linear], kernel, stride, padding, dilation) -> np.ndarray:
    """Convolution as im2col + matmul, one (possibly sparse) [out/groups, in/groups * prod(kernel)] weight per group."""
    nd = len(kernel)
    cols = _windows(_pad(x, padding, 0.0), kernel, stride, dilation)  # [B, C, *O, *K]
    b, c, out_sp = cols.shape[0], cols.shape[1], cols.shape[2:2 + nd]
    # -> [B, *O, C, *K] so that one im2col row is (channel, kernel offsets), torch's weight layout
    cols = np.moveaxis(cols, 1, 1 + nd)
    cg = c // len(linears)
    parts = []
    for g, linear in enumerate(linears):
        group = cols[(slice(None),) * (1 + nd) + (slice(g * cg, (g + 1) * cg),)]
        parts.append(linear(group.reshape(-1, linear.in_features)))
    y = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    y = y.reshape(b, *out_sp, -1)
    return np.ascontiguousarray(np.moveaxis(y, -1, 1))  # [B, out, *O]


def pool(x: np.ndarray, kind: str, kernel, stride, padding, dilation, count_include_pad: bool = True) -> np.ndarray:
    nd = len(kernel)
    axes = tuple(range(-nd, 0))
    if kind == "max":
        return _windows(_pad(x, padding, -np.inf), kernel, stride, dilation).max(axis=axes)
    total = _windows(_pad(x, padding, 0.0), kernel, stride, dilation).sum(axis=axes)
    if count_include_pad or not any(lo or hi for lo, hi in padding):
        return (total / np.float32(np.prod(kernel))).astype(np.float32)
    ones = np.ones((1, 1, *x.shape[2:]), np.float32)
    counts = _windows(_pad(ones, padding, 0.0), kernel, stride, dilation).sum(axis=axes)
    return (total / counts).astype(np.float32)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    # Zhang & Sennrich 2019 (RMSNorm), as transformers' LlamaRMSNorm: x / sqrt(mean(x^2) + eps) * weight
    scale = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(eps))
    return (weight * (x * scale)).astype(np.float32, copy=False)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary position embedding (Su et al. 2021, RoFormer) in transformers' half-split form:
    x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]; x [..., T, D], cos / sin [T, D]."""
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin
