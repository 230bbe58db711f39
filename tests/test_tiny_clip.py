"""The shipped tiny CLIP: loads through open_clip's own `local-dir:` factory and classifies generated shapes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

import mmadapters.vision
from mmadapters.vision import synth

ASSET = Path(mmadapters.vision.__file__).parent / "assets" / "tiny_clip"
ROOT = Path(__file__).resolve().parent.parent


def test_asset_files_small_fp16_and_documented():
    files = {p.name: p.stat().st_size for p in ASSET.iterdir() if p.is_file()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md"} <= set(files)
    assert sum(files.values()) <= 15 * 1024 * 1024
    config = json.loads((ASSET / "open_clip_config.json").read_text())
    assert {"model_cfg", "preprocess_cfg"} <= set(config)
    assert config["model_cfg"]["text_cfg"]["vocab_size"] == 49408  # open_clip's bundled SimpleTokenizer
    with safe_open(str(ASSET / "open_clip_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


@torch.no_grad()
def test_zero_shot_on_fresh_generated_shapes_is_far_above_chance(tmp_path):
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{ASSET}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{ASSET}")
    model.eval()
    # A seed the pretraining script never evaluates on: fresh held-out images.
    root = synth.generate_task(
        "synth-shapes", tmp_path / "shapes", train_per_class=0, val_per_class=0, test_per_class=10, seed=4242, progress=False
    )
    classnames = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "templates.txt").read_text().splitlines()

    # Zero-shot classifier: every (class, template) prompt in one batch, normalized, averaged, re-normalized.
    prompts = tokenizer([t.replace("{c}", c) for c in classnames for t in templates])
    text = F.normalize(model.encode_text(prompts), dim=-1).view(len(classnames), len(templates), -1)
    weights = F.normalize(text.mean(1), dim=-1)  # (C, D)

    folders = sorted(p.name for p in (root / "test").iterdir())
    paths = [(p, label) for label, folder in enumerate(folders) for p in sorted((root / "test" / folder).glob("*.png"))]
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p, _ in paths])  # (N, 3, 64, 64)
    labels = torch.tensor([label for _, label in paths])
    logits = 100.0 * F.normalize(model.encode_image(images), dim=-1) @ weights.T  # (N, C)
    accuracy = (logits.argmax(-1) == labels).float().mean().item()

    chance = 1 / len(classnames)
    assert len(paths) == 100
    print(f"tiny CLIP zero-shot top-1 on 100 fresh synth-shapes images: {accuracy:.2f}")
    assert accuracy >= 4 * chance, f"tiny CLIP zero-shot top-1 {accuracy:.2f} on synth-shapes (chance {chance:.2f})"


def test_tokenizer_from_local_dir_matches_context_length():
    tokenizer = open_clip.get_tokenizer(f"local-dir:{ASSET}")
    config = json.loads((ASSET / "open_clip_config.json").read_text())
    tokens = tokenizer(["a photo of a small red striped circle on the left of a sky background"])
    assert tokens.shape == (1, config["model_cfg"]["text_cfg"]["context_length"])


def test_config_records_how_it_was_trained():
    record = json.loads((ASSET / "open_clip_config.json").read_text())["mmadapters"]
    # the asset predates the engine (scripts/pretrain_tiny_clip.py's own loop); a new run records the recipe
    assert record["trained_by"] in ("scripts/pretrain_tiny_clip.py", "mmadapters train clip-pretrain")
    assert record["zero_shot_test_acc1"]["synth-shapes"] > 0.2


def test_pretraining_script_runs_the_engine_resumes_and_copies_the_model_out(tmp_path):
    """scripts/pretrain_tiny_clip.py: the flags of the shipped run, on a seconds-long tiny model."""
    spec = importlib.util.spec_from_file_location("pretrain_tiny_clip", ROOT / "scripts" / "pretrain_tiny_clip.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.set_num_threads(1)
    out, run = tmp_path / "tiny_clip", tmp_path / "run"
    tiny = ["--set", "recipe.model_cfg={vision_cfg: {image_size: 32, layers: 1, width: 32, head_width: 16}, "
                     "text_cfg: {width: 32, heads: 2, layers: 1}}", "--set", "recipe.pool_size=16", "--set", "recipe.group=8",
            "--set", "recipe.eval_tasks=[synth-shapes]", "--set", "recipe.eval_per_class=1", "--set", "trainer.progress=false"]
    flags = ["--output", str(out), "--run-dir", str(run), "--batch-size", "16", "--threads", "1", "--max-minutes", "5", *tiny]
    assert script.main([*flags, "--steps", "1"]) == 0
    assert script.main([*flags, "--steps", "2", "--resume"]) == 0  # trainer.steps may grow on --resume
    record = json.loads((out / "open_clip_config.json").read_text())["mmadapters"]
    assert record["trainer"]["batch_size"] == 2 and record["trainer"]["max_minutes"] == 5.0  # 16 images = 2 groups of 8
    assert [h["step"] for h in record["history"]] == [1, 2]
    assert (out / "open_clip_model.safetensors").read_bytes() == (run / "last" / "open_clip_model.safetensors").read_bytes()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 96)
