"""``mmadapters train clip-pretrain``: the loss, the data items, resume after a crash, the local-dir output, errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from mmadapters.eval import train_cli
from mmadapters.training.trainer import TrainerConfig
from mmadapters.vision import clip_pretrain as cp
from mmadapters.vision import synth

CONFIG = "configs/clip-pretrain.yaml"
TINY_MODEL = ("recipe.model_cfg={embed_dim: 16, vision_cfg: {image_size: 32, layers: 1, width: 32, head_width: 16}, "
              "text_cfg: {context_length: 16, width: 32, heads: 2, layers: 1}}")
# a seconds-long run: 8 groups of 4 stills at 32 px, 2 groups per step, 2 held-out tasks of 2 images per class
TINY = [TINY_MODEL, "recipe.pool_size=32", "recipe.group=4", "recipe.eval_tasks=[synth-shapes, combos-heldout]",
        "recipe.eval_per_class=2", "trainer.steps=4", "trainer.batch_size=2", "trainer.eval_every=2",
        "trainer.checkpoint_every=2", "trainer.warmup_ratio=0.25", "trainer.progress=false"]


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.setattr(train_cli, "RECIPES", dict(train_cli.RECIPES))
    train_cli.register_recipe("clip-pretrain", "mmadapters.vision.clip_pretrain:RECIPE")


def cli(output, *sets: str, resume: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="mmadapters")
    train_cli.add_train_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["train", "clip-pretrain", "--config", CONFIG, "--output", str(output), *(a for s in sets for a in ("--set", s))]
    args = parser.parse_args(argv + (["--resume"] if resume else []))
    return args.func(args)


@pytest.fixture(scope="module")
def stills_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "run"
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(train_cli.RECIPES, "clip-pretrain", "mmadapters.vision.clip_pretrain:RECIPE")
        assert cli(out, *TINY) == 0
    return out


def test_clip_loss_is_clips_with_identity_targets_and_spreads_equal_captions():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    plain = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))
    assert torch.allclose(cp.clip_loss(img, txt, scale, torch.eye(4)), plain)
    same = torch.eye(4)
    same[0, 1] = same[1, 0] = 1.0  # captions 0 and 1 are equal: each is half the target of images 0 and 1
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    by_hand = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())
    assert torch.allclose(cp.clip_loss(img, txt, scale, same), by_hand)


def test_still_groups_differ_only_in_shape_and_are_deterministic():
    images, scenes, centres = cp.render_stills(16, seed=3, group=4, image_size=32)
    assert centres is None
    assert images.shape == (4, 4, 32, 32, 3) and images.dtype == np.uint8
    for row in scenes:
        for attr in ("colour", "style", "size", "texture", "background"):
            assert len({getattr(s, attr) for s in row}) == 1
        assert len({s.shape for s in row}) == 4
        assert not {(s.colour, s.shape) for s in row} & synth.HELDOUT_COMBOS
    again, _, _ = cp.render_stills(16, seed=3, group=4, image_size=32)
    assert np.array_equal(images, again)


def test_batches_mark_equal_captions_and_pair_frames_with_mirrors():
    config = cp.ClipPretrainConfig(data="both", model_cfg={"vision_cfg": {"image_size": 32}}, pool_size=8, group=4,
                                   clips=2, frames_per_clip=2, eval_tasks=["synth-shapes"], eval_per_class=1)
    task = cp.build_task(config, TrainerConfig(progress=False))
    assert task.train_size() == 2 + 2 and task.select_metric == "zeroshot_acc1"
    stills = task.get_batch([0, 1])
    assert stills["images"].shape == (8, 3, 32, 32) and stills["tokens"].shape == (8, 32)
    # captions are drawn from (seed, the batch's indices): the same batch again is the same, another batch differs
    assert torch.equal(task.get_batch([0, 1])["tokens"], stills["tokens"])
    assert not torch.equal(task.get_batch([1, 0])["tokens"][4:], stills["tokens"][:4])
    frames = task.get_batch([2])  # clip 0: 2 frames, each followed by its mirror image
    x = frames["images"]
    assert x.shape == (4, 3, 32, 32) and torch.equal(x[1], x[0].flip(-1)) and torch.equal(x[3], x[2].flip(-1))
    same = stills["same"]
    assert torch.equal(same, same.T) and torch.equal(same.diag(), torch.ones(8))
    # the same item drawn twice in one batch has equal images; its captions are drawn afresh
    twice = task.get_batch([0, 0])
    assert torch.equal(twice["images"][:4], twice["images"][4:])


def test_video_captions_of_a_frame_and_its_mirror_differ_only_in_position_words():
    frames, worlds = cp.render_clips(1, seed=0, size=32)
    source = cp.Frames(frames, worlds, frames_per_clip=6, flip=True)
    _, captions = source.item(0, np.random.default_rng(1))
    strip = {w for p in cp.POSITIONS for w in p.split()}
    for a, b in zip(captions[::2], captions[1::2], strict=True):
        assert [w for w in a.split() if w not in strip] == [w for w in b.split() if w not in strip]


def test_crash_and_resume_reach_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch, stills_run):
    crashed = tmp_path / "crashed"
    calls = {"n": 0}
    original = cp.ClipPretrainTask.loss

    def crash_at_step_3(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 3:  # after the checkpoint of step 2
            raise RuntimeError("simulated crash")
        return original(self, model, batch)

    monkeypatch.setattr(cp.ClipPretrainTask, "loss", crash_at_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli(crashed, *TINY)
    monkeypatch.setattr(cp.ClipPretrainTask, "loss", original)
    assert torch.load(crashed / "train_state.pt", weights_only=True)["step"] == 2
    assert cli(crashed, *TINY, resume=True) == 0
    fresh = torch.load(stills_run / "train_state.pt", weights_only=True)
    resumed = torch.load(crashed / "train_state.pt", weights_only=True)
    assert fresh["step"] == resumed["step"] == 4
    for name, value in fresh["params"].items():
        assert torch.equal(value, resumed["params"][name]), name
    assert (crashed / "last" / cp.WEIGHTS_NAME).read_bytes() == (stills_run / "last" / cp.WEIGHTS_NAME).read_bytes()
    record = json.loads((crashed / "last" / cp.CONFIG_NAME).read_text())["mmadapters"]
    assert [h["step"] for h in record["history"]] == [2, 4]  # the validations of both sessions


def test_output_is_an_open_clip_local_dir_in_fp16_with_its_record(stills_run):
    import open_clip

    from mmadapters.vision.clip import load_clip

    last = stills_run / "last"
    with safe_open(str(last / cp.WEIGHTS_NAME), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    config = json.loads((last / cp.CONFIG_NAME).read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32 and config["preprocess_cfg"]["size"] == 32
    record = config["mmadapters"]
    assert record["trained_by"] == "mmadapters train clip-pretrain" and record["recipe"]["group"] == 4
    assert set(record["metrics"]) == {"synth-shapes_acc1", "combos-heldout_acc1", "zeroshot_acc1"}
    assert set(record["zero_shot_test_acc1"]) == {"synth-shapes", "combos-heldout"}
    assert record["example_captions"] and all(isinstance(c, str) for c in record["example_captions"])
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{last}")
    bundle = load_clip(f"local-dir:{last}", declare_points=False)
    tokens = bundle.tokenizer(["a red circle"])
    assert torch.allclose(model.encode_text(tokens), bundle.model.encode_text(tokens))
    assert (stills_run / "best" / "train_best.json").is_file()
    assert float(load_file(str(last / cp.WEIGHTS_NAME))["logit_scale"]) <= cp.MAX_LOGIT_SCALE + 1e-3


def test_video_frames_from_an_init_record_probes_before_and_after(tmp_path, stills_run):
    out = tmp_path / "video"
    assert cli(out, "recipe.data=video-frames", f"recipe.init={stills_run / 'last'}", "recipe.clips=3",
               "recipe.frames_per_clip=2", "recipe.probe_clips=4", "recipe.eval_tasks=[]", "trainer.steps=2",
               "trainer.batch_size=2", "trainer.progress=false") == 0
    record = json.loads((out / "last" / cp.CONFIG_NAME).read_text())["mmadapters"]
    probes = {"x_r2", "r_r2", "colour_acc", "shape_acc", "position_zeroshot_acc"}
    assert set(record["metrics"]) == probes and set(record["initial_metrics"]) == probes
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["select_metric"] == "position_zeroshot_acc"


@pytest.mark.parametrize("sets, needle", [
    (["recipe.group=9"], "recipe.group: expected 2..8"),
    (["recipe.eval_tasks=[nope]"], "recipe.eval_tasks: expected names of generated tasks"),
    (["recipe.eval_tasks=[]"], "recipe.eval_tasks: expected at least one task, or recipe.probe_clips / probe_stills > 0"),
    (["recipe.probe_clips=1"], "recipe.probe_clips: expected 0 or at least 2"),
    (["recipe.data=frames"], "recipe.data: expected one of 'stills', 'video-frames', 'both'"),
    (["recipe.init={tmp}/missing"], "recipe.init: {tmp}/missing: expected a local-dir CLIP"),
    (["recipe.model_cfg={vision_cfg: {layers: oops}}"], "recipe.model_cfg: open_clip.CLIP refuses"),
])
def test_bad_recipe_values_exit_2_naming_the_field(tmp_path, capsys, sets, needle):
    sets = [s.replace("{tmp}", str(tmp_path)) for s in sets]
    assert cli(tmp_path / "run", *TINY, *sets) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmadapters train: error: ") and needle.replace("{tmp}", str(tmp_path)) in err, err


def test_init_keeps_its_model_shape(tmp_path, capsys, stills_run):
    assert cli(tmp_path / "run", *TINY, f"recipe.init={stills_run / 'last'}", "recipe.model_cfg={embed_dim: 32}") == 2
    assert "recipe.model_cfg: {'embed_dim': 32} changes the model of recipe.init" in capsys.readouterr().err
