"""The layer modules ``to_inference`` puts in place of sparse layers: :class:`PackedLinear` (a packed weight
run by a compiled or torch sparse kernel), :class:`PackedConv2d` (unfold + PackedLinear) and
:class:`SparsifiedInputLinear` (activation sparsity on a row kernel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import inference_ops
from ..kernels.packed import PackedWeight

__all__ = ["PackedLinear", "PackedConv2d", "SparsifiedInputLinear"]


class PackedLinear(nn.Module):
    """``y = x @ W^T + b`` with W stored sparse; ``kernel`` names how it runs (see module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, kernel: str,
                 packed: PackedWeight | None = None, weight: torch.Tensor | None = None, threads: int | None = None):
        super().__init__()
        # compiled kernels: None follows torch.get_num_threads(); 1 when measured faster (short calls on a
        # busy machine, where waiting for a second thread costs more than it saves)
        self.threads = threads
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.packed = packed
        self._backend = "torch" if kernel.startswith("torch") else "ext"
        self._fast_cache: tuple | None = None
        # the 2:4 semi-structured CUDA tensor or the CUDA BSR tensor (not a buffer: not a plain tensor)
        self.sparse_weight = weight
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        if self.kernel == "semi-structured":
            return F.linear(x, self.sparse_weight, self.bias)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # [B(*T), in]
        if self._backend == "ext" and torch.compiler.is_compiling():
            # torch.compile: the kernel as a torch.ops.sparsetorch operator (buffers as tensors: no graph break)
            y = self.packed.op_linear(x2, self.bias, self.threads)
            y = y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
            return y if y.dtype == x.dtype else y.to(x.dtype)
        # hot path for small layers: skip the general checks (long prompts go to the weight's own prefill path)
        if self._backend == "ext" and x2.shape[0] < getattr(self.packed, "prefill_rows", 1 << 62):
            y = inference_ops.call_fast(self._fast(), x2, 0 if self.bias is None else self.bias.data_ptr(), self.out_features,
                               self.threads)
            if y is not None:
                return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        if self.kernel == "cuda-bsr":
            y = (self.sparse_weight @ x2.t()).t()
            y = y if self.bias is None else y + self.bias
        else:
            y = self.packed.linear(x2, self.bias, self._backend, self.threads)
        y = y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def _fast(self) -> tuple:
        """Kernel, ISA, tile and weight addresses, recomputed only when the weight buffers change."""
        if self.bias is not None and (self.bias.dtype != torch.float32 or not self.bias.is_contiguous()):
            self.bias = self.bias.float().contiguous()
        key = (self.packed.storage_key(), None if self.bias is None else self.bias.data_ptr())
        if self._fast_cache is None or self._fast_cache[0] != key:
            self._fast_cache = (key, inference_ops.fast_path(self.packed.kernel_name, self.packed._static(), self.in_features))
        return self._fast_cache[1]

    def extra_repr(self) -> str:
        threads = "" if self.threads is None else f", threads={self.threads}"
        return f"{self.in_features}, {self.out_features}, kernel={self.kernel}, bias={self.bias is not None}{threads}"


class PackedConv2d(nn.Module):
    """Conv2d (groups=1) as unfold + sparse matmul: each output pixel is W [out, in*kh*kw] @ its patch."""

    def __init__(self, conv: nn.Conv2d, linear: PackedLinear):
        super().__init__()
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.out_channels = conv.out_channels
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, H, W]
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # [N, C*kh*kw, L]
        hout = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        wout = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        y = self.linear(cols.transpose(1, 2))  # [N, L, out]
        return y.transpose(1, 2).reshape(n, self.out_channels, hout, wout)


class SparsifiedInputLinear(nn.Module):
    """``layer(x)`` with the inputs of magnitude at most ``threshold`` zeroed (TEAL) first: activation sparsity on
    a row kernel, which reads every weight. ``to_inference`` uses it where that measured faster than the column
    kernel that skips the zeroed inputs' weights (an int8 x int8 row kernel against a column kernel without one,
    or a CPU whose column kernel is not vectorised), so adding activation sparsity never slows a layer down."""

    def __init__(self, threshold: float, layer: nn.Module):
        super().__init__()
        self.threshold, self.layer = float(threshold), layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(inference_ops.sparsify_input(x, self.threshold))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}"
