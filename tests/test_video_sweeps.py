"""scripts/run_tem_adapter.py and scripts/run_fineclipper.py: sweeps over `mmadapters train` / `mmadapters eval`
whose tables come from the results files the CLI wrote, and whose reruns reuse finished runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mmadapters.eval.results_schema import read_results
from mmadapters.vision.clip import tiny_clip_config, write_clip_dir

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    write_clip_dir(d, tiny_clip_config(embed_dim=16, image_size=32, width=32, layers=1))
    return d


def test_tem_adapter_sweep_tables_the_cli_results(clip_dir, tmp_path, capsys):
    from mmadapters.video.synth_traffic import generate_trafficqa

    data = generate_trafficqa(tmp_path / "qa", n=8, seed=0, size=32, num_frames=16, progress=False)
    argv = ["--out", str(tmp_path / "out"), "--data", str(data), "--model", f"local-dir:{clip_dir}", "--num-frames", "4",
            "--variants", "zeroshot,official-repeat", "--seeds", "0,1", "--epochs", "1", "--batch-size", "4",
            "--cache-dir", str(tmp_path / "cache")]
    sweep = script("run_tem_adapter")
    assert sweep.main(argv) == 0
    payload = json.loads((tmp_path / "out" / "tem_adapter_results.json").read_text())
    runs = payload["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [("zeroshot", 0), ("official-repeat", 0), ("official-repeat", 1)]
    for r in runs:  # each row is what `mmadapters eval videoqa` wrote
        assert read_results(r["results"])["metrics"] == r["metrics"]
    trained = json.loads((Path(runs[1]["run"]) / "train_summary.json").read_text())
    assert trained["config"]["recipe"]["official_repeat_pairing"] and not trained["config"]["recipe"]["official_unshifted_future"]
    assert trained["config"]["trainer"]["seed"] == 0 and runs[1]["parameters"]["trainable"] > 0
    assert sum("mmadapters train tem-adapter" in c for c in payload["commands"]) == 2
    summary = payload["summary"]["official-repeat"]
    assert summary["seeds"] == [0, 1] and summary["acc_runs"] == [r["metrics"]["acc"] for r in runs[1:]]
    assert "| official-repeat |" in (tmp_path / "out" / "tem_adapter_results.md").read_text()
    capsys.readouterr()
    assert sweep.main(argv) == 0  # a rerun reuses every run and results file
    assert "$ mmadapters" not in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "tem_adapter_results.json").read_text())["runs"][1]["metrics"] == runs[1]["metrics"]


def test_fineclipper_sweep_probe_and_cue_ablation(clip_dir, tmp_path):
    from mmadapters.video.synth_faces import generate_faces

    data = generate_faces(tmp_path / "faces", n=14, seed=0, size=32, num_frames=8, folds=2, videos=False, progress=False)
    out = tmp_path / "out"
    assert script("run_fineclipper").main(["--data", str(data), "--model", f"local-dir:{clip_dir}", "--num-frames", "3",
                                           "--epochs", "1", "--batch-size", "4", "--adapter-dim", "4", "--output", str(out),
                                           "--variants", "zeroshot,probe,middle"]) == 0
    rows = {r["key"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert rows["zeroshot"]["trainable_params"] == 0 and rows["probe"]["trainable_params"] == 16 * 7 + 7
    assert rows["middle"]["trainable_params"] > rows["probe"]["trainable_params"]
    for r in rows.values():
        results = read_results(r["results"])
        assert results["task"] == "dfer" and (results["metrics"]["uar"], results["metrics"]["war"]) == (r["uar"], r["war"])
    middle = json.loads((Path(rows["middle"]["run"]) / "train_summary.json").read_text())["config"]["recipe"]
    assert middle["cues"] == ["masks", "landmarks"] and not middle["linear_probe"]
    assert "CLIP linear probe" in (out / "results.md").read_text()
