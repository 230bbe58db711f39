"""CapS's plug-ins: caption parsing, the noisy and VL-T5 captioners, the generator as text-to-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmadapters.vision import synth
from mmadapters.vision.caps_adapter import caption_key
from mmadapters.vision.captioners import (
    ATTRIBUTES,
    NOISY_DROP,
    NOISY_WRONG,
    NoisyCaptioner,
    SynthImageGenerator,
    compose_caption,
    parse_attributes,
    support_captions,
)

MIX = (("photo", 0.3), ("cartoon", 0.1), ("sketch", 0.2), ("noisy", 0.2), ("falsecolour", 0.2))


def _scenes(n: int, seed: int = 0) -> list[synth.Scene]:
    rng = np.random.default_rng(seed)
    return [synth.sample_scene(rng, None, MIX) for _ in range(n)]


def test_parse_reads_back_every_attribute_the_generator_writes():
    for scene in _scenes(300):
        text = synth.caption(scene)
        named = {k: getattr(scene, k) for k in ATTRIBUTES}
        if scene.style == "sketch":  # sketches are captioned without texture and background
            named.pop("texture"), named.pop("background")
        if scene.texture == "solid":
            named.pop("texture", None)
        assert parse_attributes(text) == named, text
        assert compose_caption(parse_attributes(text)) == text  # the generator's own word order


def test_parse_last_mention_wins_and_unknown_words_carry_nothing():
    # in "A photo of {class}. {caption}" the caption overrides the class name
    assert parse_attributes("A photo of red one. a noisy photo of a small blue star") == {
        "style": "noisy", "size": "small", "colour": "blue", "shape": "star"}
    assert parse_attributes("a photo of a vostrel.") == {"style": "photo"}
    assert parse_attributes("A Sketch of a RED Ring at the top") == {"style": "sketch", "colour": "red", "shape": "ring",
                                                                    "position": "top"}
    assert parse_attributes("a starry redness") == {}  # whole words only
    assert compose_caption({"colour": "orange"}) == "an orange shape"
    with pytest.raises(ValueError, match="unknown attribute"):
        compose_caption({"hue": "red"})


def test_noisy_captioner_drops_and_replaces_at_its_documented_rates():
    noisy = NoisyCaptioner(seed=3)
    kept = dropped = wrong = 0
    for i, scene in enumerate(_scenes(600, seed=1)):
        truth = parse_attributes(synth.caption(scene))
        out = parse_attributes(noisy.perturb(synth.caption(scene), f"img{i}"))
        for attribute, value in truth.items():
            if attribute not in out:
                dropped += 1
            elif out[attribute] == value:
                kept += 1
            else:
                wrong += 1
        assert set(out) <= set(truth)  # never invents an attribute the caption did not name
    total = kept + dropped + wrong
    assert dropped / total == pytest.approx(NOISY_DROP, abs=0.03)
    assert wrong / total == pytest.approx(NOISY_WRONG, abs=0.03)
    text = synth.caption(_scenes(1)[0])
    assert noisy.perturb(text, "k") == NoisyCaptioner(seed=3).perturb(text, "k")  # seeded
    assert NoisyCaptioner(drop=0, wrong=0).perturb(text, "k") == text
    with pytest.raises(ValueError, match="drop"):
        NoisyCaptioner(drop=0.8, wrong=0.3)


def test_generator_renders_what_the_prompt_says():
    gen = SynthImageGenerator(64)
    prompt = "A photo of foo. a cartoon of a large red solid square in the center of a sky background"
    a, b = gen.generate([prompt, prompt], seed=0)
    arr = np.asarray(a, dtype=np.float32)
    assert a.size == (64, 64)
    assert np.abs(arr[32, 32] - synth.COLOURS["red"]).max() < 40  # the object, red, in the centre
    assert np.abs(arr[2, 2] - synth.BACKGROUNDS["sky"]).max() < 40  # the sky background in the corner
    assert np.asarray(gen.generate([prompt], seed=0)[0]).tobytes() == arr.astype(np.uint8).tobytes()  # seeded
    assert np.asarray(b).tobytes() != np.asarray(a).tobytes()  # the second image of a prompt is another draw
    # a false-colour caption is rendered in false colour: red shows as (G, B, R)
    fc = np.asarray(gen.generate(["a false-colour photo of a large red solid circle in the center"])[0], np.float32)
    assert fc[32, 32, 2] > 120 and fc[32, 32, 0] < 100
    with pytest.raises(ValueError, match="image_size"):
        SynthImageGenerator(4)


def test_support_captions_truth_noisy_and_errors(tmp_path):
    root = synth.generate_task("colours-noisy", tmp_path / "t", train_per_class=2, val_per_class=1, test_per_class=1,
                               image_size=32, progress=False)
    paths = sorted(str(p) for p in (root / "train").rglob("*.png"))
    truth = support_captions("truth", root, paths)
    noisy = support_captions("noisy", root, paths, seed=0)
    assert set(noisy) == {caption_key(p) for p in paths} <= set(truth)
    assert sum(noisy[k] != truth[k] for k in noisy) >= len(paths) // 2
    assert noisy == support_captions("noisy", root, paths, seed=0)
    assert noisy != support_captions("noisy", root, paths, seed=1)
    with pytest.raises(ValueError, match="--captioner 'blip'"):
        support_captions("blip", root, paths)


def test_vlt5_captioner_is_the_eval_caption_path(tmp_path):
    """The plug-in's captions are the shipped VL-T5's greedy captions of its own CLIP's grid features."""
    from mmadapters.vision.clip import load_clip
    from mmadapters.vision.vl_features import clip_grid_features, feature_clip
    from mmadapters.vision.vlt5 import VLT5

    images = SynthImageGenerator(64).generate(["a photo of a large red circle", "a photo of a small blue star"] * 2)
    root = tmp_path / "imgs"
    root.mkdir()
    paths = []
    for i, im in enumerate(images):
        im.save(root / f"{i}.png")
        paths.append(root / f"{i}.png")
    got = support_captions("vlt5", root, paths, batch_size=3)  # batches of 3: the last one is partial
    model = VLT5.from_pretrained().eval()
    clip = load_clip(feature_clip(None))
    feats = clip_grid_features(clip.model, torch.stack([clip.preprocess(im) for im in images]), model.num_visual_tokens)
    ids, mask = model.encode_text(["caption: "] * len(images))
    with torch.no_grad():
        direct = model.decode(model.generate(ids, mask, feats, max_new_tokens=48))
    assert [got[caption_key(p)] for p in paths] == direct
    assert all(c.endswith(".") and len(c.split()) >= 4 for c in direct)
