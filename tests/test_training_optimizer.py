"""The engine's AdamW: no-weight-decay groups by parameter name, betas and eps from the trainer config."""

from __future__ import annotations

import pytest
import torch

from mmadapters.training.config_io import ConfigError, from_mapping
from mmadapters.training.trainer import _adamw
from mmadapters.training.trainer_config import TrainerConfig


def _named():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    return [(n, p) for n, p in m.named_parameters()]


def test_no_decay_patterns_form_a_group_without_weight_decay():
    cfg = TrainerConfig(weight_decay=0.1, no_decay=["*.bias", "1.*"], adam_betas=(0.9, 0.98), adam_eps=1e-6)
    opt = _adamw(_named(), cfg)
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and len(decayed["params"]) == 1  # 0.weight only
    assert exempt["weight_decay"] == 0.0 and len(exempt["params"]) == 3  # 0.bias, 1.weight, 1.bias
    assert decayed["betas"] == (0.9, 0.98) and decayed["eps"] == 1e-6


def test_without_patterns_one_group_as_before():
    opt = _adamw(_named(), TrainerConfig(weight_decay=0.1))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("field,value", [("adam_betas", [0.9, 1.0]), ("adam_eps", 0.0), ("no_decay", [""])])
def test_bad_optimizer_fields_are_named(field, value):
    with pytest.raises((ConfigError, ValueError), match=field):
        from_mapping(TrainerConfig, {field: value}, source="run.yaml", path="trainer")
