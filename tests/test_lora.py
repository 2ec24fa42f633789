"""LoRAConfig as a notebook builds it: fields out of range are refused, naming them."""

import numpy as np
import pytest

from o1jax.model import lora


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("targets", "q_proj", r"targets must be a tuple of projection names, got 'q_proj'"),
        ("rank", 2.0, r"rank must be a positive int, got 2.0"),  # a deep shape error in init
        ("rank", True, r"rank must be a positive int, got True"),
        ("alpha", float("nan"), r"alpha must be a finite number > 0, got nan"),  # NaN logits
        ("alpha", 0.0, r"alpha must be a finite number > 0, got 0.0"),  # no gradient
    ],
)
def test_config_fields_out_of_range_are_named(field, value, message):
    with pytest.raises(ValueError, match=r"LoRAConfig\." + message):
        lora.LoRAConfig(**{field: value})


def test_config_accepts_lists_and_numpy_scalars():
    config = lora.LoRAConfig(rank=np.int64(4), alpha=np.float32(8.0), targets=["q_proj"])
    assert config.scale == 2.0
