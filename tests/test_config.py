import math

import pytest

from sparse_deploy.config import SolverConfig, SparsitySpec
from sparse_deploy.errors import ConfigError, SparseDeployError


def test_pattern_is_parsed_into_typed_fields():
    spec = SparsitySpec.pattern(" 2:4 ")
    assert (spec.n, spec.m, spec.sparsity) == (2, 4, None)
    assert spec.is_nm and spec.target == 0.5 and str(spec) == "2:4"


@pytest.mark.parametrize("text", ["3:2", "4:4", "0:4", "2-4", "abc", "2:", ":4", "-1:4"])
def test_bad_patterns_raise_config_error(text):
    with pytest.raises(ConfigError) as info:
        SparsitySpec.pattern(text)
    assert isinstance(info.value, SparseDeployError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, math.nan, math.inf])
def test_sparsity_outside_unit_interval_is_rejected(value):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        SparsitySpec.unstructured(value)


def test_sparsity_and_pattern_together_are_rejected():
    with pytest.raises(ConfigError, match="not both"):
        SparsitySpec.from_options(0.5, "2:4")
    assert SparsitySpec.from_options(None, None).sparsity == 0.5
    assert SparsitySpec.from_options(0.7, None).target == 0.7


@pytest.mark.parametrize(
    "kwargs", [{"blocksize": 0}, {"percdamp": -1.0}, {"percdamp": math.nan}, {"device": "tpu"},
               {"sweep": "cython"}, {"row_chunk": 0}, {"damp_retries": -1}],
)
def test_solver_config_validates(kwargs):
    with pytest.raises(ConfigError):
        SolverConfig(**kwargs)


def test_configs_are_frozen():
    spec = SparsitySpec.unstructured(0.5)
    with pytest.raises(AttributeError):
        spec.sparsity = 0.6  # type: ignore[misc]
