"""Resuming training: after kill -9 the run reaches bit-identical adapters; mismatched resumes are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_toy import run_toy, trained_adapter

from mmadapters.training.checkpoint import load_train_state

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS / "training_toy.py"
# dropout (RNG restore matters), warmup + cosine (scheduler restore matters), grad clipping, checkpoints every step
ARGS = ["--set", "trainer.steps=24", "--set", "trainer.warmup_ratio=0.2", "--set", "trainer.schedule=cosine",
        "--set", "trainer.eval_every=4", "--set", "trainer.checkpoint_every=1", "--set", "trainer.grad_clip=0.5",
        "--set", "trainer.weight_decay=0.01", "--set", "recipe.dropout=0.2"]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _run(output: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--output", str(output), *ARGS, *extra], env=_env(),
                          capture_output=True, text=True, timeout=120)


def _logged_step(history: Path) -> int:
    try:
        lines = history.read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


def test_resume_after_kill_9_is_bit_identical(tmp_path):
    ref = _run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--output", str(killed), *ARGS, "--set", "recipe.step_sleep=0.05"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while _logged_step(killed / "history.jsonl") < 9 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "train_summary.json").exists()
    stopped_at = load_train_state(killed / "train_state.pt")["step"]
    assert 8 <= stopped_at < 24

    resumed = _run(killed, "--set", "recipe.step_sleep=0.05", "--set", "trainer.progress=true", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped_at}" in resumed.stdout
    for part in ("last", "best"):
        a, b = trained_adapter(tmp_path / "ref" / part), trained_adapter(killed / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    ref_history = (tmp_path / "ref" / "history.jsonl").read_text()
    assert (killed / "history.jsonl").read_text() == ref_history  # nothing logged twice, nothing lost
    ref_summary = json.loads((tmp_path / "ref" / "train_summary.json").read_text())
    summary = json.loads((killed / "train_summary.json").read_text())
    assert summary["best_step"] == ref_summary["best_step"] and summary["best_metrics"] == ref_summary["best_metrics"]
    assert summary["resumed_from"] == stopped_at
    assert not [p.name for p in killed.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_resume_extends_a_finished_run(tmp_path):
    """10 steps, then --resume with steps=20 gives the 20-step run (constant schedule: the lr does not depend on steps)."""
    over = {"schedule": "constant", "recipe": {"dropout": 0.1}, "eval_every": 5, "checkpoint_every": 3}
    _, full = run_toy(tmp_path / "full", steps=20, **over)
    run_toy(tmp_path / "part", steps=10, **over)
    _, resumed = run_toy(tmp_path / "part", steps=20, resume=True, **over)
    a, b = trained_adapter(full.last_dir), trained_adapter(resumed.last_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.resumed_from == 10 and resumed.history == full.history
    _, again = run_toy(tmp_path / "part", steps=20, resume=True, **over)  # already finished: nothing to redo
    assert again.resumed_from == 20 and again.history == full.history
    with pytest.raises(ValueError, match="the state is at step 20, beyond trainer.steps=5"):
        run_toy(tmp_path / "part", steps=5, resume=True, **over)


def test_resume_refuses_other_config_or_parameters(tmp_path):
    run_toy(tmp_path, steps=4)
    with pytest.raises(ValueError, match=r"another config \(trainer.lr: 0.01 there, 0.02 here\); only trainer.steps"):
        run_toy(tmp_path, steps=8, resume=True, lr=0.02)
    with pytest.raises(ValueError, match=r"the trainable parameters differ .*is \[4, 6, 'float32'\] there, \[2, 6, 'float32'\] here"):
        run_toy(tmp_path, steps=8, resume=True, recipe={"rank": 2})
    run_toy(tmp_path, steps=8, resume=True, eval_every=2, log_every=3, checkpoint_every=1, progress=True)  # allowed changes


def test_output_guard(tmp_path):
    run_toy(tmp_path / "a", steps=2)
    with pytest.raises(FileExistsError, match="pass --resume to continue it, or choose another --output"):
        run_toy(tmp_path / "a", steps=2)
    with pytest.raises(FileNotFoundError, match=r"b/train_state.pt: --resume needs the training state"):
        run_toy(tmp_path / "b", steps=2, resume=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="c/train_state.pt: not a readable training state"):
        run_toy(tmp_path / "c", steps=2, resume=True)


def test_state_loads_weights_only(tmp_path):
    run_toy(tmp_path, steps=3, checkpoint_every=1)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == 3 and set(state["rng"][0]) >= {"python", "numpy", "torch"}
    assert all(isinstance(v, torch.Tensor) for v in state["params"].values())
    assert set(state["params"]) == set(state["param_shapes"])
