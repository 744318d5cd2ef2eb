"""Training-free activation sparsity (TEAL, Liu et al. 2024): per Linear input, the magnitude threshold
below which a target fraction of its entries fall on a few calibration sequences; at inference those
entries are zeroed, and ``to_inference(..., activation_sparsity=...)`` runs the layer on a kernel that
skips the weight columns of zeroed inputs (sparsetorch.kernels.column_bitmask).

    act = calibrate_activation_sparsity(model, calib_ids, sparsity=0.4)   # thresholds (state_dict-able)
    with act.attach(model):                                              # the same thresholds in torch
        loss = ...
    fast = sparsetorch.to_inference(model, ids[:1], activation_sparsity=act)
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.layer_selection import Spec, select_targets
from ..errors import SparsityError
from ..kernels.column_bitmask import sparsify_input
from ..tracing import hooked

__all__ = ["ActivationSparsity", "calibrate_activation_sparsity", "magnitude_threshold"]


def magnitude_threshold(samples: torch.Tensor, sparsity: float) -> float:
    """The magnitude t with a ``sparsity`` fraction of the samples at |x| <= t (0 for sparsity 0)."""
    # TEAL (Liu et al. 2024, sec. 3.2): t = the sparsity-quantile of the calibration activations' |x|
    flat = samples.detach().reshape(-1).abs().float()
    k = int(sparsity * flat.numel())
    return 0.0 if k == 0 else float(flat.kthvalue(k).values)


def _check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise SparsityError(f"activation sparsity must be a fraction in [0, 1), got {sparsity!r}",
                            fix="pass e.g. sparsity=0.4 (40% of each Linear input zeroed)")
    return float(sparsity)


class _Hooks:
    """Forward pre-hooks that can be removed together, also as a context manager."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> "_Hooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class ActivationSparsity:
    """Per-Linear input thresholds: layer name -> (threshold, in_features), calibrated for ``sparsity``.

    ``state_dict()`` / ``load_state_dict()`` / ``from_state_dict()`` give plain float tensors (safetensors can
    save them); ``attach(model)`` applies the thresholds to a torch model through forward pre-hooks;
    ``check(model)`` says whether they fit a model."""

    def __init__(self, thresholds: dict[str, float], in_features: dict[str, int], sparsity: float):
        if set(thresholds) != set(in_features):
            raise SparsityError("thresholds and in_features must name the same layers")
        bad = {n: t for n, t in thresholds.items() if not (float(t) >= 0 and float(t) != float("inf"))}
        if bad:
            raise SparsityError("activation thresholds must be finite numbers >= 0", bad=dict(list(bad.items())[:3]))
        self.sparsity = _check_sparsity(sparsity)
        self.thresholds = {n: float(t) for n, t in thresholds.items()}
        self.in_features = {n: int(f) for n, f in in_features.items()}

    def __repr__(self) -> str:
        return f"ActivationSparsity(sparsity={self.sparsity}, layers={len(self.thresholds)})"

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"sparsity": torch.tensor(self.sparsity)}
        for name, t in self.thresholds.items():
            state[f"{name}.threshold"] = torch.tensor(t)
            state[f"{name}.in_features"] = torch.tensor(self.in_features[name])
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "ActivationSparsity":
        if "sparsity" not in state:
            raise SparsityError("not an ActivationSparsity state_dict (no 'sparsity' entry)", keys=sorted(state)[:5])
        names = {k[:-len(".threshold")] for k in state if k.endswith(".threshold")}
        missing = [n for n in names if f"{n}.in_features" not in state]
        if missing or len(state) != 1 + 2 * len(names):
            raise SparsityError("ActivationSparsity state_dict entries must be 'sparsity' and '<layer>.threshold' / "
                                "'<layer>.in_features' pairs", missing=missing[:3])
        return cls({n: float(state[f"{n}.threshold"]) for n in names},
                   {n: int(state[f"{n}.in_features"]) for n in names}, float(state["sparsity"]))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        loaded = self.from_state_dict(state)  # validated before anything is replaced
        self.sparsity, self.thresholds, self.in_features = loaded.sparsity, loaded.thresholds, loaded.in_features

    # ---------------------------------------------------------------- use
    def check(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The model's Linear layers these thresholds are for; SparsityError if any is missing or of another width."""
        mods = dict(model.named_modules())
        missing = [n for n in self.thresholds if not isinstance(mods.get(n), nn.Linear)]
        wrong = {n: (self.in_features[n], mods[n].in_features) for n in self.thresholds
                 if n not in missing and mods[n].in_features != self.in_features[n]}
        if missing or wrong:
            raise SparsityError("these activation thresholds were calibrated for a different model",
                                not_linear_here=missing[:3], in_features_calibrated_vs_here=dict(list(wrong.items())[:3]),
                                fix="calibrate_activation_sparsity(model, calibration_ids) on this model")
        return {n: mods[n] for n in self.thresholds}

    def attach(self, model: nn.Module) -> _Hooks:
        """Zero each calibrated Linear's small inputs in ``model`` (forward pre-hooks; ``.remove()`` or use as
        ``with act.attach(model): ...``). The model's weights and state_dict are untouched."""
        handles = []
        for name, mod in self.check(model).items():
            t = self.thresholds[name]
            handles.append(mod.register_forward_pre_hook(
                lambda m, inp, t=t: (sparsify_input(inp[0], t), *inp[1:])))
        return _Hooks(handles)


def calibrate_activation_sparsity(model: nn.Module, calibration, sparsity: float = 0.4, *, include: Spec = None,
                                  exclude: Spec = None) -> ActivationSparsity:
    """Thresholds that zero a ``sparsity`` fraction of every Linear input on ``calibration`` (token ids
    [N, T], or a tuple of the model's forward arguments: a few sequences suffice).

    Layers are calibrated in forward order, each on its input with the thresholds before it applied, in one
    forward pass over the calibration batch. Layers that share an input (q/k/v, gate/up) see the same
    activations and so get the same threshold. ``include`` / ``exclude`` choose the Linear layers as everywhere
    in sparsetorch (docs/api.md): by default all but the final classifier / ``lm_head``."""
    sparsity = _check_sparsity(sparsity)
    args = calibration if isinstance(calibration, (tuple, list)) else (calibration,)
    if calibration is None or not args or not all(isinstance(a, torch.Tensor) for a in args) or args[0].numel() == 0:
        raise SparsityError("calibrate_activation_sparsity needs calibration data: a non-empty tensor of token "
                            "ids [N, T] (or a tuple of the model's forward arguments)",
                            got=type(calibration).__name__)
    layers = {t.fqn: t.module for t in select_targets(model, include, exclude) if isinstance(t.module, nn.Linear)}
    if not layers:
        raise SparsityError("no Linear layer to calibrate among the chosen layers", model=type(model).__name__,
                            fix="include=[...] with the Linear layers' names or types")
    thresholds: dict[str, float] = {}

    def calibrate(name: str):
        def hook(mod, inp):
            # in forward order, on inputs already sparsified upstream: each threshold meets its target on the
            # activations it will see at inference, not on the dense model's (which drift downstream)
            if name not in thresholds:  # a layer called twice keeps its first call's threshold
                thresholds[name] = magnitude_threshold(inp[0], sparsity)
            return (sparsify_input(inp[0], thresholds[name]), *inp[1:])
        return hook

    with hooked(m.register_forward_pre_hook(calibrate(n)) for n, m in layers.items()), torch.no_grad():
        model(*args)
    return ActivationSparsity(thresholds, {n: layers[n].in_features for n in thresholds}, sparsity)
