"""``sparsetorch train``: train a model sparse with any method and print accuracy and sparsity."""
from __future__ import annotations

import argparse
import importlib
import time

NAME = "train"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(NAME, help="train a model sparse with GMP, RigL, SET, Static, SNIP, ... (digits by default)",
                       description="Train the built-in MLP or CNN on scikit-learn's digits -- or your own model "
                                   "and data given as import paths 'pkg.mod:factory' -- with a sparse training "
                                   "method, then print test accuracy and sparsity.")
    p.add_argument("--method", default="rigl",
                   help="gmp, static, set, rigl, srigl, snip, grasp, synflow, lottery or dense (default %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.9, help="target sparsity of the pruned layers (default %(default)s)")
    p.add_argument("--model", default="mlp",
                   help="'mlp' (64-256-256-10), 'cnn' (SmallCNN), or 'pkg.mod:factory' returning an nn.Module")
    p.add_argument("--data", default="digits",
                   help="'digits' or 'pkg.mod:factory' returning (x_train, y_train, x_test, y_test) tensors")
    p.add_argument("--epochs", type=int, default=30, help="epochs (per round for lottery) (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="constant, or cosine annealing to zero over the run (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="lottery: prune-and-rewind rounds (default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method hyperparameter, e.g. --set every=50 --set drop_fraction=0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for these small models on a busy machine)")
    p.add_argument("--save", metavar="FILE", help="save the trained sparse model (safetensors)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    return p


def load_object(path: str, what: str):
    """Call the factory named by ``'pkg.mod:factory'`` and return what it returns."""
    from ..errors import SparsityError

    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise SparsityError(f"--{what} {path!r} must look like 'pkg.module:factory' (a callable returning the {what})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SparsityError(f"cannot import {module_name!r} for --{what}: {exc}; is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SparsityError(f"{module_name} has no callable {attr!r} for --{what}")
    return factory()


def _model(spec: str):
    from torch import nn

    from ..errors import SparsityError
    from ..models import MLP, SmallCNN

    if spec == "mlp":
        return MLP((64, 256, 256, 10))
    if spec == "cnn":
        return SmallCNN()
    model = load_object(spec, "model")
    if not isinstance(model, nn.Module):
        raise SparsityError(f"--model {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def _data(spec: str, seed: int):
    import torch

    from ..errors import SparsityError

    if spec == "digits":
        from ..data import load_digits_split

        s = load_digits_split(seed=seed)
        return s.x_train, s.y_train, s.x_test, s.y_test
    data = load_object(spec, "data")
    if hasattr(data, "x_train"):
        data = (data.x_train, data.y_train, data.x_test, data.y_test)
    if not (isinstance(data, (tuple, list)) and len(data) == 4 and all(isinstance(t, torch.Tensor) for t in data)):
        raise SparsityError(f"--data {spec!r} must return (x_train, y_train, x_test, y_test) tensors")
    return tuple(data)


def _parse_overrides(items: list[str]) -> dict:
    import ast

    from ..errors import SparsityError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SparsityError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a plain string such as distribution=erk
    return out


def build_and_train(method: str, sparsity: float, model, data, *, epochs: int, lr: float, batch_size: int,
                    seed: int, rounds: int = 3, overrides: dict | None = None, lr_schedule: str = "constant"):
    """Train ``model`` sparse with ``method`` ('dense' for none); returns the sparsifier (or None)."""
    import torch

    from ..errors import SparsityError
    from ..recipes.training_loop import fit
    from ..sparsifiers import lottery_ticket, make_sparsifier
    from ..sparsifiers.method_registry import METHODS, for_run

    x_train, y_train, _, _ = data
    name = method.lower()
    if name != "dense" and name not in METHODS:
        raise SparsityError(f"unknown --method {method!r}; choose one of {['dense', *sorted(METHODS)]}")
    if epochs <= 0 or batch_size <= 0:
        raise SparsityError("--epochs and --batch-size must be positive")
    steps = epochs * -(-len(x_train) // batch_size)
    shuffle = torch.Generator().manual_seed(seed)
    make_opt = lambda m: torch.optim.Adam(m.parameters(), lr=lr)  # noqa: E731
    if name == "dense":
        fit(model, x_train, y_train, optimizer=make_opt(model), epochs=epochs, batch_size=batch_size,
            generator=shuffle, lr_schedule=lr_schedule)
        return None
    kwargs = for_run(name, sparsity=sparsity, total_steps=steps, **(overrides or {}))
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    if name in ("snip", "grasp"):
        kwargs.setdefault("batch", (x_train[:256], y_train[:256]))
    if name == "synflow":
        kwargs.setdefault("example_inputs", x_train[:1])

    def one_round(model, optimizer, sparsifier):
        fit(model, x_train, y_train, optimizer=optimizer, sparsifier=sparsifier, epochs=epochs,
            batch_size=batch_size, generator=shuffle, lr_schedule=lr_schedule)

    if name == "lottery":
        kwargs.pop("sparsity")
        kwargs.setdefault("rounds", rounds)
        return lottery_ticket(model, one_round, sparsity=sparsity, make_optimizer=make_opt, **kwargs)
    if METHODS[name].compressed:  # these move the connections of SparseLinear layers: swap those in first
        from ..sparse_training import to_sparse_training

        to_sparse_training(model, sparsity=sparsity, generator=torch.Generator().manual_seed(seed))
    optimizer = make_opt(model)
    sparsifier = make_sparsifier(name, **kwargs).attach(model, optimizer)
    one_round(model, optimizer, sparsifier)
    return sparsifier


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    import sparsetorch
    from sparsetorch.errors import check_sparsity
    from sparsetorch.recipes.training_loop import accuracy

    sparsity = check_sparsity(args.sparsity)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = _data(args.data, args.seed)
    model = _model(args.model)
    start = time.perf_counter()
    sparsifier = build_and_train(args.method, sparsity, model, data, epochs=args.epochs, lr=args.lr,
                                 batch_size=args.batch_size, seed=args.seed, rounds=args.rounds,
                                 overrides=_parse_overrides(args.overrides), lr_schedule=args.lr_schedule)
    seconds = time.perf_counter() - start
    acc = accuracy(model, data[2], data[3])
    result = {
        "method": args.method, "model": args.model, "data": args.data, "epochs": args.epochs, "seed": args.seed,
        "test_accuracy": acc,
        "target_sparsity": sparsity if sparsifier is not None else 0.0,
        "pruned_layers_sparsity": 1.0 - sparsifier.density() if sparsifier is not None else 0.0,
        "model_sparsity": _model_sparsity(model),
        "mask_updates": len(sparsifier.history) - 1 if sparsifier is not None else 0,
        "connections_moved": sum(r.get("moved", 0) for r in sparsifier.history) if sparsifier is not None else 0,
        "seconds": round(seconds, 2),
    }
    print(f"{args.method} on {args.model}/{args.data}: test accuracy {acc:.2%}")
    print(f"sparsity: {result['pruned_layers_sparsity']:.2%} of the pruned layers, "
          f"{result['model_sparsity']:.2%} of all weights; {result['mask_updates']} mask updates, "
          f"{result['connections_moved']} connections moved; {seconds:.1f} s")
    if args.save:
        sparsetorch.save(model, args.save)
        print(f"saved {args.save}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def _model_sparsity(model) -> float:
    """Zeros over all weights; a SparseLinear counts its whole [out, in] matrix, of which it stores nnz."""
    from ..sparse_training import SparseLinear

    total = zeros = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            size = module.out_features * module.in_features
            total, zeros = total + size, zeros + size - int((module.values != 0).sum())
            continue
        weight = module._parameters.get("weight")
        if weight is not None:
            total, zeros = total + weight.numel(), zeros + int((weight == 0).sum())
    return zeros / max(total, 1)
