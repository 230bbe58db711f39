"""torchrun + DDP (2 CPU ranks, gloo, each step's batch in 2 accumulated micro-batches) follows a single-process run
of the same global batch in one piece; only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_toy import main as toy_main
from training_toy import trained_adapter

from mmadapters.eval import train_cli

TESTS = Path(__file__).resolve().parent
# dropout off: the ranks' dropout masks cannot match a single process's; everything else is the real path
ARGS = ["--set", "trainer.steps=6", "--set", "trainer.batch_size=8", "--set", "trainer.eval_every=3",
        "--set", "trainer.checkpoint_every=2", "--set", "trainer.warmup_ratio=0.3", "--set", "trainer.lr=0.05",
        "--set", "recipe.dropout=0.0", "--set", "recipe.record_saves=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TESTS / "training_toy.py"), "--ddp-report", str(root), "--output", str(root / "ddp"), *ARGS,
                           "--set", "trainer.grad_accum_steps=2"],  # no_sync on the first micro-batch
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:  # keep the toy recipe out of the registry other tests see
        mp.setattr(train_cli, "RECIPES", dict(train_cli.RECIPES))
        assert toy_main(["--output", str(root / "single"), *ARGS]) == 0
    return root, proc


def test_two_ranks_match_one_process(runs):
    root, proc = runs
    for part in ("last", "best"):
        a, b = trained_adapter(root / "single" / part), trained_adapter(root / "ddp" / part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (part, k, (a[k] - b[k]).abs().max())
    assert any(t.abs().sum() > 0 for k, t in trained_adapter(root / "ddp" / "last").items() if "lora_B" in k)  # it trained
    single = json.loads((root / "single" / "train_summary.json").read_text())
    ddp = json.loads((root / "ddp" / "train_summary.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1 and ddp["best_step"] == single["best_step"]
    for a, b in zip(single["history"], ddp["history"], strict=True):
        assert a["step"] == b["step"] and a["metrics"]["mse"] == pytest.approx(b["metrics"]["mse"], abs=1e-6)
    losses = [[json.loads(line) for line in (root / run / "history.jsonl").read_text().splitlines()] for run in ("single", "ddp")]
    assert [e["step"] for e in losses[0]] == [e["step"] for e in losses[1]]  # logged once, not once per rank
    for a, b in zip(*losses, strict=True):
        if a["kind"] == "train":  # the global batch's mean loss, averaged over the ranks
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == pytest.approx(b["lr"])


def test_only_adapter_parameters_are_synchronized(runs):
    root, _ = runs
    for rank in (0, 1):
        report = json.loads((root / f"ddp.rank{rank}.json").read_text())
        assert report["type"] == "DistributedDataParallel" and not report["broadcast_buffers"]
        assert report["num_parameter_tensors"] == report["trainable_tensors"] < report["all_tensors"]
        assert report["total_parameter_size_bytes"] == report["trainable_bytes"]


def test_only_rank_0_writes(runs):
    root, proc = runs
    saves = (root / "ddp" / "save_calls.log").read_text().split("\n")
    assert [s for s in saves if s] == ["rank 0"] * 3  # best at step 3 and 6 (or fewer) + last
    assert sorted(p.name for p in (root / "ddp").iterdir()) == ["best", "config.yaml", "history.jsonl", "last",
                                                                 "save_calls.log", "train_state.pt", "train_summary.json"]
    assert proc.stdout.count("best validation") == 1  # the summary is printed by rank 0 only
    state = torch.load(root / "ddp" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG states are kept
