"""kill -9 + ``mmadapters train <recipe> --resume`` reaches the uninterrupted run's files bit for bit, for the video
recipes' example configs (configs/fineclipper.yaml, configs/tem-adapter.yaml) shrunk by ``--set`` to seconds.

Each recipe trains once straight through and once in a process killed with SIGKILL from outside after a checkpoint
(at whatever point of a later step it happens to be), then resumed. Every file of ``best/`` and ``last/`` and the
history must be byte-identical to the straight run's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmadapters.training.checkpoint import load_train_state

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
KILL_AFTER = 4  # the run is killed once its train_state.pt holds this step (or a later one)
CLI = "import sys; from mmadapters.eval.cli import main; sys.exit(main(sys.argv[1:]))"  # `mmadapters`
# both configs shrunk: few steps, a checkpoint every step (a kill anywhere loses at most one), evaluations that pick
# a best/ before and after the kill
SHRINK = ["--set", f"trainer.steps={STEPS}", "--set", "trainer.checkpoint_every=1", "--set", "trainer.eval_every=3",
          "--set", "trainer.log_every=1", "--set", "trainer.progress=false", "--set", "trainer.batch_size=4"]


@pytest.fixture(scope="module")
def faces_root(tmp_path_factory) -> Path:
    from mmadapters.video.synth_faces import generate_faces

    return generate_faces(tmp_path_factory.mktemp("faces"), n=28, seed=0, size=32, num_frames=8, folds=2, videos=False,
                          progress=False)


@pytest.fixture(scope="module")
def qa_root(tmp_path_factory) -> Path:
    from mmadapters.video.synth_traffic import generate_trafficqa

    return generate_trafficqa(tmp_path_factory.mktemp("qa"), n=10, seed=0, size=32, num_frames=16, progress=False)


def _command(recipe: str, output: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-c", CLI, "train", recipe, "--config", str(REPO / "configs" / f"{recipe}.yaml"),
            "--output", str(output), *SHRINK, *overrides]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _state_step(path: Path) -> int:
    try:
        return int(load_train_state(path)["step"])
    except (FileNotFoundError, ValueError, RuntimeError, OSError, EOFError):
        return 0  # not written yet


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _kill_and_resume_matches_straight_run(recipe: str, overrides: list[str], tmp_path: Path) -> None:
    straight = subprocess.run(_command(recipe, tmp_path / "straight", overrides), env=_env(), capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(recipe, killed, overrides), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _state_step(killed / "train_state.pt") < KILL_AFTER and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = _state_step(killed / "train_state.pt")
    assert KILL_AFTER <= stopped_at < STEPS and not (killed / "train_summary.json").exists()

    resumed = subprocess.run(_command(recipe, killed, [*overrides, "--resume"]), env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {stopped_at}" in resumed.stdout
    for part in ("best", "last"):
        want, got = _files(tmp_path / "straight" / part), _files(killed / part)
        assert want.keys() == got.keys(), part
        differ = [name for name in want if want[name] != got[name]]
        assert not differ, f"{part}/: {differ} differ from the uninterrupted run's (killed after step {stopped_at})"
    assert (killed / "history.jsonl").read_bytes() == (tmp_path / "straight" / "history.jsonl").read_bytes()


def test_fineclipper_resume_after_kill_9_is_bit_identical(faces_root, tmp_path):
    """With every cue (descriptions included: their text features once depended on which clips shared a batch)."""
    overrides = ["--set", f"recipe.data_dir={faces_root}", "--set", "recipe.num_frames=3",
                 "--set", "recipe.cues=[masks,landmarks,description]"]
    _kill_and_resume_matches_straight_run("fineclipper", overrides, tmp_path)


def test_tem_adapter_resume_after_kill_9_is_bit_identical(qa_root, tmp_path):
    overrides = ["--set", f"recipe.train_annotations={qa_root / 'annotations' / 'R2_train.jsonl'}",
                 "--set", f"recipe.video_root={qa_root / 'videos'}", "--set", "recipe.num_frames=4",
                 "--set", f"recipe.cache_dir={tmp_path / 'cache'}"]
    _kill_and_resume_matches_straight_run("tem-adapter", overrides, tmp_path)
