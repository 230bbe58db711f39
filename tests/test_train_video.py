"""`mmadapters train tem-adapter` and `mmadapters train fineclipper` end to end on tiny generated data.

Each run trains a few steps through the command line, then the saved best/ is loaded with the recipe's
loader and must give the validation score the run recorded for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mmadapters.vision.clip import tiny_clip_config, write_clip_dir


def train_main(argv: list[str]) -> int:
    """``mmadapters train ...`` (through the top-level CLI once it has the subcommand)."""
    from mmadapters.eval import cli

    if "train" in cli.build_parser()._subparsers._group_actions[0].choices:  # noqa: SLF001
        return cli.main(["train", *argv])
    from mmadapters.eval.train_cli import main

    return main(argv)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    write_clip_dir(d, tiny_clip_config(embed_dim=16, image_size=32, width=32, layers=1))
    return d


@pytest.fixture(scope="module")
def qa_root(tmp_path_factory) -> Path:
    from mmadapters.video.synth_traffic import generate_trafficqa

    return generate_trafficqa(tmp_path_factory.mktemp("qa"), n=8, seed=0, size=32, num_frames=16, progress=False)


@pytest.fixture(scope="module")
def faces_root(tmp_path_factory) -> Path:
    from mmadapters.video.synth_faces import generate_faces

    return generate_faces(tmp_path_factory.mktemp("faces"), n=28, seed=0, size=32, num_frames=8, folds=2, videos=False,
                          progress=False)


def write_config(path: Path, output: Path, trainer: dict, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump({"output": str(output), "trainer": {"progress": False, "seed": 0, **trainer},
                                    "recipe": recipe}))
    return path


def tem_recipe(qa_root: Path, clip_dir: Path, tmp_path: Path, **over) -> dict:
    return {"train_annotations": str(qa_root / "annotations" / "R2_train.jsonl"), "video_root": str(qa_root / "videos"),
            "model": f"local-dir:{clip_dir}", "num_frames": 4, "cache_dir": str(tmp_path / "cache"), **over}


def test_hold_out_videos_keeps_each_video_on_one_side():
    from mmadapters.video.tem_train import hold_out_videos

    names = ["a", "a", "b", "c", "c", "c", "d", "e"]
    train, val = hold_out_videos(names, 0.4, seed=0)
    assert sorted(train + val) == list(range(len(names)))
    assert not {names[i] for i in train} & {names[i] for i in val}
    assert len({names[i] for i in val}) == 2  # ceil(0.4 * 5 videos)
    assert hold_out_videos(names, 0.4, seed=0) == (train, val)
    with pytest.raises(ValueError, match="at least 2"):
        hold_out_videos(["a", "a"], 0.5, seed=0)


def test_hold_out_per_class_is_stratified():
    from mmadapters.video.fineclipper_train import hold_out_per_class

    labels = [0, 0, 0, 0, 1, 1, 2]
    train, val = hold_out_per_class(labels, 0.5, seed=3)
    assert sorted(train + val) == list(range(7))
    assert [labels[i] for i in val].count(0) == 2 and [labels[i] for i in val].count(1) == 1
    assert 6 in train  # a class with one clip keeps it for training


def test_tem_loss_is_the_official_batch_sum(qa_root, clip_dir, tmp_path):
    """Per-question mean × global batch = the official summed hinge; so a DDP rank average matches one process."""
    from mmadapters.video.tem_train import TemAdapterRecipeConfig, build_task

    cfg = TemAdapterRecipeConfig(**tem_recipe(qa_root, clip_dir, tmp_path))
    task = build_task(cfg, SimpleNamespace(device="cpu", seed=0, batch_size=4))
    batch = task.get_batch([0, 1, 2, 3])
    torch.manual_seed(1)
    ours = task.loss(task.model, batch)
    torch.manual_seed(1)
    frames, cands, answers, mask = batch
    official = task.model.loss(task.model(frames, cands, answers, mask), answers, mask)["loss"]
    assert torch.allclose(ours, official)
    half = build_task(TemAdapterRecipeConfig(**tem_recipe(qa_root, clip_dir, tmp_path, hinge_reduction="mean")),
                      SimpleNamespace(device="cpu", seed=0, batch_size=4))
    assert half.hinge_scale == 1.0 and task.hinge_scale == 4.0
    train_file = str(qa_root / "annotations" / "R2_train.jsonl")
    every = build_task(TemAdapterRecipeConfig(**tem_recipe(qa_root, clip_dir, tmp_path, val_annotations=train_file)),
                       SimpleNamespace(device="cpu", seed=0, batch_size=4))
    assert every.val is every.train and every.train_size() > task.train_size()  # validation = training accuracy


def test_train_tem_adapter_end_to_end(qa_root, clip_dir, tmp_path):
    from mmadapters.training.recipe import load_recipe
    from mmadapters.video.tem_train import TemAdapterRecipeConfig, build_task, load_tem_run

    out = tmp_path / "run"
    config = write_config(tmp_path / "tem.yaml", out, {"steps": 6, "batch_size": 4, "lr": 1e-3, "eval_every": 3,
                                                       "checkpoint_every": 3}, tem_recipe(qa_root, clip_dir, tmp_path))
    assert train_main(["tem-adapter", "--config", str(config)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["select_metric"] == "acc" and [e["step"] for e in summary["history"]] == [3, 6]
    assert summary["parameters"]["trainable"] > 0 and summary["parameters"]["total"] > summary["parameters"]["trainable"]
    model, meta = load_tem_run(out / "best")
    assert meta["num_frames"] == 4 and meta["clip"]["model"] == f"local-dir:{clip_dir}"
    # the saved best/ gives the validation score recorded for it (same features, same held-out videos)
    recipe = load_recipe("tem-adapter", "mmadapters.video.tem_train:RECIPE")
    assert recipe.config_class is TemAdapterRecipeConfig
    task = build_task(TemAdapterRecipeConfig(**tem_recipe(qa_root, clip_dir, tmp_path)),
                      SimpleNamespace(device="cpu", seed=0, batch_size=4))
    task.model = model
    assert task.validate() == summary["best_metrics"]
    assert json.loads((out / "best" / "train_best.json").read_text())["metrics"] == summary["best_metrics"]


def test_train_fineclipper_end_to_end(faces_root, clip_dir, tmp_path):
    import mmadapters as mma
    from mmadapters.video.fineclipper_train import FineClipperRecipeConfig, build_task, load_fineclipper_run

    out = tmp_path / "run"
    recipe = {"data_dir": str(faces_root), "model": f"local-dir:{clip_dir}", "num_frames": 3, "adapter_dim": 4,
              "val_fraction": 0.3, "cues": ["landmarks", "description"]}  # masks unused: their gate stays frozen
    config = write_config(tmp_path / "fc.yaml", out, {"steps": 4, "batch_size": 4, "lr": 3e-3, "eval_every": 2,
                                                      "checkpoint_every": 2}, recipe)
    assert train_main(["fineclipper", "--config", str(config)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["select_metric"] == "uar" and set(summary["best_metrics"]) == {"uar", "war"}
    best = out / "best"
    assert (best / "fineclipper" / "adapter_config.json").is_file()  # the image-tower adapters in the core format
    model, meta = load_fineclipper_run(best)
    assert meta["config"]["adapter_dim"] == 4 and mma.adapter_names(model.clip) == ["fineclipper"]
    task = build_task(FineClipperRecipeConfig(**recipe), SimpleNamespace(device="cpu", seed=0, batch_size=4))
    assert task.train_size() + len(task.val.clips) == 14  # fold 1's training list; its test list is never read
    task.model = model
    assert task.validate() == summary["best_metrics"]
    every = build_task(FineClipperRecipeConfig(**recipe, val_annotation=str(faces_root / "annotation" / "DFEW_set_1_train.txt")),
                       SimpleNamespace(device="cpu", seed=0, batch_size=4))
    assert every.val is every.train and every.train_size() == 14
    # `mmadapters eval dfer` on best/ counts the parameters training trained (not the frozen parts of unused cues)
    from mmadapters.eval import cli
    from mmadapters.eval.results_schema import read_results

    assert cli.main(["eval", "dfer", "--data-dir", str(faces_root), "--adapters", str(best), "--no-progress",
                     "--output", str(tmp_path / "test.json")]) == 0
    assert read_results(tmp_path / "test.json")["parameters"] == {k: summary["parameters"][k] for k in ("trainable", "total")}


def test_recipe_config_errors_name_the_field(qa_root, clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    bad_key = write_config(tmp_path / "a.yaml", out, {"steps": 1}, {**tem_recipe(qa_root, clip_dir, tmp_path), "num_frame": 4})
    assert train_main(["tem-adapter", "--config", str(bad_key)]) == 2
    assert "recipe.num_frame: unknown key" in capsys.readouterr().err
    bad_cue = write_config(tmp_path / "b.yaml", out, {"steps": 1}, {"data_dir": "x", "cues": ["masks", "voice"]})
    assert train_main(["fineclipper", "--config", str(bad_cue)]) == 2
    assert "recipe.cues" in capsys.readouterr().err
    probe = write_config(tmp_path / "d.yaml", out, {"steps": 1}, {"data_dir": "x", "linear_probe": True})
    assert train_main(["fineclipper", "--config", str(probe)]) == 2
    err = capsys.readouterr().err
    assert "recipe.linear_probe" in err and "recipe.adapter_dim: 0" in err
    no_data = write_config(tmp_path / "c.yaml", out, {"steps": 1}, {})
    assert train_main(["tem-adapter", "--config", str(no_data)]) == 2
    assert "recipe.train_annotations" in capsys.readouterr().err
