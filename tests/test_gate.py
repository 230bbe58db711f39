"""The few-shot task gate (16-shot linear probe minus zero-shot), its record in task.json, and --data-seed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmadapters.vision import gate, synth
from mmadapters.vision.readers import prepare_dataset_root, seeded_name

TINY = dict(train_per_class=2, val_per_class=1, test_per_class=1, image_size=16, progress=False)


def _features(seed: int, n: int, classes: int = 5, dim: int = 16, noise: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)), dim=-1)
    y = torch.arange(classes).repeat_interleave(n)
    return F.normalize(protos[y] + noise * torch.randn(len(y), dim, generator=g), dim=-1), y, protos


def test_probe_separates_what_the_prompts_miss():
    (xtr, ytr, protos), (xva, yva, _), (xte, yte, _) = (_features(s, n) for s, n in ((0, 16), (1, 4), (2, 10)))
    wrong = protos.roll(1, dims=0).T.contiguous()  # the prompts name every class as its neighbour
    g = gate.compute_gate(xtr, ytr, xva, yva, xte, yte, wrong)
    assert g["linear_probe_acc"] > 0.9 and g["zeroshot_acc"] < 0.1 and g["passed"] and g["shots"] == 16
    assert g["gap"] == pytest.approx(g["linear_probe_acc"] - g["zeroshot_acc"], abs=1e-6)
    right = gate.compute_gate(xtr, ytr, xva, yva, xte, yte, protos.T.contiguous())
    assert right["gap"] < gate.MIN_GAP and not right["passed"] and not gate.passed(right)
    assert gate.compute_gate(xtr, ytr, xva, yva, xte, yte, wrong) == g  # deterministic
    # a class with fewer than 16 train images caps the shots
    assert gate.compute_gate(xtr[::4], ytr[::4], xva, yva, xte, yte, wrong)["shots"] == 4


def test_gate_recorded_atomically_and_kept_by_regeneration(tmp_path):
    root = synth.generate_task("synth-novel", tmp_path / "t", **TINY)
    assert gate.read_gate(root) is None
    record = {"linear_probe_acc": 0.9, "zeroshot_acc": 0.1, "gap": 0.8, "passed": True}
    gate.write_gate(root, record)
    meta = json.loads((root / "task.json").read_text())
    assert meta["gate"] == record and meta["task"] == "synth-novel"
    before = (root / "test" / "circle" / "0000.png").stat().st_mtime_ns
    synth.generate_task("synth-novel", root, **TINY)  # up to date: nothing regenerated, the gate stays
    assert gate.read_gate(root) == record and (root / "test" / "circle" / "0000.png").stat().st_mtime_ns == before
    synth.generate_task("synth-novel", root, seed=5, **TINY)  # another draw: new images, no stale gate
    assert gate.read_gate(root) is None
    (root / "task.json").write_text("[1]")
    with pytest.raises(ValueError, match="task.json: expected a JSON object"):
        gate.write_gate(root, record)


def test_data_seed_draws_afresh_into_a_seeded_folder(tmp_path, capsys):
    assert seeded_name("synth-novel", None) == seeded_name("synth-novel", 0) == "synth-novel"
    assert seeded_name("synth-novel", 3) == "synth-novel_seed3"
    _, canonical = prepare_dataset_root("shapes-sketch", tmp_path / "a", tmp_path, progress=False)
    fmt, root = prepare_dataset_root("shapes-sketch", None, tmp_path, progress=False, data_seed=3)
    assert fmt == "imagefolder" and root == tmp_path / "datasets" / "shapes-sketch_seed3"
    assert json.loads((root / "task.json").read_text())["seed"] == 3
    assert (root / "test" / "star" / "0000.png").read_bytes() != (canonical / "test" / "star" / "0000.png").read_bytes()
    assert prepare_dataset_root("shapes-sketch", None, tmp_path, data_seed=3)[1] == root  # reused
    with pytest.raises(ValueError, match="field 'seed' is 0, expected --data-seed 4"):
        prepare_dataset_root("shapes-sketch", canonical, tmp_path, data_seed=4)
    with pytest.raises(ValueError, match="--data-seed applies to generated tasks only"):
        prepare_dataset_root("imagefolder", tmp_path, tmp_path, data_seed=1)


def test_fewshot_compare_data_seed_folder_and_flag_errors(tmp_path, monkeypatch, capsys):
    from mmadapters.eval.cli import main
    from mmadapters.eval.fewshot_compare import CompareConfig, task_root

    assert task_root(CompareConfig(data_seed=2), tmp_path, "synth-novel") == tmp_path / "datasets" / "synth-novel_seed2"
    sized = task_root(CompareConfig(data_seed=2, train_per_class=4), tmp_path, "synth-novel")
    assert sized.name.startswith("synth-novel_seed2_tr4")
    monkeypatch.chdir(tmp_path)
    for flag, value in (("--data-seed", "-1"), ("--views", "0")):
        argv = ["fewshot-compare", "--model", f"local-dir:{tmp_path / 'absent'}", "--cache-dir", str(tmp_path),
                "--task", "synth-novel", flag, value]
        assert main(argv) == 2
        assert f"{flag} {value}" in capsys.readouterr().err
