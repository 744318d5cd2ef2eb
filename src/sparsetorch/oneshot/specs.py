"""One-shot configurations as short strings ("wanda+owl+dsnot"), parsed into ``prune_oneshot`` keywords.

Benchmarks, the conformance registry and the CLI name configurations this way:

    "wanda"              Wanda, uniform sparsity
    "sparsegpt+owl"      SparseGPT with OWL's layer-wise sparsity
    "wanda+owl+dsnot"    ... refined by DSnoT
    "ria+perm"           RIA with its channel permutation (N:M only)
    "sparsegpt+int8"     joint sparsity and int8 quantization (int4: "+int4", groups of 128: "+int4g128")
    "sparsegpt+rtn8"     prune, then round to nearest on the same grid (the baseline joint quantization beats)
    "magnitude/row"      magnitude compared per output row ("/layer" per layer)

"rtn" is applied by the caller after pruning (``extra["rtn"] = (bits, group_size)``): it is the
baseline, not a way we recommend quantizing.
"""
from __future__ import annotations

import re

from ..errors import SparsityError

__all__ = ["parse_spec", "uses_data", "applies_to", "CONFORMANCE_SPECS", "NM_ONLY_SPECS"]

# every score, solver, distribution, refinement and quantization, each checked by the conformance suite
CONFORMANCE_SPECS = ("magnitude", "magnitude/row", "wanda", "ria", "sparsegpt", "wanda+owl", "sparsegpt+owl",
                     "ria+owl", "sparsegpt+int8", "sparsegpt+int4g16", "wanda+int4", "wanda+dsnot", "sparsegpt+dsnot",
                     "wanda+owl+dsnot", "magnitude+dsnot", "sparsegpt+dsnot+int8", "alps", "alps+owl", "alps+dsnot",
                     "alps+int8")
NM_ONLY_SPECS = ("ria+perm", "ria+perm+dsnot")  # checked with N:M patterns only


def parse_spec(spec: str) -> tuple[dict, dict]:
    """(keywords for prune_oneshot, extras the benchmark applies itself, e.g. {"rtn": (bits, group)})."""
    method, *tags = spec.split("+")
    kwargs, extra = {}, {}
    if "/" in method:
        method, kwargs["scope"] = method.split("/")
    kwargs["method"] = method
    for tag in tags:
        q = re.fullmatch(r"(int|rtn)(4|8)(?:g(\d+))?", tag)
        if tag == "owl":
            kwargs["distribution"] = "owl"
        elif tag == "dsnot":
            kwargs["refine"] = "dsnot"
        elif tag == "perm":
            kwargs["permute"] = True
        elif q and q.group(1) == "int":
            kwargs["bits"] = int(q.group(2))
            kwargs["group_size"] = int(q.group(3)) if q.group(3) else None
        elif q:
            extra["rtn"] = (int(q.group(2)), int(q.group(3)) if q.group(3) else None)
        else:
            raise SparsityError(f"unknown tag {tag!r} in one-shot spec {spec!r}; tags are owl, dsnot, perm, int4/int8 "
                                "(optionally g<group size>) and rtn4/rtn8", spec=spec)
    return kwargs, extra


def uses_data(spec: str) -> bool:
    """Whether the calibration draw matters (magnitude alone ignores it)."""
    kwargs, _ = parse_spec(spec)
    return kwargs["method"] != "magnitude" or any(k in kwargs for k in ("distribution", "refine", "bits"))


def applies_to(spec: str, pattern: str) -> bool:
    """Whether ``spec`` makes sense with ``pattern``: OWL varies the sparsity per block (unstructured
    only), RIA's permutation is for N:M only."""
    kwargs, _ = parse_spec(spec)
    if pattern != "unstructured" and "distribution" in kwargs:
        return False
    return not (kwargs.get("permute") and pattern == "unstructured")
