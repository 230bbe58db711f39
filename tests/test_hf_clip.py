"""transformers CLIP folders load through load_clip (converted once into open_clip) and equal transformers' own
features; peft LoRAs saved on the transformers model import with peft's outputs."""

from __future__ import annotations

import json

import pytest
import torch

import mmadapters as mma
from mmadapters.vision.clip import load_clip

transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat", "dog!", "a very long caption that the tokenizer must cut at the context length"]
CONTEXT = 16


def _tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


def _write_hf_clip(directory, *, eos_token_id=None, seed=0):
    """A tiny random transformers CLIPModel + its tokenizer saved with save_pretrained. Returns (model, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    tok = _tokenizer()
    text = {"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 2,
            "num_hidden_layers": 2, "max_position_embeddings": CONTEXT, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id if eos_token_id is None else eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
              "num_hidden_layers": 2}
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():  # non-trivial norms and logit scale, so a mixed-up mapping cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or "logit_scale" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "size": {"shortest_edge": 32}}))
    return model, tok


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMADAPTERS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tiny-hf-clip"
    model, tok = _write_hf_clip(directory)
    return directory, model, tok


@pytest.mark.parametrize("legacy_eos", [False, True], ids=["eos-pool", "legacy-eos-2-argmax"])
def test_features_equal_transformers(tmp_path, cache, legacy_eos):
    directory = tmp_path / "clip"
    hf, tok = _write_hf_clip(directory, eos_token_id=2 if legacy_eos else None, seed=1)
    bundle = load_clip(f"local-dir:{directory}")
    tokens = bundle.tokenizer(TEXTS)
    expected = tok(TEXTS, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tokens, expected)  # the folder's own tokenizer, open_clip's call signature
    assert tokens.shape == (3, CONTEXT) and tokens[2, -1] == tok.eos_token_id
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours_img, ours_txt = bundle.model.encode_image(images), bundle.model.encode_text(tokens)
        ref_img = _features(hf.get_image_features(pixel_values=images))
        ref_txt = _features(hf.get_text_features(input_ids=tokens))
    torch.testing.assert_close(ours_img, ref_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_txt, ref_txt, rtol=0, atol=1e-5)
    assert bundle.model.logit_scale.item() == pytest.approx(hf.logit_scale.item())
    # the source's hash names the weights; its image normalization comes from preprocessor_config.json
    assert bundle.info.identity().startswith("sha256:") and bundle.info.short_name == "clip"
    normalize = bundle.preprocess.transforms[-1]
    assert list(normalize.mean) == [0.5, 0.4, 0.3] and list(normalize.std) == [0.2, 0.25, 0.3]


def test_converted_once_and_cached_by_source_hash(hf_dir, cache):
    directory, _, _ = hf_dir
    first = load_clip(f"local-dir:{directory}")
    converted = list((cache / "hf_clip").iterdir())
    assert len(converted) == 1 and converted[0].name == first.info.weights_sha256
    assert (converted[0] / "open_clip_config.json").is_file() and (converted[0] / "tokenizer.json").is_file()
    stamp = (converted[0] / "open_clip_model.safetensors").stat().st_mtime_ns
    again = load_clip(f"local-dir:{directory}")
    assert again.info.identity() == first.info.identity()
    assert (converted[0] / "open_clip_model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not [p for p in (cache / "hf_clip").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_adapters_and_routing_on_converted_model(hf_dir, cache):
    directory, _, _ = hf_dir
    bundle = load_clip(f"local-dir:{directory}")
    model = bundle.model
    points = mma.declared_points(model)
    assert {"attn", "image_attn", "text_ffn_out"} <= set(points)
    images, tokens = torch.randn(2, 3, 32, 32), bundle.tokenizer(TEXTS[:2])
    for name in ("a", "b"):
        mma.add_adapter(model, name, mma.LoRAConfig(r=2, target_modules=["@attn"]))
        with torch.no_grad():
            for p in mma.adapter_parameters(model, name).values():
                p.normal_(0, 0.2)
    singles = []
    with torch.no_grad():
        for name in ("a", "b"):
            mma.set_active(model, name)
            singles.append((model.encode_image(images), model.encode_text(tokens)))
        with mma.route(model, ["a", "b"]):
            img, txt = model.encode_image(images), model.encode_text(tokens)
    torch.testing.assert_close(img, torch.stack([singles[0][0][0], singles[1][0][1]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(txt, torch.stack([singles[0][1][0], singles[1][1][1]]), rtol=0, atol=1e-5)
    assert not torch.allclose(singles[0][0], singles[1][0])


def test_eval_zeroshot_cli_on_a_transformers_folder(hf_dir, tmp_path):
    from mmadapters.eval.cli import main
    from mmadapters.eval.results_schema import read_results
    from mmadapters.vision.synth import generate_task

    directory, _, _ = hf_dir
    root = generate_task("shapes-sketch", tmp_path / "task", progress=False, train_per_class=1, val_per_class=1,
                         test_per_class=1, image_size=32)
    out = tmp_path / "zs.json"
    assert main(["eval", "zeroshot", "--model", f"local-dir:{directory}", "--dataset", "shapes-sketch",
                 "--dataset-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--output", str(out),
                 "--batch-size", "8", "--no-progress"]) == 0
    results = read_results(out)
    assert results["model"] == "tiny-hf-clip" and results["counts"]["evaluated"] == results["counts"]["total"] > 0
    assert 0.0 <= results["metrics"]["acc1"] <= 1.0


def test_hf_hub_name_of_a_transformers_repo(hf_dir, cache, monkeypatch):
    """hf-hub:org/repo of a transformers CLIP repo: the hub calls served from a folder (no network here)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    directory, hf, tok = hf_dir
    calls = []

    def download(repo, filename, **kwargs):
        calls.append((repo, filename))
        if not (directory / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo}")
        return str(directory / filename)

    def snapshot(repo, allow_patterns=(), **kwargs):
        calls.append((repo, "snapshot"))
        return str(directory)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    bundle = load_clip("hf-hub:openai/tiny-hf-clip")
    assert ("openai/tiny-hf-clip", "open_clip_config.json") in calls and ("openai/tiny-hf-clip", "snapshot") in calls
    assert bundle.info.short_name == "tiny-hf-clip" and bundle.info.identity().startswith("sha256:")
    tokens = bundle.tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.encode_text(tokens), _features(hf.get_text_features(input_ids=tokens)),
                                   rtol=0, atol=1e-5)


def test_bad_folders_are_refused_by_file_and_field(tmp_path, cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json.*model_type 'clip'"):
        load_clip(f"local-dir:{empty}")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(f"local-dir:{other}")
    no_tok = tmp_path / "no-tokenizer"
    _write_hf_clip(no_tok)
    for p in no_tok.glob("tokenizer*"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_clip(f"local-dir:{no_tok}")
    gelu = tmp_path / "mixed-act"
    _write_hf_clip(gelu)
    cfg = json.loads((gelu / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = "gelu"
    (gelu / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: fields text_config.hidden_act"):
        load_clip(f"local-dir:{gelu}")
    assert not (cache / "hf_clip").exists() or not [p for p in (cache / "hf_clip").iterdir() if p.name.startswith(".")]


# -- peft LoRA saved on the transformers model ------------------------------------------------------------------

def _peft_lora(hf, directory, **lora):
    peft = pytest.importorskip("peft")
    import copy

    model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**lora))
    torch.manual_seed(3)
    with torch.no_grad():  # "trained": random factors (peft initializes lora_B to zero)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("lora", [
    {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    {"r": 3, "lora_alpha": 5, "use_rslora": True,
     "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]},
    {"r": 2, "lora_alpha": 2, "target_modules": r".*vision_model.*\.(q_proj|fc2)"},
], ids=["q-v", "all-rslora", "vision-q-fc2-regex"])
def test_peft_lora_on_transformers_clip_imports_with_equal_outputs(hf_dir, cache, tmp_path, lora):
    directory, hf, _ = hf_dir
    peft_model = _peft_lora(hf, tmp_path / "lora", **lora)
    bundle = load_clip(f"local-dir:{directory}")
    mma.import_peft(bundle.model, tmp_path / "lora", "hf")
    mma.set_active(bundle.model, "hf")
    images, tokens = torch.randn(2, 3, 32, 32), bundle.tokenizer(TEXTS)
    with torch.no_grad():
        ref_img = _features(peft_model.get_image_features(pixel_values=images))
        ref_txt = _features(peft_model.get_text_features(input_ids=tokens))
        base_img = _features(hf.get_image_features(pixel_values=images))
        img, txt = bundle.model.encode_image(images), bundle.model.encode_text(tokens)
    assert not torch.allclose(ref_img, base_img, atol=1e-3)  # the LoRA changes the outputs
    torch.testing.assert_close(img, ref_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(txt, ref_txt, rtol=0, atol=1e-5)


def test_peft_lora_on_q_v_becomes_one_in_proj_lora_of_rank_2r(hf_dir, cache, tmp_path):
    directory, hf, _ = hf_dir
    _peft_lora(hf, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    bundle = load_clip(f"local-dir:{directory}")
    mma.import_peft(bundle.model, tmp_path / "lora", "hf")
    config = mma.get_config(bundle.model, "hf")
    assert config.r == 4 and config.alpha == pytest.approx(8.0)  # alpha / r kept at rank 2r
    params = mma.adapter_parameters(bundle.model, "hf")
    b = next(v for k, v in params.items() if k.startswith("transformer.resblocks.0.attn") and "lora_B" in k)
    assert b.shape == (96, 4) and torch.count_nonzero(b[32:64]) == 0  # k rows untouched
    assert torch.count_nonzero(b[:32, 2:]) == 0 and torch.count_nonzero(b[64:, :2]) == 0  # q | v blocks


def test_peft_lora_on_a_module_without_counterpart_is_refused(hf_dir, cache, tmp_path):
    directory, hf, _ = hf_dir
    _peft_lora(hf, tmp_path / "lora", r=2, target_modules=["q_proj", "visual_projection"])
    bundle = load_clip(f"local-dir:{directory}")
    with pytest.raises(ValueError, match="visual_projection.*no open_clip module counterpart"):
        mma.import_peft(bundle.model, tmp_path / "lora", "hf")
    assert "hf" not in mma.adapter_names(bundle.model)
