"""``mmadapters train diffusion-pretrain``: the condition, the batches, guidance, the metric, the saved model, errors."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from mmadapters.eval import train_cli
from mmadapters.training.trainer import TrainerConfig

pytest.importorskip("diffusers")
from mmadapters.vision import diffusion_pretrain as dp  # noqa: E402

CONFIG = "configs/diffusion-pretrain.yaml"
TINY = ["recipe.pool_size=24", "recipe.layers=1", "recipe.heads=2", "recipe.head_dim=8", "recipe.eval_samples=4",
        "recipe.sample_steps=2", "trainer.steps=4", "trainer.batch_size=4", "trainer.eval_every=2",
        "trainer.checkpoint_every=2", "trainer.progress=false"]


@pytest.fixture(scope="module")
def task():
    torch.set_num_threads(1)
    config = dp.DiffusionPretrainConfig(pool_size=40, layers=1, heads=2, head_dim=8, eval_samples=6, sample_steps=3)
    return dp.build_task(config, TrainerConfig(steps=1, batch_size=4, progress=False))


def cli(output, *sets: str, resume: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="mmadapters")
    train_cli.add_train_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["train", "diffusion-pretrain", "--config", CONFIG, "--output", str(output), *(a for s in sets for a in ("--set", s))]
    args = parser.parse_args(argv + (["--resume"] if resume else []))
    return args.func(args)


def test_text_states_are_the_full_context_states_up_to_end_of_text(task):
    import open_clip

    tok = open_clip.SimpleTokenizer(context_length=32)(["a red circle", "a purple pentagon", ""])
    states, mask = dp.text_states(task.clip, tok)
    with torch.no_grad():  # the untrimmed pass, as encode_text runs it
        full = task.clip.ln_final(task.clip.transformer(task.clip.token_embedding(tok) + task.clip.positional_embedding,
                                                        attn_mask=task.clip.attn_mask))
    assert torch.allclose(states, full[:, :states.shape[1]], atol=1e-5)
    eot = tok.argmax(-1)
    assert mask.sum(-1).tolist() == (eot + 1).tolist()
    assert mask[2].sum() == 2  # the empty caption: start and end of text


def test_pool_is_seeded_and_captioned_by_its_attributes():
    a, la = dp.render_pool(6, seed=3)
    b, lb = dp.render_pool(6, seed=3)
    assert a.shape == (6, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and np.array_equal(la, lb)
    assert not np.array_equal(a, dp.render_pool(6, seed=4)[0])
    assert len(dp.CAPTIONS) == 100 and dp.CAPTIONS[int(la[0])].startswith("a ")


def test_batches_repeat_for_the_same_indices_and_drop_conditions_at_the_rate(task):
    one, two = task.get_batch([0, 1, 2]), task.get_batch([0, 1, 2])
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert one["x0"].min() >= -1 and one["x0"].max() <= 1 and one["t"].max() < task.config.train_timesteps
    drops = torch.cat([task.get_batch([(7 * j + i) % 40 for j in range(40)])["cond"] for i in range(10)]) == task.null
    assert 0.03 < drops.float().mean() < 0.2  # cond_dropout 0.1


def test_guidance_scale_one_is_the_conditional_pass_and_null_guidance_changes_nothing(task):
    cond = torch.tensor([0, 55])
    plain = task.sample(cond, 1.0, seed=1)
    assert torch.equal(plain, task.sample(cond, 1.0, seed=1)) and plain.shape == (2, 3, 32, 32)
    null = torch.full((2,), task.null)
    assert torch.allclose(task.sample(null, 4.0, seed=1), task.sample(null, 1.0, seed=1), atol=1e-5)


def test_the_metric_reads_real_stills_colour(task):
    images, labels = dp.render_pool(60, seed=7)
    scores = task.score(dp.to_model_range(images), torch.from_numpy(labels))
    assert scores["colour_acc"] >= 0.9  # the shipped tiny CLIP on real 32 px stills
    assert task.record["real_images"]["real_colour_acc"] >= 0.9


def test_ema_follows_the_trained_weights_and_is_resume_state(task):
    ema = task.model["ema"]
    before = {k: v.clone() for k, v in ema.tensors().items()}
    with torch.no_grad():
        for p in task._trained.parameters():
            p.add_(1.0)
    task._update_ema()
    moved = [(ema.tensors()[k] - before[k]).abs().max() for k in before]
    assert all(0 < m <= 1.0 for m in moved)
    assert set(before) == {n for n, _ in task._trained.named_parameters()}
    assert {n for n, b in task.model.named_buffers()} >= {f"ema.b{i}" for i in range(len(before))}  # the engine saves buffers
    assert task.parameter_counts()["trainable"] == sum(p.numel() for p in task._trained.parameters())


def test_the_caption_changes_the_prediction_through_both_paths(task):
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 500])
    with torch.no_grad():
        for p in task._trained["text_emb"].parameters():
            p.normal_(0, 0.5)
        a = task.denoise(task._trained, x, t, torch.tensor([0, 0]))
        b = task.denoise(task._trained, x, t, torch.tensor([55, 55]))
        assert task._added is None and not torch.allclose(a, b, atol=1e-4)
        task._trained["text_emb"][-1].weight.zero_()
        task._trained["text_emb"][-1].bias.zero_()
        plain = task._trained["net"](x, encoder_hidden_states=task.states[[0, 0]], encoder_attention_mask=task.masks[[0, 0]],
                                     timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert torch.allclose(task.denoise(task._trained, x, t, torch.tensor([0, 0])), plain, atol=1e-6)


def test_cli_run_saves_a_diffusers_model_that_predicts_as_the_ema(tmp_path, monkeypatch):
    from diffusers import PixArtTransformer2DModel

    torch.set_num_threads(1)
    monkeypatch.setattr(train_cli, "RECIPES", dict(train_cli.RECIPES))
    out = tmp_path / "run"
    assert cli(out, *TINY) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and "guided_colour_acc" in summary["final_metrics"]
    info = json.loads((out / "last" / "conditioning.json").read_text())
    assert info["captions"][0] == "a red circle" and set(info["metrics"]) >= {"guidance_gap", "go"}
    loaded = PixArtTransformer2DModel.from_pretrained(out / "last").float()
    assert (out / "last" / dp.TEXT_EMBEDDING_NAME).is_file()
    config = dp.DiffusionPretrainConfig(layers=1, heads=2, head_dim=8)
    assert loaded.config.num_layers == 1 and loaded.config.caption_channels == 64
    expected = dp.build_dit(config, 64).state_dict()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in expected.items()}
    assert cli(out, *[s.replace("trainer.steps=4", "trainer.steps=6") for s in TINY], resume=True) == 0
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize("setting, field", [("recipe.guidance_scale=0.5", "recipe.guidance_scale"),
                                            ("recipe.image_size=30", "recipe.image_size"),
                                            ("recipe.cond_dropout=1.0", "recipe.cond_dropout")])
def test_bad_settings_name_their_field(tmp_path, capsys, setting, field):
    assert cli(tmp_path / "bad", *TINY, setting) == 2
    assert field in capsys.readouterr().err
