"""The fine-tuned CLIP baseline of `mmadapters train fineclipper` (recipe.baseline: finetune_clip, issue 19 item 5).

No adapters and no cues: part of CLIP's own image tower (recipe.finetune_params) trains under FineCLIPER's
frames-only head, at the all-levels FineCLIPER's trainable budget; the fine-tuned tensors travel with the head, so
`mmadapters eval dfer --adapters RUN/best` reproduces the run's validation predictions.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from mmadapters.vision.clip import load_clip, tiny_clip_config, write_clip_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clip")
    write_clip_dir(d, tiny_clip_config(embed_dim=16, image_size=32, width=32, layers=2))  # two blocks: -1 is block 1
    return d


@pytest.fixture(scope="module")
def faces_root(tmp_path_factory) -> Path:
    from mmadapters.video.synth_faces import generate_faces

    return generate_faces(tmp_path_factory.mktemp("faces"), n=28, seed=0, size=32, num_frames=8, folds=2, videos=False,
                          progress=False)


def build(config, bundle, num_landmarks=None):
    from mmadapters.video.fineclipper import FineClipper
    from mmadapters.video.readers import DFEW_CLASSES

    torch.manual_seed(0)
    return FineClipper(bundle.model, bundle.tokenizer, DFEW_CLASSES, config.model_config(num_landmarks))


def trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_budget_matches_all_levels_fineclipper_on_the_tiny_clip():
    """On the shipped tiny CLIP, the default baseline trains within 5% (in fact 0.6%) of the all-levels FineCLIPER."""
    from mmadapters.video.fineclipper_train import FineClipperRecipeConfig

    all_levels = build(FineClipperRecipeConfig(data_dir="x"), load_clip(None, None), num_landmarks=68)  # the faces' 68
    baseline = build(FineClipperRecipeConfig(data_dir="x", cues=[], adapter_dim=0, baseline="finetune_clip"),
                     load_clip(None, None))
    frames = build(FineClipperRecipeConfig(data_dir="x", cues=[], adapter_dim=0), load_clip(None, None))
    target, got = sum(trainable(all_levels).values()), sum(trainable(baseline).values())
    assert target == 163_491 and got == 164_450  # the numbers the sweep reports
    assert abs(got - target) / target < 0.05
    # the baseline is the frames-only head (no adapters) plus the last block's qkv and MLP output projections
    clip_part = {n: k for n, k in trainable(baseline).items() if n.startswith("clip.")}
    assert sorted(clip_part) == ["clip.visual.transformer.resblocks.2.attn.in_proj_bias",
                                 "clip.visual.transformer.resblocks.2.attn.in_proj_weight",
                                 "clip.visual.transformer.resblocks.2.mlp.c_proj.bias",
                                 "clip.visual.transformer.resblocks.2.mlp.c_proj.weight"]
    assert {n: k for n, k in trainable(baseline).items() if not n.startswith("clip.")} == trainable(frames)
    assert got == sum(trainable(frames).values()) + sum(clip_part.values())


def test_only_the_chosen_clip_parameters_and_the_head_train(clip_dir):
    from mmadapters.video.fineclipper_train import FineClipperRecipeConfig

    config = FineClipperRecipeConfig(data_dir="x", model=f"local-dir:{clip_dir}", cues=[], adapter_dim=0,
                                     baseline="finetune_clip", finetune_params=["*ln_post*", "transformer.resblocks.-1.mlp.*"])
    bundle = load_clip(f"local-dir:{clip_dir}")
    model = build(config, bundle)
    names = set(trainable(model))
    assert {n for n in names if n.startswith("clip.")} == {
        "clip.visual.ln_post.weight", "clip.visual.ln_post.bias", "clip.visual.transformer.resblocks.1.mlp.c_fc.weight",
        "clip.visual.transformer.resblocks.1.mlp.c_fc.bias", "clip.visual.transformer.resblocks.1.mlp.c_proj.weight",
        "clip.visual.transformer.resblocks.1.mlp.c_proj.bias"}
    assert {n.split(".")[0] for n in names if not n.startswith("clip.")} == {"temporal", "negative_weight", "log_scale"}
    assert set(model.finetuned) == {n for n in names if n.startswith("clip.")}
    # one optimiser step moves exactly the trainable tensors; the text tower and block 0 stay as they were
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    frames = torch.randint(0, 255, (2, 3, 3, 32, 32), dtype=torch.uint8)
    torch.nn.functional.cross_entropy(model(frames), torch.tensor([0, 1])).backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved <= names and {n for n in moved if n.startswith("clip.")} == {n for n in names if n.startswith("clip.")}
    # frames-only FineCLIPER (baseline none) keeps CLIP frozen whatever finetune_params says
    plain = build(FineClipperRecipeConfig(data_dir="x", cues=[], adapter_dim=0, finetune_params=["*"]),
                  load_clip(f"local-dir:{clip_dir}"))
    assert not [n for n in trainable(plain) if n.startswith("clip.")] and plain.finetuned == []


def test_recipe_errors_name_the_field(faces_root, clip_dir, tmp_path, capsys):
    from mmadapters.eval.cli import main
    from mmadapters.video.fineclipper_train import FineClipperRecipeConfig, build_task

    for recipe, field in (({"baseline": "full"}, "recipe.baseline"),
                          ({"baseline": "finetune_clip"}, "recipe.baseline"),  # the default cues and adapters
                          ({"baseline": "finetune_clip", "cues": [], "adapter_dim": 0, "finetune_params": []},
                           "recipe.finetune_params"),
                          ({"baseline": "finetune_clip", "cues": [], "adapter_dim": 0, "linear_probe": True},
                           "recipe.")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"output": str(tmp_path / "run"), "trainer": {"steps": 1},
                                        "recipe": {"data_dir": "x", **recipe}}))
        assert main(["train", "fineclipper", "--config", str(path)]) == 2
        assert field in capsys.readouterr().err
    config = FineClipperRecipeConfig(data_dir=str(faces_root), model=f"local-dir:{clip_dir}", cues=[], adapter_dim=0,
                                     baseline="finetune_clip", finetune_params=["transformer.resblocks.-1.nothing*"])
    with pytest.raises(ValueError, match=r"recipe\.finetune_params: 'transformer\.resblocks\.-1\.nothing\*' matches no"):
        build_task(config, SimpleNamespace(device="cpu", seed=0, batch_size=4))


def test_train_and_eval_dfer_round_trip(faces_root, clip_dir, tmp_path):
    """Seconds-long `mmadapters train fineclipper` with the baseline, then `mmadapters eval dfer --adapters RUN/best`
    on the validation list gives the clip-by-clip predictions of the run's validation."""
    from safetensors.torch import load_file

    from mmadapters.eval.cli import main
    from mmadapters.eval.results_schema import read_results
    from mmadapters.video.fineclipper_train import HEAD_NAME, FineClipperRecipeConfig, build_task, load_fineclipper_run

    out = tmp_path / "run"
    val_list = faces_root / "annotation" / "DFEW_set_1_train.txt"
    recipe = {"data_dir": str(faces_root), "model": f"local-dir:{clip_dir}", "num_frames": 3, "cues": [], "adapter_dim": 0,
              "baseline": "finetune_clip", "val_annotation": str(val_list)}
    sets = [a for k, v in {"trainer.steps": 4, "trainer.batch_size": 4, "trainer.lr": 1e-2, "trainer.eval_every": 2,
                           "trainer.checkpoint_every": 2, "trainer.progress": False,
                           **{f"recipe.{k}": v for k, v in recipe.items()}}.items()
            for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["train", "fineclipper", "--config", str(REPO / "configs" / "fineclipper.yaml"), "--output", str(out),
                 *sets]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    params = summary["parameters"]  # the fine-tuned CLIP tensors count once in the total
    assert params["total"] == params["backbone"] + params["trainable"] - sum(v.numel() for k, v in load_file(
        str(out / "best" / HEAD_NAME)).items() if k.startswith("clip."))
    best = out / "best"
    meta = json.loads((best / "fineclipper.json").read_text())
    assert meta["baseline"] == "finetune_clip" and meta["config"]["adapter_dim"] == 0
    assert meta["config"]["finetune_params"] == ["transformer.resblocks.-1.attn.in_proj_*",
                                                 "transformer.resblocks.-1.mlp.c_proj.*"]
    assert not (best / "fineclipper").exists()  # no adapters: the fine-tuned tensors are in the head file
    head = load_file(str(best / HEAD_NAME))
    clip_keys = sorted(k for k in head if k.startswith("clip."))
    assert clip_keys == ["clip.visual.transformer.resblocks.1.attn.in_proj_bias",
                         "clip.visual.transformer.resblocks.1.attn.in_proj_weight",
                         "clip.visual.transformer.resblocks.1.mlp.c_proj.bias",
                         "clip.visual.transformer.resblocks.1.mlp.c_proj.weight"]
    fresh = dict(load_clip(f"local-dir:{clip_dir}").model.named_parameters())
    assert all(not torch.equal(head[k], fresh[k[len("clip."):]]) for k in clip_keys)  # they did train
    model, _ = load_fineclipper_run(best)
    loaded = dict(model.named_parameters())
    assert all(torch.equal(loaded[k], head[k]) for k in clip_keys)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == summary["parameters"]["trainable"]
    # the loaded run reproduces its recorded validation, and eval dfer predicts each validation clip the same way
    task = build_task(FineClipperRecipeConfig(**recipe), SimpleNamespace(device="cpu", seed=0, batch_size=4))
    task.model = model
    assert task.validate() == summary["best_metrics"]
    with torch.no_grad():
        want = model(**task.batcher(task.val.clips, training=False)).argmax(1).tolist()
    assert main(["eval", "dfer", "--data-dir", str(faces_root), "--annotation", str(val_list), "--adapters", str(best),
                 "--no-progress", "--output", str(tmp_path / "val.json"), "--predictions", str(tmp_path / "val.jsonl")]) == 0
    results = read_results(tmp_path / "val.json")
    assert results["metrics"]["uar"] == pytest.approx(summary["best_metrics"]["uar"])
    assert results["metrics"]["war"] == pytest.approx(summary["best_metrics"]["war"])
    assert results["parameters"]["trainable"] == summary["parameters"]["trainable"]
    rows = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    ids = [str(Path(c.path).relative_to(faces_root).as_posix()) for c in task.val.clips]
    by_id = {r["id"]: r["pred"] for r in rows}
    assert [by_id[i] for i in ids] == want and len(rows) == len(want)


def test_sweep_runs_the_baseline_once(faces_root, clip_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("run_fineclipper", REPO / "scripts" / "run_fineclipper.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "out"
    assert sweep.main(["--data", str(faces_root), "--model", f"local-dir:{clip_dir}", "--num-frames", "3", "--epochs", "1",
                       "--batch-size", "4", "--adapter-dim", "4", "--output", str(out), "--variants", "frames,finetune",
                       "--cues", "exact,realistic"]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["key"], r["cues"]) for r in rows] == [("frames", "exact"), ("finetune", "exact")]
    recipe = json.loads((Path(rows[1]["run"]) / "train_summary.json").read_text())["config"]["recipe"]
    assert recipe["baseline"] == "finetune_clip" and recipe["cues"] == [] and recipe["adapter_dim"] == 0
    assert rows[1]["trainable_params"] > rows[0]["trainable_params"]
    assert "Fine-tuned CLIP" in (out / "results.md").read_text()
