"""clip-pretrain's stronger-CLIP options: SLIP's image-image term, spatial captions, the stills x-position probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from test_clip_pretrain import TINY, cli, registered  # noqa: F401  (the fixture registers the recipe)

from mmadapters.vision import clip_pretrain as cp
from mmadapters.vision import synth


def test_simclr_loss_matches_nt_xent_by_hand_and_rewards_matching_views():
    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 5), torch.randn(3, 5)
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / 0.1
    by_hand = []
    for i in range(6):
        j = (i + 3) % 6
        others = [k for k in range(6) if k != i]
        by_hand.append(-(sim[i, j] - torch.logsumexp(sim[i, others], 0)))
    assert torch.allclose(cp.simclr_loss(z1, z2), torch.stack(by_hand).mean())
    assert cp.simclr_loss(z1, z1 + 1e-3 * z2) < cp.simclr_loss(z1, z2)


def test_object_crops_keep_the_box_and_the_identity_crop_is_the_image():
    images = torch.randn(2, 3, 16, 16)
    boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.2, 0.3, 0.6, 0.7]])
    out = cp.object_crops(images, boxes, np.random.default_rng(0), min_side=0.75)
    assert out.shape == images.shape
    assert torch.allclose(out[0], images[0], atol=1e-5)  # a box of the whole image leaves one crop: the image
    # a bright pixel inside the box stays in view (the crop holds the box)
    marked = torch.zeros(1, 1, 32, 32)
    marked[0, 0, 12:14, 12:14] = 1.0  # inside x, y in [0.375, 0.4375]
    for seed in range(20):
        crop = cp.object_crops(marked, np.array([[0.3, 0.3, 0.5, 0.5]]), np.random.default_rng(seed), 0.5)
        assert crop.max() > 0.2


def test_spatial_captions_name_the_centre_and_mirror_with_it():
    scene = synth.Scene("circle", "red", "small", "solid", "center", "beige", "photo")
    assert synth.position_words((0.2, 0.2)) == "at the top left"
    assert synth.position_words((0.8, 0.5)) == "on the right"
    assert synth.position_words((0.5, 0.8)) == "at the bottom"
    assert synth.position_words((0.5, 0.5)) == "in the centre"
    assert synth.spatial_caption(scene, (0.2, 0.75)) == "a photo of a small red circle at the bottom left of a beige background"
    a = synth.spatial_caption(scene, (0.2, 0.5), np.random.default_rng(4))
    b = synth.spatial_caption(scene, (0.8, 0.5), np.random.default_rng(4))  # the mirrored centre, same choices
    assert a.replace("left", "right") == b
    for k in range(50):
        c = synth.spatial_caption(scene, (0.2, 0.75), np.random.default_rng(k))
        assert "right" not in c and "top" not in c


def test_spatial_pool_renders_objects_at_their_centres():
    images, scenes, centres = cp.render_stills(8, seed=1, group=4, image_size=32, spatial=True)
    assert centres.shape == (2, 4, 2)
    for row, cs in zip(scenes, centres, strict=True):
        for scene, (x, y) in zip(row, cs, strict=True):
            m = synth.centre_margin(scene.size)
            assert m <= x <= 1 - m and m <= y <= 1 - m
    stills = cp.Stills(images, scenes, centres)
    boxes = stills.object_boxes(0)
    assert np.all(boxes[:, :2] <= centres[0]) and np.all(boxes[:, 2:] >= centres[0])
    words = [synth.position_words(tuple(c)) for c in centres[0]]
    _, captions = stills.item(0, np.random.default_rng(0))
    assert sum(w in c for w, c in zip(words, captions, strict=True)) >= 2  # kept 85% of the time


def test_stills_probe_scores_r2_of_a_feature_that_knows_x():
    images, centres = cp.render_probe_stills(40, seed=5, image_size=32)
    assert images.shape == (40, 32, 32, 3) and centres.shape == (40, 2)
    again, _ = cp.render_probe_stills(40, seed=5, image_size=32)
    assert np.array_equal(images, again)

    class Oracle(torch.nn.Module):  # features = the centres (and a constant), handed out in call order
        seen = 0

        def encode_image(self, x):
            self.seen += len(x)
            return torch.cat([torch.as_tensor(centres[self.seen - len(x):self.seen]).float(), torch.ones(len(x), 1)], 1)

    oracle = Oracle()
    scores = cp.stills_probe(oracle, images, centres, batch_size=40)
    assert scores["stills_x_r2"] > 0.95 and scores["stills_y_r2"] > 0.95


def test_default_recipe_adds_no_head_no_views_and_the_plain_clip_loss(tmp_path):
    config = cp.ClipPretrainConfig(pool_size=16, group=4, eval_tasks=["synth-shapes"], eval_per_class=1,
                                   model_cfg={"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                              "head_width": 16}, "text_cfg": {"context_length": 16, "width": 32,
                                                                             "heads": 2, "layers": 1}})
    assert config.image_loss_weight == 0 and config.captions == "classic"
    from mmadapters.training.trainer import TrainerConfig

    task = cp.build_task(config, TrainerConfig(progress=False))
    assert not hasattr(task.model, "ssl_head") and task.sources[0].centres is None
    batch = task.get_batch([0, 1])
    assert set(batch) == {"images", "tokens", "same"}
    rng = np.random.default_rng([0, 0, 1])  # the captions are those of Stills.item in order, as before
    expected = task.sources[0].item(0, rng)[1] + task.sources[0].item(1, rng)[1]
    assert torch.equal(batch["tokens"], task.tokenizer(expected))
    f_img, f_txt, scale = task.model(batch["images"], batch["tokens"])[:3]
    assert torch.equal(task.loss(task.model, batch), cp.clip_loss(f_img, f_txt, scale, batch["same"]))


def test_image_term_adds_simclr_on_the_views_through_the_trunk():
    config = cp.ClipPretrainConfig(pool_size=16, group=4, eval_tasks=[], probe_stills=8, image_loss_weight=0.5,
                                   captions="spatial",
                                   model_cfg={"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                              "head_width": 16}, "text_cfg": {"context_length": 16, "width": 32,
                                                                             "heads": 2, "layers": 1}})
    from mmadapters.training.trainer import TrainerConfig

    task = cp.build_task(config, TrainerConfig(progress=False))
    assert task.select_metric == "stills_x_r2"
    batch = task.get_batch([0, 1])
    assert batch["views"].shape == (16, 3, 32, 32)
    model = task.model.eval()  # BN in eval mode: the head's output does not depend on the batch split
    with torch.no_grad():
        f_img, f_txt, scale = model(batch["images"], batch["tokens"])[:3]
        z = model.ssl_head(cp.vision_trunk(model.visual, batch["views"]))
        expected = cp.clip_loss(f_img, f_txt, scale, batch["same"]) + 0.5 * cp.simclr_loss(*z.chunk(2))
        assert torch.allclose(task.loss(model, batch), expected, atol=1e-5)
    assert model.visual.proj is not None  # the trunk pass puts the projection back


@pytest.mark.parametrize("fields", [{"image_loss_weight": -1.0}, {"captions": "fancy"}, {"probe_stills": 1},
                                    {"crop_min_side": 0.0}, {"data": "video-frames", "image_loss_weight": 1.0},
                                    {"data": "video-frames", "captions": "spatial"}])
def test_bad_options_name_the_field(fields):
    name = next(k for k in fields if k != "data")
    with pytest.raises(ValueError, match=f"recipe.{name}"):
        cp.ClipPretrainConfig(**fields)


def test_a_seconds_long_run_with_the_new_options_trains_and_reports_the_probe(tmp_path):
    out = tmp_path / "run"
    assert cli(out, *TINY, "recipe.image_loss_weight=1.0", "recipe.captions=spatial", "recipe.probe_stills=16") == 0
    config = json.loads((out / "last" / cp.CONFIG_NAME).read_text())
    metrics = config["mmadapters"]["metrics"]
    assert "stills_x_r2" in metrics and "zeroshot_acc1" in metrics
    assert any(w in c for c in config["mmadapters"]["example_captions"] for w in ("left", "right", "centre", "top", "bottom"))
    with safe_open(str(out / "last" / cp.WEIGHTS_NAME), "pt") as f:
        assert not any(k.startswith("ssl_head.") for k in f.keys())  # the shipped CLIP loads into open_clip as before
    assert cli(out, *TINY, "recipe.image_loss_weight=1.0", "recipe.captions=spatial", "recipe.probe_stills=16",
               "trainer.steps=6", resume=True) == 0
