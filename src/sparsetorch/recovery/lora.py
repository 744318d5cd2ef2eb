"""PEFT LoRA adapters on a pruned model, merged through its masks so the sparsity survives.

A plain LoRA merge adds the dense product B @ A to every weight, so a 50%-sparse model comes back dense
(a Wanda user's 40% model was 32.7% sparse after merging). ``merge_lora`` adds (B @ A * scale) * mask
instead: pruned weights stay exactly zero and the masks (unstructured, N:M, blocks) are bit-identical.

With ``masked=True`` (the default) the adapters also train through the mask: each adapted layer computes
x W^T + dropout(x) ((B A s) * M)^T, so the adapter as trained is exactly the merged model (the idea of SQFT's
SparsePEFT, arXiv 2410.03750). ``masked=False`` keeps PEFT's own cheaper forward (no [out, in] product per
step); merging then drops the update on pruned positions, which changes the model (the benchmark measures by
how much).
"""
from __future__ import annotations

import types
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..core.masks import get_mask, set_mask
from ..core.rng import resolve_generator
from ..errors import SparsityError
from ..oneshot.linear_layers import is_linear_like

__all__ = ["add_lora", "merge_lora", "lora_layers", "mask_adapters"]


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("sparse LoRA needs peft: pip install 'sparsetorch[peft]'") from None
    return peft


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The PEFT LoRA layers of ``model`` that wrap a Linear-like base layer."""
    lora = _peft().tuners.lora.LoraLayer
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora) and hasattr(m.get_base_layer(), "weight")]


def _default_targets(model: nn.Module, exclude: Sequence[str]) -> list[str]:
    names = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not is_linear_like(module) or w is None or any(name.endswith(e) for e in exclude):
            continue
        if get_mask(module) is not None or bool((w == 0).any()):
            names.append(name)
    return names


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: Sequence[str] | None = None, masked: bool = True, exclude: Sequence[str] = ("lm_head",),
             generator: torch.Generator | None = None):
    """Wrap ``model`` with PEFT LoRA adapters of rank ``r`` on its pruned Linear layers; returns the PeftModel.

    By default every Linear that has a mask or holds zeros is adapted (``exclude`` suffixes skipped); a layer
    without a registered mask gets one from its zeros first, so the merge knows its pattern. The base weights
    are frozen by PEFT; only the adapters train. The A matrices are drawn from ``generator`` (PEFT's own
    init draws from the global generator, so two runs would differ).
    """
    peft = _peft()
    if r < 1:
        raise SparsityError(f"LoRA rank must be >= 1, got {r}")
    targets = list(target_modules) if target_modules is not None else _default_targets(model, exclude)
    if not targets:
        raise SparsityError("no pruned Linear layers to adapt: prune the model first or pass target_modules")
    modules = dict(model.named_modules())
    for name in targets:
        module = modules.get(name)
        if module is not None and getattr(module, "weight", None) is not None and get_mask(module) is None:
            set_mask(module, module.weight.detach() != 0)
    conv1d = any(type(modules.get(n)).__name__ == "Conv1D" for n in targets)  # GPT-2 stores W as [in, out]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                             fan_in_fan_out=conv1d)
    wrapped = peft.get_peft_model(model, config)
    init_adapters(wrapped, resolve_generator(generator))
    if masked:
        mask_adapters(wrapped)
    return wrapped


@torch.no_grad()
def init_adapters(model: nn.Module, generator: torch.Generator) -> None:
    """PEFT's LoRA init from ``generator``: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform with a = sqrt(5), as
    PEFT and nn.Linear use), B = 0, so the adapted model starts equal to the base model."""
    for _, layer in lora_layers(model):
        for name in layer.lora_A:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            bound = a.shape[1] ** -0.5
            a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float64).mul_(2 * bound).sub_(bound).to(a))
            b.zero_()


def mask_adapters(model: nn.Module) -> int:
    """Make every LoRA layer of ``model`` compute its update through its base layer's mask (see the module
    docstring); a base layer with zeros but no mask gets one from its zeros. Returns the layers changed."""
    changed = 0
    for _, layer in lora_layers(model):
        base = layer.get_base_layer()
        if get_mask(base) is None and bool((base.weight == 0).any()):
            set_mask(base, base.weight.detach() != 0)
        if getattr(layer.forward, "__func__", None) is not _masked_forward:
            layer.forward = types.MethodType(_masked_forward, layer)
            changed += 1
    return changed


def _delta(layer: nn.Module) -> torch.Tensor | None:
    """Sum of the active adapters' B @ A * scale, in the base weight's layout."""
    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
    return sum(deltas) if deltas else None


def _masked_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.get_base_layer()
    result = base(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    mask = get_mask(base)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        delta = self.get_delta_weight(name)
        if mask is not None:
            delta = delta * mask
        if getattr(self, "fan_in_fan_out", False):
            delta = delta.t()
        xd = self.lora_dropout[name](x).to(delta.dtype)
        result = result + F.linear(xd, delta).to(result.dtype)
    return result


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA adapter through its base layer's mask and remove PEFT; returns the base model.

    Pruned weights stay exactly zero and masks are unchanged, whatever the pattern; a base layer without a
    mask is refused (merging would densify it) unless it holds no zeros at all.
    """
    layers = lora_layers(model)
    if not layers:
        raise SparsityError("the model has no LoRA adapters to merge; pass the model returned by add_lora")
    for name, layer in layers:
        base = layer.get_base_layer()
        delta = _delta(layer)
        if delta is None:
            continue
        mask = get_mask(base)
        if mask is None:
            if bool((base.weight == 0).any()):
                raise SparsityError(f"{name} has zeros but no mask: merging would make it dense. Register its mask "
                                    "(sparsetorch.set_mask) or build the adapters with add_lora", layer=name)
            base.weight.add_(delta.to(base.weight.dtype))
        else:
            base.weight.add_((delta * mask).to(base.weight.dtype))
    return model.unload() if hasattr(model, "unload") else model
