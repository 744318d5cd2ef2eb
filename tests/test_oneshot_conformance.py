"""Every one-shot configuration in the registry passes the same conformance checks."""
import pytest

from sparsetorch.oneshot.specs import CONFORMANCE_SPECS, NM_ONLY_SPECS, applies_to
from sparsetorch.testing import check_oneshot


@pytest.mark.parametrize("spec", CONFORMANCE_SPECS)
def test_unstructured(spec):
    check_oneshot(spec, sparsity=0.6)


NM = [s for s in CONFORMANCE_SPECS if applies_to(s, "2:4")] + list(NM_ONLY_SPECS)  # OWL is unstructured only


@pytest.mark.parametrize("spec", NM)
def test_two_four(spec):
    check_oneshot(spec, pattern="2:4")
