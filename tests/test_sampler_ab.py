"""benchmarks/sampler_ab.py: its variants are valid samplers, compared at the compute they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from maskvid.models.sampling import SamplingOptions

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks/sampler_ab.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sampler_ab", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_are_valid_and_paired_at_equal_forwards(bench):
    forwards = {}
    for name, overrides in bench.VARIANTS.items():
        options = SamplingOptions(**overrides)
        options.check()
        forwards[name] = options.forwards()
    assert forwards["maskgit_cosine_18_refine8"] == forwards["dnr_cosine_18_M2x4"] == 26
    assert forwards["maskgit_cosine_18_refine32"] == forwards["dnr_cosine_18_M4x8"] == 50
    assert forwards["dnr_cosine_16_boot2_M4x8"] == 50


def test_standard_error_is_the_binomial_one(bench):
    assert bench.standard_error(0.5, 64) == pytest.approx(0.0625)
    assert bench.standard_error(0.0, 10) == 0.0
