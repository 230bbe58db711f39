"""Typed YAML configs: parsing, error messages (file + dotted path + expectation), overrides, fuzzing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmadapters.training.config_io import ConfigError, apply_overrides, dump_yaml, from_mapping, load_yaml, parse_yaml_text
from mmadapters.training.recipe import Recipe, build_run_config
from mmadapters.training.trainer_config import TrainerConfig


@dataclass
class Inner:
    size: int
    name: str = "x"


@dataclass
class Outer:
    inner: Inner
    rate: float = 0.1
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    maybe: int | None = None
    names: list[str] = field(default_factory=list)
    pair: tuple[int, float] = (0, 0.0)
    many: tuple[int, ...] = ()
    table: dict[str, float] = field(default_factory=dict)
    inners: list[Inner] = field(default_factory=list)
    either: list[str] | str | None = None
    path: Path | None = None
    anything: Any = None

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"rate: expected >= 0, got {self.rate}")


def test_nested_types_parse():
    cfg = from_mapping(Outer, {"inner": {"size": 3}, "rate": "3e-4", "flag": True, "mode": "b", "maybe": 4,
                               "names": ["p", "q"], "pair": [1, 2], "many": [1, 2, 3], "table": {"k": 1},
                               "inners": [{"size": 1, "name": "n"}], "either": "one", "path": "a/b",
                               "anything": {"free": [1]}}, source="f.yaml")
    assert cfg.inner == Inner(3) and cfg.rate == 3e-4 and cfg.flag and cfg.mode == "b" and cfg.maybe == 4
    assert cfg.pair == (1, 2.0) and isinstance(cfg.pair[1], float) and cfg.many == (1, 2, 3)
    assert cfg.table == {"k": 1.0} and cfg.inners == [Inner(1, "n")] and cfg.either == "one"
    assert cfg.path == Path("a/b") and cfg.anything == {"free": [1]}
    assert from_mapping(Outer, {"inner": {"size": 1}, "either": ["a"]}, source="f").either == ["a"]
    assert from_mapping(Outer, {"inner": {"size": 1}, "rate": 2}, source="f").rate == 2.0  # an int is a float


@pytest.mark.parametrize("data, needle", [
    ({"inner": {"size": 1, "sise": 2}}, "f.yaml: inner.sise: unknown key (expected one of: name, size); did you mean 'size'?"),
    ({"inner": {}}, "f.yaml: inner.size: missing required field (expected int)"),
    ({}, "f.yaml: inner: missing required field (expected Inner)"),
    ({"inner": {"size": True}}, "f.yaml: inner.size: expected an integer, got True (bool)"),
    ({"inner": {"size": 1.5}}, "f.yaml: inner.size: expected an integer, got 1.5 (float)"),
    ({"inner": {"size": 1}, "flag": 1}, "f.yaml: flag: expected true or false, got 1 (int)"),
    ({"inner": {"size": 1}, "rate": "fast"}, "f.yaml: rate: expected a number, got 'fast' (str)"),
    ({"inner": {"size": 1}, "mode": "c"}, "f.yaml: mode: expected one of 'a', 'b'; got 'c'"),
    ({"inner": {"size": 1}, "names": "p"}, "f.yaml: names: expected a list (list[str]), got 'p' (str)"),
    ({"inner": {"size": 1}, "names": ["p", 3]}, "f.yaml: names[1]: expected a string, got 3 (int)"),
    ({"inner": {"size": 1}, "pair": [1]}, "f.yaml: pair: expected a list of 2 items (tuple[int, float]), got 1"),
    ({"inner": {"size": 1}, "table": {"k": "v"}}, "f.yaml: table.k: expected a number, got 'v' (str)"),
    ({"inner": {"size": 1}, "inners": [{"size": 1}, {"size": "2"}]}, "f.yaml: inners[1].size: expected an integer"),
    ({"inner": {"size": 1}, "either": 3}, "f.yaml: either: expected list[str] | str | null, got 3 (int)"),
    ({"inner": {"size": 1}, "rate": -1}, "f.yaml: rate: expected >= 0, got -1.0"),  # __post_init__
    ({"inner": [1]}, "f.yaml: inner: expected a mapping of Inner fields at this section, got [1] (list)"),
    ({1: 2}, "f.yaml: keys must be strings, got 1 (int)"),
])
def test_errors_name_file_path_and_expectation(data, needle):
    with pytest.raises(ConfigError) as err:
        from_mapping(Outer, data, source="f.yaml")
    assert needle in str(err.value)


def test_top_level_must_be_a_mapping(tmp_path):
    (tmp_path / "l.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"l.yaml: expected a mapping .* at the top level, got list"):
        load_yaml(tmp_path / "l.yaml")
    with pytest.raises(ConfigError, match="at the top level"):
        from_mapping(Inner, [1], source="s")
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert load_yaml(tmp_path / "empty.yaml") == {}
    with pytest.raises(FileNotFoundError, match="nope.yaml: config file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_yaml_syntax_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  steps: 10\n  lr: [1, 2\nrecipe: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: YAML syntax error"):
        load_yaml(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("trainer:\n  steps: 10\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:3:\d+: YAML syntax error: duplicate key 'steps' \(first at line 2\)"):
        load_yaml(dup)
    tab = tmp_path / "tab.yaml"
    tab.write_text("trainer:\n\tsteps: 1\n")
    with pytest.raises(ConfigError, match=r"tab\.yaml:2:\d+"):
        load_yaml(tab)


def test_overrides():
    data = {"trainer": {"steps": 5}, "recipe": {"variant": "a"}}
    out = apply_overrides(data, ["trainer.steps=10", "recipe.variant=lora", "trainer.lr=3e-4", "new.deep.key=[1, 2]",
                                 "trainer.grad_clip=null", "output=runs/x"])
    assert out == {"trainer": {"steps": 10, "lr": "3e-4", "grad_clip": None}, "recipe": {"variant": "lora"},
                   "new": {"deep": {"key": [1, 2]}}, "output": "runs/x"}
    assert data == {"trainer": {"steps": 5}, "recipe": {"variant": "a"}}  # not mutated
    assert from_mapping(TrainerConfig, out["trainer"], source="--set").lr == 3e-4
    for bad in ["trainer.steps", "=3", "trainer..steps=1", ".x=1"]:
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            apply_overrides(data, [bad])
    with pytest.raises(ConfigError, match="trainer.steps is 5, not a section"):
        apply_overrides(data, ["trainer.steps.x=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides(data, ["trainer.lr=[1"])


def test_dump_yaml_round_trip(tmp_path):
    cfg = from_mapping(Outer, {"inner": {"size": 2}, "pair": [1, 2.5], "path": "p", "table": {"a": 1.0}}, source="s")
    dump_yaml(cfg, tmp_path / "sub" / "c.yaml")
    assert from_mapping(Outer, load_yaml(tmp_path / "sub" / "c.yaml"), source="c.yaml") == cfg
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")]  # no temp files left


def test_trainer_config_ranges():
    for key, value, expected in [("steps", -1, "trainer.steps: expected an integer >= 0"),
                                 ("batch_size", 0, "trainer.batch_size: expected an integer >= 1"),
                                 ("warmup_ratio", 1.5, "trainer.warmup_ratio: expected a number in [0, 1]"),
                                 ("grad_clip", 0, "trainer.grad_clip: expected a positive number or null"),
                                 ("lr", ".inf", "trainer.lr: expected a finite number"),
                                 ("schedule", "weekly", "trainer.schedule: expected one of 'constant', 'linear', 'cosine', 'step'"),
                                 ("schedule", "step", "trainer.step_every: expected an integer >= 1 with schedule: step"),
                                 ("step_every", 0, "trainer.step_every: expected an integer >= 1 or null"),
                                 ("step_gamma", 0, "trainer.step_gamma: expected a number in (0, 1]"),
                                 ("step_gamma", 1.5, "trainer.step_gamma: expected a number in (0, 1]"),
                                 ("grad_accum_steps", 0, "trainer.grad_accum_steps: expected an integer >= 1"),
                                 ("precision", "fp8", "trainer.precision: expected one of 'fp32', 'bf16', 'fp16'"),
                                 ("select_mode", "best", "trainer.select_mode: expected one of 'max', 'min'")]:
        value = yaml.safe_load(value) if isinstance(value, str) and value.startswith(".") else value
        with pytest.raises(ConfigError) as err:
            from_mapping(TrainerConfig, {key: value}, source="run.yaml", path="trainer")
        # the file, then the field's dotted path, once
        assert str(err.value).startswith("run.yaml: trainer.") and expected in str(err.value), str(err.value)
        assert "trainer: trainer." not in str(err.value)


@dataclass
class RecipeCfg:
    width: int = 4


RECIPE = Recipe(name="r", config_class=RecipeCfg, build_task=lambda c, t: None, trainer_defaults={"lr": 0.5, "steps": 7})


def test_build_run_config_defaults_and_errors():
    run = build_run_config(RECIPE, {"output": "o", "trainer": {"steps": 3}}, source="f.yaml")
    assert (run.trainer.lr, run.trainer.steps, run.recipe) == (0.5, 3, RecipeCfg())  # recipe default under file value
    run = build_run_config(RECIPE, {"trainer": {"device": "cpu"}}, source="f.yaml", output="cli-out", device="cuda")
    assert run.output == "cli-out" and run.trainer.device == "cuda"
    with pytest.raises(ConfigError, match=r"f.yaml: output: missing"):
        build_run_config(RECIPE, {}, source="f.yaml")
    with pytest.raises(ConfigError, match=r"f.yaml: traner: unknown key \(expected one of: output, trainer, recipe\)"):
        build_run_config(RECIPE, {"output": "o", "traner": {}}, source="f.yaml")
    with pytest.raises(ConfigError, match=r"f.yaml: recipe.wdth: unknown key \(expected one of: width\)"):
        build_run_config(RECIPE, {"output": "o", "recipe": {"wdth": 1}}, source="f.yaml")
    with pytest.raises(TypeError, match="unknown TrainerConfig field"):
        Recipe(name="bad", config_class=RecipeCfg, build_task=lambda c, t: None, trainer_defaults={"stepz": 1})


# -- fuzzing: arbitrary data and text never raise anything but ConfigError ------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | \
    st.sampled_from(["a", "b", "3e-4", "1", "inner", "size", "steps", "lr", "mode", "nan"])
keys = st.sampled_from(["inner", "size", "name", "rate", "flag", "mode", "maybe", "names", "pair", "many", "table",
                        "inners", "either", "path", "anything", "steps", "lr", "schedule", "grad_clip", "x"]) | st.integers()
data = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
                    max_leaves=25)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=data, target=st.sampled_from([Outer, Inner, TrainerConfig]))
def test_fuzz_from_mapping_only_raises_config_error(data, target):
    try:
        out = from_mapping(target, data, source="fuzz.yaml", path="p")
    except ConfigError as err:
        assert str(err).startswith("fuzz.yaml")
    else:
        assert isinstance(out, target)


yaml_text = st.lists(st.sampled_from(list("abc:{}[]-,.#!&*|>'\"\n\t 019e+") + ["steps: ", "  ", "!!python/object:x",
                                                                                    "2001-02-31", "1" * 30, "? "]),
                     max_size=40).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=yaml_text | st.text(max_size=40))
def test_fuzz_yaml_text_only_raises_config_error(text):
    try:
        loaded = parse_yaml_text(text, "fuzz.yaml")
    except ConfigError as err:
        assert str(err).startswith("fuzz.yaml")
        return
    assert isinstance(loaded, dict)
    try:
        from_mapping(TrainerConfig, loaded, source="fuzz.yaml")
    except ConfigError:
        pass


def test_nan_and_inf_floats_parse():
    cfg = from_mapping(Outer, {"inner": {"size": 1}, "rate": "inf"}, source="s")
    assert math.isinf(cfg.rate)
