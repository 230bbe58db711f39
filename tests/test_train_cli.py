"""``mmadapters train``: the parser, the recipe registry, a toy recipe end to end, and errors (exit code 2)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import yaml

from mmadapters.eval import train_cli
from mmadapters.training.config_io import load_yaml


@pytest.fixture(autouse=True)
def toy_recipe(monkeypatch):
    monkeypatch.setattr(train_cli, "RECIPES", dict(train_cli.RECIPES))
    train_cli.register_recipe("toy", "training_toy:TOY_RECIPE")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mmadapters")
    train_cli.add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return args.func(args)


def write_config(path, **sections) -> str:
    data = {"trainer": {"steps": 6, "eval_every": 3}, "recipe": {"n_train": 32}, **sections}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_list(capsys):
    assert cli("--list") == 0
    out = capsys.readouterr().out
    assert "toy: LoRA on a frozen MLP regressor" in out and "(training_toy:TOY_RECIPE)" in out
    for name in ("tip-adapter", "caps-adapter", "vl-adapter", "tem-adapter", "fineclipper", "lda"):
        assert name in out  # listed even while a recipe's module is unavailable


def test_end_to_end(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", output=str(tmp_path / "from-file"))
    out_dir = tmp_path / "run"
    assert cli("toy", "--config", config, "--set", "trainer.lr=3e-3", "--output", str(out_dir), "--device", "cpu") == 0
    out = capsys.readouterr().out
    summary = json.loads((out_dir / "train_summary.json").read_text())
    assert f"best validation mse (min) at step {summary['best_step']}" in out and f"best adapters: {out_dir}/best" in out
    assert not (tmp_path / "from-file").exists()  # --output wins
    written = load_yaml(out_dir / "config.yaml")
    assert written["output"] == str(out_dir) and written["trainer"]["lr"] == 3e-3 and written["trainer"]["steps"] == 6
    assert written["trainer"]["batch_size"] == 8  # the recipe's trainer_defaults under the file's values
    assert written["recipe"]["n_train"] == 32 and summary["config"]["recipe"]["n_train"] == 32
    # the written config.yaml is a complete config: it reruns (resumes) as is
    assert cli("toy", "--config", str(out_dir / "config.yaml"), "--resume") == 0
    assert "resumed from step 6" in capsys.readouterr().out


def test_rerun_without_resume_is_refused_and_leaves_the_run_alone(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", output=str(tmp_path / "run"))
    assert cli("toy", "--config", config) == 0
    before = (tmp_path / "run" / "config.yaml").read_text()
    capsys.readouterr()
    assert cli("toy", "--config", config, "--set", "trainer.lr=0.5") == 2
    err = capsys.readouterr().err
    assert err.startswith("mmadapters train: error: ") and "pass --resume to continue it, or choose another --output" in err
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    assert cli("toy", "--config", config, "--set", "trainer.lr=0.5", "--resume") == 2
    assert "trainer.lr: 0.01 there, 0.5 here" in capsys.readouterr().err
    assert (tmp_path / "run" / "config.yaml").read_text() == before


@pytest.mark.parametrize("args, needle", [
    (["nope"], "unknown recipe 'nope'; known recipes: {known}"),
    ([], "a recipe name is required"),
    (["toy", "--config", "{tmp}/missing.yaml"], "missing.yaml: config file not found"),
    (["toy", "--config", "{tmp}/bad.yaml"], "bad.yaml:4:1: YAML syntax error: while parsing a flow sequence (line 3, column 10)"),
    # a bad --set is blamed on the --set, not on the file
    (["toy", "--config", "{tmp}/run.yaml", "--set", "recipe.bogus=1"],
     "error: --set recipe.bogus=1: recipe.bogus: unknown key (expected one of: "),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "recipe.rnak=2"], "--set recipe.rnak=2: recipe.rnak: unknown key (expected one of: "),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "recipe.rnak=2"], "did you mean 'rank'?"),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "recipe.rank=many"],
     "error: --set recipe.rank=many: recipe.rank: expected an integer, got 'many'"),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "optimizer.lr=1"],
     "error: --set optimizer.lr=1: optimizer: unknown key (expected one of: output, trainer, recipe)"),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "trainer=5"], "error: --set trainer=5: trainer: expected a mapping"),
    (["toy", "--config", "{tmp}/unknown.yaml", "--set", "recipe.rank=2"], "unknown.yaml: recipe.widht: unknown key"),
    (["toy", "--config", "{tmp}/unknown.yaml"], "unknown.yaml: recipe.widht: unknown key"),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "trainer.steps=-1"],
     "error: --set trainer.steps=-1: trainer.steps: expected an integer >= 0"),
    (["toy", "--config", "{tmp}/steps.yaml"], "steps.yaml: trainer.steps: expected an integer >= 0"),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "trainer.schedule=weekly"],
     "error: --set trainer.schedule=weekly: trainer.schedule: expected one of 'constant', 'linear', 'cosine', 'step'"),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "trainer.schedule=step"],
     "run.yaml: trainer.step_every: expected an integer >= 1 with schedule: step"),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "trainer.steps"], "--set 'trainer.steps': expected KEY=VALUE"),
    (["toy", "--config", "{tmp}/noout.yaml"], "noout.yaml: output: missing"),
    (["toy", "--config", "{tmp}/run.yaml", "--resume"], "--resume needs the training state of an earlier run"),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "recipe.n_train=0"], "the training set is empty"),
    (["toy", "--config", "{tmp}/run.yaml", "--set", "trainer.batch_size=7", "--set", "trainer.select_metric=acc"],
     "returned no 'acc'"),
])
def test_errors_exit_2(tmp_path, capsys, args, needle):
    write_config(tmp_path / "run.yaml", output=str(tmp_path / "out"))
    write_config(tmp_path / "noout.yaml")
    write_config(tmp_path / "unknown.yaml", output=str(tmp_path / "out"), recipe={"widht": 3})
    write_config(tmp_path / "steps.yaml", output=str(tmp_path / "out"), trainer={"steps": -1})
    (tmp_path / "bad.yaml").write_text("output: x\ntrainer:\n  steps: [1\n")
    assert cli(*[a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    needle = needle.replace("{known}", ", ".join(sorted(train_cli.RECIPES)))  # toy among the shipped ones
    assert err.startswith("mmadapters train: error: ") and needle in err, err
    assert err.count("\n") == 1  # one line


def test_nan_loss_exit_1(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", output=str(tmp_path / "out"))
    assert cli("toy", "--config", config, "--set", "recipe.nan_at_call=2") == 1
    assert "step 2: the training loss is nan" in capsys.readouterr().err


def test_parser_is_torch_free():
    code = ("import argparse, sys\n"
            "from mmadapters.eval import train_cli\n"
            "p = argparse.ArgumentParser(); train_cli.add_train_parser(p.add_subparsers())\n"
            "p.parse_args(['train', 'toy', '--set', 'a=1', '--set', 'b=2'])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
