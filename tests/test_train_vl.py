"""`mmadapters train vl-adapter` on a tiny generated VL set with the shipped tiny VL-T5 and CLIP."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
import yaml

from mmadapters.eval.cli import main
from mmadapters.training.config_io import ConfigError, from_mapping
from mmadapters.vision.synth_vl import generate_vl
from mmadapters.vision.vl_adapter import (
    FeatureCache,
    load_trained,
    make_batch,
    open_feature_source,
    read_split,
    save_trained,
)
from mmadapters.vision.vl_train import VLTrainConfig, VLTrainTask, validation_scores
from mmadapters.vision.vl_variants import VARIANTS, setup_variant
from mmadapters.vision.vlt5 import VLT5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 20-image synth_vl folder and its CLIP features (features.h5), made once."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vl") / "data"
    generate_vl(root, n_images=20, seed=0)
    open_feature_source(None, images=root / "images", num_tokens=16, visual_dim=96, cache=root / "features.h5")
    return root


def _config(data, tmp_path, **recipe) -> str:
    run = {"output": str(tmp_path / "run"),
           "trainer": {"steps": 4, "batch_size": 8, "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "progress": False},
           "recipe": {"data": str(data), "features": str(data / "features.h5"), "max_val_samples": 6,
                      "max_new_tokens": 8, **recipe}}
    path = tmp_path / "vl.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def test_train_cli_end_to_end_best_reloads_with_its_validation_score(data, tmp_path, capsys):
    assert main(["train", "vl-adapter", "--config", _config(data, tmp_path)]) == 0
    assert "validation scores are fractions" in capsys.readouterr().err  # the output says which scale
    run = tmp_path / "run"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["select_metric"] == "average" and summary["best_step"] in (2, 4)
    best_metrics = summary["best_metrics"]
    assert set(best_metrics) == {"average", "vqa_accuracy", "gqa_accuracy", "nlvr_accuracy", "caption_bleu4", "caption_cider"}
    # one scale: the average is the mean of the tasks' headline fractions (as `mmadapters eval` reports them)
    headlines = [best_metrics[k] for k in ("vqa_accuracy", "gqa_accuracy", "nlvr_accuracy", "caption_cider")]
    assert best_metrics["average"] == pytest.approx(sum(headlines) / 4) and 0 <= best_metrics["average"] <= 10
    best = run / "best"
    assert (best / "adapters" / "shared" / "adapter_config.json").is_file()
    assert (best / "trained_backbone.safetensors").is_file()

    # best/ restores onto a fresh VL-T5 and reproduces the validation score recorded for it
    model = VLT5.from_pretrained()
    setup = load_trained(model, best)
    assert setup.variant == "shared_adapter" and setup.adapters == ["shared"]
    config = from_mapping(VLTrainConfig, yaml.safe_load((run / "config.yaml").read_text())["recipe"], source="config.yaml")
    features = FeatureCache(open_feature_source(data / "features.h5", images=None, num_tokens=16, visual_dim=96))
    val = {t: list(read_split(t, config.annotation_file(t, "val"), "val"))[: config.max_val_samples] for t in config.tasks}
    scores = validation_scores(model, setup, val, features, config)
    for name, value in summary["best_metrics"].items():
        assert scores[name] == pytest.approx(value, abs=1e-9), name

    # a fresh model differs: the reload is what carries the score (parameters really were trained)
    fresh = VLT5.from_pretrained()
    live = dict(model.named_parameters())
    changed = [n for n, p in fresh.named_parameters() if n in live and not torch.equal(p, live[n])]
    assert any("visual_proj" in n for n in changed) and any("layer_norm" in n for n in changed)


def test_loss_is_the_item_weighted_mean_of_the_task_groups(data):
    config = VLTrainConfig(data=str(data), features=str(data / "features.h5"), max_val_samples=2)
    task = VLTrainTask(config, progress=False)
    task.model.eval()  # no dropout: the losses are comparable
    assert task.train_size() == sum(len(v) for v in task.train.values())
    vqa = [i for i, (t, _) in enumerate(task.items) if t == "vqa"][:3]
    nlvr = [i for i, (t, _) in enumerate(task.items) if t == "nlvr"][:1]
    batch = task.get_batch(vqa + nlvr)
    assert [p.task for p in batch.parts] == ["vqa", "nlvr"] and batch.size == 4
    with torch.no_grad():
        joint = task.loss(task.model, batch)
        separate = {}
        for part in batch.parts:
            task.setup.activate(task.model, part.task)
            separate[part.task] = task.model(part.input_ids, part.attention_mask, part.visual_feats, labels=part.labels).loss
    assert joint.item() == pytest.approx((3 * separate["vqa"] + separate["nlvr"]).item() / 4, rel=1e-6)
    # the caption a captioning item trains on is a pure function of (seed, indices): resumable, rank-independent
    caption = [i for i, (t, _) in enumerate(task.items) if t == "caption"][:4]
    assert torch.equal(task.get_batch(caption).parts[0].labels, task.get_batch(caption).parts[0].labels)
    metrics = task.validate()
    assert list(metrics)[0] == "average" and math.isfinite(metrics["average"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_trained_restores_every_variant_on_a_fresh_vlt5(data, tmp_path, variant):
    features = FeatureCache(open_feature_source(data / "features.h5", images=None, num_tokens=16, visual_dim=96))
    samples = list(read_split("nlvr", data / "nlvr/valid.json", "val"))[:2]
    torch.manual_seed(0)
    model = VLT5.from_pretrained()
    setup = setup_variant(model, variant)
    with torch.no_grad():  # stand-in for training: every trainable tensor moves
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_trained(model, setup, tmp_path / "ckpt")
    loaded = VLT5.from_pretrained()
    loaded_setup = load_trained(loaded, tmp_path / "ckpt")
    assert loaded_setup.adapter_for == setup.adapter_for and loaded_setup.visual_tokens == setup.visual_tokens
    assert sorted(n for n, p in loaded.named_parameters() if p.requires_grad) == \
        sorted(n for n, p in model.named_parameters() if p.requires_grad)
    batch = make_batch(model, "nlvr", samples, features, max_text_length=40, max_target_length=8, rng=random.Random(0))
    outs = []
    for m, s in ((model, setup), (loaded, loaded_setup)):
        m.eval()
        s.activate(m, "nlvr")
        with torch.no_grad(), s.fusion(m, batch.visual_feats):
            outs.append(m(batch.input_ids, batch.attention_mask, batch.visual_feats, labels=batch.labels).logits)
    assert torch.equal(outs[0], outs[1])


def test_load_trained_names_the_file_on_damage(data, tmp_path):
    model = VLT5.from_pretrained()
    setup = setup_variant(model, "shared_adapter")
    save_trained(model, setup, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "vl_adapter.json").read_text())
    (tmp_path / "ckpt" / "vl_adapter.json").write_text(json.dumps({**meta, "variant": "bogus"}))
    with pytest.raises(ValueError, match=r"vl_adapter\.json: field 'variant'"):
        load_trained(VLT5.from_pretrained(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "vl_adapter.json").write_text(json.dumps(meta))
    shutil.copy(tmp_path / "ckpt" / "vl_adapter.json", tmp_path / "meta.json")
    (tmp_path / "ckpt" / "trained_backbone.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="trained_backbone.safetensors"):
        load_trained(VLT5.from_pretrained(), tmp_path / "ckpt")


def test_config_errors_name_the_field(data, tmp_path):
    with pytest.raises(ConfigError, match=r"recipe\.varaint: unknown key"):
        from_mapping(VLTrainConfig, {"data": str(data), "varaint": "lora"}, source="x.yaml", path="recipe")
    with pytest.raises(ValueError, match=r"VLTrainConfig\.tasks: unknown task"):
        VLTrainConfig(data=str(data), tasks=("vqa", "okvqa"))
    with pytest.raises(ValueError, match=r"VLTrainConfig\.train_files: unknown task"):
        VLTrainConfig(data=str(data), train_files={"okvqa": "x.json"})
    with pytest.raises(ValueError, match=r"VLTrainConfig\.data: no data folder and no train_files"):
        VLTrainConfig(features="f.h5")
    with pytest.raises(FileNotFoundError, match="VQA annotation file not found"):
        VLTrainTask(VLTrainConfig(data=str(data), features=str(data / "features.h5"),
                                  train_files={"vqa": str(tmp_path / "nope.json")}), progress=False)


def test_resume_after_a_crash_reaches_the_same_weights(data, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    def run(name, *extra):
        return main(["train", "vl-adapter", "--config", _config(data, tmp_path, tasks=["vqa", "nlvr", "caption"],
                                                                  max_val_samples=2, max_new_tokens=4),
                     "--output", str(tmp_path / name), "--set", "trainer.steps=5", "--set", "trainer.eval_every=0", *extra])

    assert run("straight") == 0
    calls = {"n": 0}
    get_batch = VLTrainTask.get_batch

    def crash_at_step_5(self, indices):
        calls["n"] += 1
        if calls["n"] == 5:  # train_state.pt holds step 4 (checkpoint_every 2)
            raise KeyboardInterrupt
        return get_batch(self, indices)

    monkeypatch.setattr(VLTrainTask, "get_batch", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run("crashed")
    monkeypatch.setattr(VLTrainTask, "get_batch", get_batch)
    assert run("crashed", "--resume") == 0
    assert json.loads((tmp_path / "crashed" / "train_summary.json").read_text())["resumed_from"] == 4
    for rel in ("trained_backbone.safetensors", "adapters/shared/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "straight" / "last" / rel), load_file(tmp_path / "crashed" / "last" / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
