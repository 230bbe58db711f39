"""The training engine and ``mmadapters train`` under abuse (issue 17): two runs into one folder, a YAML alias bomb,
``--device cuda`` without CUDA, file modes under the umask, and the documented imports."""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_toy import ADAPTER, run_toy

import mmadapters as mma
from mmadapters.eval import train_cli
from mmadapters.training.checkpoint import LOCK_NAME, RunFolderBusy, run_lock
from mmadapters.training.config_io import ConfigError, apply_overrides, load_yaml

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "training_toy.py"


@pytest.fixture(autouse=True)
def toy_recipe(monkeypatch):
    monkeypatch.setattr(train_cli, "RECIPES", dict(train_cli.RECIPES))
    train_cli.register_recipe("toy", "training_toy:TOY_RECIPE")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mmadapters")
    train_cli.add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return args.func(args)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# -- two runs, one folder -----------------------------------------------------------------------------------------

def test_a_second_run_or_a_resume_into_a_folder_whose_run_is_alive_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--output", str(out), "--set", "trainer.steps=400", "--set", "trainer.eval_every=0", "--set",
            "trainer.checkpoint_every=1", "--set", "recipe.step_sleep=0.05"]
    first = subprocess.Popen([sys.executable, str(SCRIPT), *args], env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (out / "train_state.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        assert (out / LOCK_NAME).read_text().strip() == str(first.pid)
        config_before = (out / "config.yaml").read_text()
        # another config, fresh: before, it passed the guard while the first run had no train_state.pt yet and
        # then both wrote into the folder; now it is refused before it writes anything
        for extra in ([], ["--resume"], ["--set", "trainer.lr=0.5"]):
            capsys.readouterr()
            assert cli("toy", *args, *extra) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"mmadapters train: error: {out}: another training run (pid {first.pid}) is writing "
                                  "into this folder") and err.count("\n") == 1, err
        assert (out / "config.yaml").read_text() == config_before
        with pytest.raises(RunFolderBusy, match=f"pid {first.pid}"):  # the Python API is locked too
            run_toy(out, steps=2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the dead run's lock: its folder resumes (and the lock file goes with the run)
    from mmadapters.training.checkpoint import load_train_state

    assert (out / LOCK_NAME).exists()
    step = load_train_state(out / "train_state.pt")["step"]
    assert cli("toy", *args, "--set", f"trainer.steps={step + 2}", "--resume") == 0
    assert f"resumed from step {step}" in capsys.readouterr().out
    assert not (out / LOCK_NAME).exists()


def test_run_lock_is_reentrant_in_one_process_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "new"
    with run_lock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        with run_lock(out):  # mmadapters train holds it, then train() takes it again
            pass
        assert (out / LOCK_NAME).exists()
        code = f"from mmadapters.training.checkpoint import run_lock\nwith run_lock({str(out)!r}): pass\n"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert other.returncode == 1 and f"another training run (pid {os.getpid()})" in other.stderr
    assert not out.exists()  # a run that wrote nothing leaves no empty folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="the output must be a directory"):
        with run_lock(tmp_path / "file"):
            pass


# -- YAML alias bomb ----------------------------------------------------------------------------------------------

def _alias_bomb(levels: int = 9) -> str:
    """~2 KB of YAML whose aliases expand to 9**levels strings (a value the error message would print whole)."""
    text = 'output: out\ntrainer:\n  steps:\n  - &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for i in range(1, levels):
        text += f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text


def test_yaml_alias_bomb_is_refused_fast_naming_the_file(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    assert len(bomb.read_bytes()) < 2500
    t0 = time.perf_counter()
    assert cli("toy", "--config", str(bomb)) == 2  # before: MemoryError after 46 s
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert err == (f"mmadapters train: error: {bomb}: refused: its aliases expand to more than 100,000 values (an alias "
                   "bomb?); write the values out or use fewer nested aliases\n")
    assert not (tmp_path / "out").exists()
    (tmp_path / "loop.yaml").write_text("output: out\nrecipe:\n  tags: &a [x, *a]\n")
    with pytest.raises(ConfigError, match=r"loop.yaml: refused: an alias refers to a node that contains it \(line 3\)"):
        load_yaml(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match=r"--set 'recipe.tags=&a \[x, \*a\]': refused: an alias refers to a node"):
        apply_overrides({}, ["recipe.tags=&a [x, *a]"])
    # ordinary anchors, aliases and merge keys still work
    (tmp_path / "ok.yaml").write_text("output: o\ntrainer: &t {steps: 3}\nrecipe:\n  tags: &x [a, b]\n  scales: {a: 1.0}\n"
                                      "extra: {<<: *t, lr: 0.1, more: *x}\n")
    assert load_yaml(tmp_path / "ok.yaml")["extra"] == {"steps": 3, "lr": 0.1, "more": ["a", "b"]}


# -- --device cuda without CUDA ------------------------------------------------------------------------------------

def test_device_cuda_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = tmp_path / "run.yaml"
    config.write_text(f"output: {tmp_path / 'out'}\ntrainer: {{steps: 2}}\n")
    assert cli("toy", "--config", str(config), "--device", "cuda") == 2
    assert capsys.readouterr().err == ("mmadapters train: error: --device cuda: CUDA is not available on this machine "
                                       "(use cpu)\n")
    assert cli("toy", "--config", str(config), "--set", "trainer.device=cuda:1") == 2
    assert capsys.readouterr().err == ("mmadapters train: error: --set trainer.device=cuda:1: CUDA is not available on this "
                                       "machine (use cpu)\n")
    config.write_text(f"output: {tmp_path / 'out'}\ntrainer: {{steps: 2, device: cuda}}\n")
    assert cli("toy", "--config", str(config)) == 2
    assert capsys.readouterr().err == (f"mmadapters train: error: {config}: trainer.device cuda: CUDA is not available on "
                                       "this machine (use cpu)\n")
    assert not (tmp_path / "out").exists()  # refused before anything was written

    from mmadapters.eval.cli import main

    wav = tmp_path / "a.wav"
    wav.write_bytes(b"")
    assert main(["asr", "transcribe", str(wav), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("mmadapters asr transcribe: error: --device cuda: CUDA is not available on this "
                                       "machine (use cpu)\n")


# -- file modes ---------------------------------------------------------------------------------------------------

class _NestedSave:
    """The toy's task, saving the way the recipes do: save_adapters (one mkdtemp'd subfolder per adapter) + a file."""

    def __init__(self, task):
        self.__dict__["_task"] = task

    def __getattr__(self, name):
        return getattr(self._task, name)

    def save(self, directory):
        mma.save_adapters(self._task.model, Path(directory) / "adapters", [ADAPTER])
        (Path(directory) / "extra.json").write_text("{}")


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_file_and_folder_of_a_run_honours_the_umask(tmp_path, mask):
    from training_toy import ToyConfig, build_toy_task

    from mmadapters.training.trainer import TrainerConfig, seed_everything, train

    old = os.umask(mask)
    try:
        config = TrainerConfig(steps=4, batch_size=8, eval_every=2, checkpoint_every=2, progress=False)
        seed_everything(0, 0)
        train(_NestedSave(build_toy_task(ToyConfig(), config)), config, tmp_path / "run")
        assert cli("toy", "--output", str(tmp_path / "cli"), "--set", "trainer.steps=2") == 0
    finally:
        os.umask(old)
    seen = 0
    for root in (tmp_path / "run", tmp_path / "cli"):
        for path in [root, *root.rglob("*")]:
            expected = (0o777 if path.is_dir() else 0o666) & ~mask
            assert stat.S_IMODE(path.stat().st_mode) == expected, (str(path), oct(path.stat().st_mode), oct(expected))
            seen += 1
    names = {p.name for p in (tmp_path / "run").rglob("*")}
    assert {"best", "last", "adapters", ADAPTER, "train_state.pt", "history.jsonl", "train_summary.json",
            "train_best.json", "extra.json", "adapter_model.safetensors"} <= names
    assert (tmp_path / "cli" / "config.yaml").is_file() and seen > 20


# -- documented imports -------------------------------------------------------------------------------------------

def test_documented_imports():
    code = ("import sys\n"
            "from mmadapters.training import TrainerConfig, Recipe, RunConfig, ConfigError, build_run_config, load_yaml\n"
            "assert 'torch' not in sys.modules, 'the torch-free names imported torch'\n"
            "from mmadapters.training import train, TrainTask, TrainSummary, StepSampler, seed_everything\n"
            "import mmadapters.training as t\n"
            "from mmadapters.training.trainer import train as train2, TrainerConfig as T2\n"
            "assert train is train2 and TrainerConfig is T2 and set(t.__all__) <= set(dir(t))\n"
            "print(TrainerConfig(steps=3).steps)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "3\n", proc.stderr
    readme = (TESTS.parent / "README.md").read_text()
    assert "mmadapters.training.TrainerConfig" in readme  # the name the README documents is the one tested here
    import mmadapters.training as training

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        training.nope  # noqa: B018
    assert json.dumps(sorted(training.__all__))
