"""`mmadapters train vlt5-pretrain` and scripts/pretrain_tiny_vlt5.py: VL-T5 pretraining on the training engine, on a
20-image pretraining stream with a tiny T5 (seconds)."""

from __future__ import annotations

import importlib.util
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmadapters.eval.cli import main
from mmadapters.training.checkpoint import load_train_state
from mmadapters.vision.vl_readers import VLSample
from mmadapters.vision.vlt5 import VLT5
from mmadapters.vision.vlt5_pretrain import Objectives, VLT5PretrainConfig, VLT5PretrainTask, qa_answer, span_corrupt

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "recipe.n_images=20", "--set", "recipe.d_model=16", "--set", "recipe.d_ff=32", "--set", "recipe.num_layers=1",
        "--set", "recipe.num_heads=2", "--set", "recipe.max_new_tokens=8", "--set", "trainer.batch_size=4",
        "--set", "trainer.progress=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 20-image pretraining stream (16 train / 2 val / 2 test images) and its tiny-CLIP features, made once."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vlpt") / "data"
    VLT5PretrainTask(_config(root), progress=False)  # generates the data and the features
    return root


def _config(data: Path, **kw) -> VLT5PretrainConfig:
    sizes = {"n_images": 20, "d_model": 16, "d_ff": 32, "num_layers": 1, "num_heads": 2, "max_new_tokens": 8}
    return VLT5PretrainConfig(data=str(data), **{**sizes, **kw})


def _train(data: Path, output: Path, *extra: str) -> int:
    return main(["train", "vlt5-pretrain", "--output", str(output), "--set", f"recipe.data={data}", *TINY, *extra])


def test_span_corruption_masks_spans_with_sentinels_and_keeps_every_token():
    ids, sentinels = list(range(100, 120)), [-1, -2, -3, -4]
    inp, tgt = span_corrupt(ids, random.Random(0), sentinels, density=0.15, mean_span=3.0)
    assert sum(t >= 0 for t in tgt) == round(20 * 0.15)  # 3 masked tokens
    used = [t for t in inp if t < 0]
    assert used == [t for t in tgt if t < 0] == sentinels[:len(used)] and tgt[0] == sentinels[0]
    # filling each sentinel of the input with its span from the target gives the text back
    spans, cur = {}, None
    for t in tgt:
        cur = t if t < 0 else cur
        spans.setdefault(cur, []).extend([] if t < 0 else [t])
    assert [x for t in inp for x in (spans[t] if t < 0 else [t])] == ids
    assert span_corrupt([7], random.Random(0), sentinels, 0.15, 3.0) == ([7], [])


def test_vqa_target_is_drawn_in_proportion_to_its_score():
    sample = VLSample("vqa", "1", ["x"], "what color is it?", ["red", "blue"], label={"red": 0.9, "blue": 0.3, "green": 0.0})
    rng = random.Random(0)
    drawn = Counter(qa_answer(sample, rng) for _ in range(4000))
    assert set(drawn) == {"red", "blue"} and abs(drawn["red"] / 4000 - 0.75) < 0.03
    assert {qa_answer(sample, rng, "best") for _ in range(20)} == {"red"}


def test_objectives_build_the_expected_examples(data):
    task = VLT5PretrainTask(_config(data, objectives=Objectives(caption=1, span=1, vqa=1, gqa=1)), progress=False)
    tok = task.model.tokenizer
    image = next(im for im in task.train if im.questions["vqa"] and im.questions["gqa"])
    rng = random.Random(0)
    inp, tgt = task.example(image, "caption", rng)
    assert inp == tok("caption: ")["input_ids"] and tgt[:-1] in image.captions and tgt[-1] == task.eos
    inp, tgt = task.example(image, "span", rng)
    prefix = tok("span prediction: ", add_special_tokens=False)["input_ids"]
    assert inp[:len(prefix)] == prefix and tok.convert_tokens_to_ids("<extra_id_0>") in inp
    assert tgt[0] == tok.convert_tokens_to_ids("<extra_id_0>")
    for kind in ("vqa", "gqa"):
        inp, tgt = task.example(image, kind, rng)
        sample = next(s for s, _ in image.questions[kind] if tok(f"{kind}: {s.text}")["input_ids"] == inp)
        assert tok.decode(tgt, skip_special_tokens=True) in sample.label
    # a batch is a pure function of its item indices (what --resume relies on); the objective mix follows the weights
    a, b = task.get_batch([0, 3, 5, 7]), task.get_batch([0, 3, 5, 7])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert a.visual_feats.shape == (4, 16, 96) and (a.labels[a.labels != -100] > 0).all()
    only = VLT5PretrainTask(_config(data, objectives=Objectives(caption=1, span=0)), progress=False)
    assert {tuple(r.tolist()) for r in only.get_batch(list(range(16))).input_ids} == {tuple(tok("caption: ")["input_ids"])}


def test_train_cli_end_to_end_best_is_a_shipped_layout_vlt5(data, tmp_path, capsys):
    assert _train(data, tmp_path / "run", "--set", "trainer.steps=4", "--set", "trainer.eval_every=2",
                  "--set", "recipe.objectives.vqa=0.5", "--set", "recipe.objectives.gqa=0.5") == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["select_metric"] == "caption_cider" and summary["parameters"]["trainable"] == summary["parameters"]["total"]
    assert set(summary["final_metrics"]) == {"caption_cider", "caption_bleu4", "caption_loss", "span_loss", "vqa_loss",
                                             "vqa_accuracy", "gqa_loss", "gqa_accuracy"}
    best = tmp_path / "run" / "best"
    # feature_clip/: the CLIP the shipped VL-T5 was pretrained with, kept beside the asset (not part of a run's output)
    shipped = {p.name for p in (ROOT / "vision" / "assets" / "tiny_vlt5").iterdir()} - {"README.md", "feature_clip"}
    assert shipped <= {p.name for p in best.iterdir()}
    assert all(t.dtype == torch.float16 for t in load_file(best / "model.safetensors").values())
    model = VLT5.from_pretrained(best)
    assert (model.config.d_model, model.config.num_layers, model.num_visual_tokens, model.visual_dim) == (16, 1, 16, 96)
    record = json.loads((best / "vlt5.json").read_text())["pretraining"]
    assert record["config"]["objectives"] == {"caption": 0.5, "span": 0.5, "vqa": 0.5, "gqa": 0.5}
    assert record["data"]["args"]["pretrain"] is True
    # init: continues from the saved weights and tokenizer; the size fields must match the model
    task = VLT5PretrainTask(_config(data, init=str(best)), progress=False)
    assert all(torch.equal(a, b) for a, b in zip(task.model.state_dict().values(), model.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match=r"d_model: 32, but the init model .* has 16 \(set recipe.d_model: 16\)"):
        VLT5PretrainTask(_config(data, init=str(best), d_model=32), progress=False)


def test_resume_after_a_crash_reaches_identical_weights(data, tmp_path, monkeypatch):
    extra = ("--set", "trainer.steps=6", "--set", "trainer.eval_every=0", "--set", "trainer.checkpoint_every=2",
             "--set", "recipe.objectives.vqa=0.3")
    assert _train(data, tmp_path / "straight", *extra) == 0
    calls, get_batch = {"n": 0}, VLT5PretrainTask.get_batch

    def crash_at_step_5(self, indices):
        calls["n"] += 1
        if calls["n"] == 5:  # train_state.pt holds step 4
            raise KeyboardInterrupt
        return get_batch(self, indices)

    monkeypatch.setattr(VLT5PretrainTask, "get_batch", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _train(data, tmp_path / "crashed", *extra)
    monkeypatch.setattr(VLT5PretrainTask, "get_batch", get_batch)
    assert _train(data, tmp_path / "crashed", *extra, "--resume") == 0
    assert json.loads((tmp_path / "crashed" / "train_summary.json").read_text())["resumed_from"] == 4
    a, b = (load_train_state(tmp_path / run / "train_state.pt")["params"] for run in ("straight", "crashed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # float32, bit for bit
    for name in ("model.safetensors", "visual_projection.safetensors"):
        x, y = load_file(tmp_path / "straight" / "last" / name), load_file(tmp_path / "crashed" / "last" / name)
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("override, needle", [
    ("recipe.objectives.nope=1", "recipe.objectives.nope: unknown key"),
    ("recipe.objectives.span=-1", "objectives.span: expected a finite weight >= 0, got -1"),
    ("recipe.d_model=15", "recipe: d_model: 15 is not a multiple of num_heads=2"),
    ("recipe.questions_per_image=0", "objectives: vqa/gqa need questions; questions_per_image is 0"),
    ("recipe.vqa_target=all", "recipe.vqa_target: expected one of 'sampled', 'best'"),
])
def test_config_errors_name_the_field(data, tmp_path, capsys, override, needle):
    assert _train(data, tmp_path / "run", "--set", "recipe.objectives.vqa=0.5", "--set", override) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_script_trains_on_the_engine_and_writes_the_shipped_layout(data, tmp_path):
    spec = importlib.util.spec_from_file_location("pretrain_tiny_vlt5", ROOT / "scripts" / "pretrain_tiny_vlt5.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, run = tmp_path / "tiny_vlt5", tmp_path / "run"
    argv = ["--data", str(data), "--output", str(out), "--run-dir", str(run), "--steps", "2", "--quiet", "--eval-images", "2",
            "--grounding-images", "20", *TINY[:-2]]
    assert script.main(argv) == 0
    assert {p.name for p in out.iterdir()} == {p.name for p in (ROOT / "vision" / "assets" / "tiny_vlt5").iterdir()} - {"feature_clip"}
    record = json.loads((out / "vlt5.json").read_text())["pretraining"]
    assert record["steps"] == 2 and record["take"] == "best" and record["test"]["images"] == 2
    assert record["train_argv"][:2] == ["train", "vlt5-pretrain"] and record["config"]["d_model"] == 16
    readme = (out / "README.md").read_text()
    assert "## Measured (held-out pretraining test images)" in readme and readme.count("## Grounding on unseen scenes") == 1
    assert script.main(["--evaluate-only", str(out), "--grounding-images", "20"]) == 0
    assert (out / "README.md").read_text().count("## Grounding on unseen scenes") == 1
    # the same command plus --resume continues the finished run (nothing left to train) and rewrites the asset
    assert script.main([*argv, "--resume"]) == 0
