"""CapS-Adapter's plug-ins on the generated world: captioners and the text-to-image generator.

The CapS pipeline captions a few images per class with a multimodal LM, then renders support images from
"A photo of {class}. {caption}" with a text-to-image model. Here:

- **Captioners** (``CAPTIONERS``, :func:`support_captions`), each giving one caption per support image:

  - ``truth``: the generator's own complete caption (``captions.jsonl``): an oracle, the upper bound.
  - ``noisy``: that caption with each attribute the generator names (style, size, colour, texture, shape,
    position, background) independently **dropped** with probability ``NOISY_DROP`` = 0.3 or **replaced by a
    wrong value** of the same attribute with probability ``NOISY_WRONG`` = 0.15 (else kept), seeded per image:
    a simulated imperfect captioner. A dropped shape leaves the noun "shape", as the generator's own partial
    captions do.
  - ``vlt5``: the shipped tiny VL-T5 (``vision/assets/tiny_vlt5``) captioning the image through the prediction
    path of ``mmadapters eval caption`` (:func:`mmadapters.vision.vl_adapter.predict_records`, greedy, on the
    grid features of the CLIP it was pretrained with, ``tiny_vlt5/feature_clip``, from
    :func:`mmadapters.vision.vl_adapter.clip_encoder`): a real, small
    captioner trained on multi-object scenes, so its captions are partial and sometimes wrong.

- **Text-to-image** (:class:`SynthImageGenerator`): :func:`parse_attributes` reads the attribute words the
  generator knows from a prompt (the last mention of an attribute wins, so in "A photo of {class}. {caption}"
  the caption overrides the class name; unknown words such as made-up class names carry nothing), the others are
  drawn at random (:func:`mmadapters.vision.synth.sample_scene`), and :func:`mmadapters.vision.synth.render`
  draws the scene. Like a real text-to-image model it renders only what the prompt says: a class named by an
  unknown word comes out as a random shape.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import synth
from .caps_adapter import caption_images, caption_key, read_captions

if TYPE_CHECKING:
    from PIL import Image

CAPTIONERS: tuple[str, ...] = ("truth", "noisy", "vlt5")
NOISY_DROP = 0.3  # probability that the noisy captioner leaves an attribute out
NOISY_WRONG = 0.15  # probability that it names a wrong value of the attribute instead

# The attributes in the generator's caption order, with the values each can take.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "style": synth.STYLES,
    "size": tuple(synth.SIZES),
    "colour": tuple(synth.COLOURS),
    "texture": synth.TEXTURES,
    "shape": synth.SHAPES,
    "position": tuple(synth.POSITIONS),
    "background": tuple(synth.BACKGROUNDS),
}
_STYLE_WORDS = {"false-colour photo": "falsecolour", "noisy photo": "noisy", "sketch": "sketch", "cartoon": "cartoon",
                "photo": "photo"}  # longest first: "a noisy photo of" is noisy, not photo
_POSITION_WORDS = {phrase: name for name, (_, _, phrase) in synth.POSITIONS.items()}


def _finder(words: Sequence[str]) -> re.Pattern[str]:
    alternatives = sorted(words, key=len, reverse=True)
    return re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in alternatives) + r")(?![\w-])")


_FINDERS: dict[str, tuple[re.Pattern[str], dict[str, str]]] = {
    "style": (_finder(list(_STYLE_WORDS)), _STYLE_WORDS),
    "size": (_finder(synth.SIZES), {w: w for w in synth.SIZES}),
    "colour": (_finder(synth.COLOURS), {w: w for w in synth.COLOURS}),
    # "solid" is never written by the generator, but a prompt may say it
    "texture": (_finder(synth.TEXTURES), {w: w for w in synth.TEXTURES}),
    "shape": (_finder(synth.SHAPES), {w: w for w in synth.SHAPES}),
    "position": (_finder(list(_POSITION_WORDS)), _POSITION_WORDS),
    "background": (_finder([f"{b} background" for b in synth.BACKGROUNDS]),
                   {f"{b} background": b for b in synth.BACKGROUNDS}),
}


def parse_attributes(text: str) -> dict[str, str]:
    """The scene attributes a prompt or caption names: ``{attribute: value}`` for those it names.

    Words are matched whole and case-insensitively; when an attribute is named twice the last mention wins.
    Background colours count only as "<name> background" (their names are not object colours anyway)."""
    if not isinstance(text, str):
        raise TypeError(f"text: expected a string, got {type(text).__name__}")
    lowered = text.lower()
    out: dict[str, str] = {}
    for attribute, (pattern, values) in _FINDERS.items():
        matches = list(pattern.finditer(lowered))
        if matches:
            out[attribute] = values[matches[-1].group(1)]
    return out


def compose_caption(attributes: dict[str, str]) -> str:
    """A caption in the generator's word order from a partial attribute dict (what :func:`parse_attributes` reads
    back): "[a <style> of] a [size] [colour] [texture] <shape|"shape"> [position] [on a <background> background]"."""
    unknown = sorted(set(attributes) - set(ATTRIBUTES))
    if unknown:
        raise ValueError(f"attributes: unknown attribute(s) {unknown}; expected some of {list(ATTRIBUTES)}")
    words = [attributes[k] for k in ("size", "colour", "texture") if k in attributes and attributes[k] != "solid"]
    words.append(attributes.get("shape", "shape"))
    phrase = " ".join(words)
    text = f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"
    if "style" in attributes:
        text = f"{synth._STYLE_PREFIX[attributes['style']]} {text}"
    where = synth.POSITIONS[attributes["position"]][2] if "position" in attributes else ""
    if where:
        text += f" {where}"
    if "background" in attributes:
        bg = attributes["background"]
        text += f" {'of' if where else 'on'} {'an' if bg[0] in 'aeiou' else 'a'} {bg} background"
    return text


class NoisyCaptioner:
    """A simulated captioner: the ground-truth caption with attributes dropped or wrong (module docstring).

    ``perturb(caption, key)`` is a pure function of (seed, key, caption): each attribute the caption names is
    independently dropped with probability ``drop``, replaced by a uniformly drawn *other* value with probability
    ``wrong``, else kept."""

    def __init__(self, drop: float = NOISY_DROP, wrong: float = NOISY_WRONG, seed: int = 0):
        if not (0 <= drop <= 1 and 0 <= wrong <= 1 and drop + wrong <= 1):
            raise ValueError(f"noisy captioner: expected rates drop, wrong in [0, 1] with drop + wrong <= 1, "
                             f"got drop={drop!r}, wrong={wrong!r}")
        self.drop, self.wrong, self.seed = float(drop), float(wrong), int(seed)

    def perturb(self, caption: str, key: str) -> str:
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode("utf-8"))])
        out: dict[str, str] = {}
        for attribute, value in parse_attributes(caption).items():
            u = rng.random()
            if u < self.drop:
                continue
            if u < self.drop + self.wrong:
                others = [v for v in ATTRIBUTES[attribute] if v != value]
                value = others[int(rng.integers(len(others)))]
            out[attribute] = value
        return compose_caption(out)


class VLT5Captioner:
    """The shipped tiny VL-T5 as a :class:`~mmadapters.vision.caps_adapter.Captioner`: ``caption(images)`` ->
    one greedy caption per PIL image, through ``predict_records`` (the ``mmadapters eval caption`` path)."""

    def __init__(self, directory: str | os.PathLike | None = None, *, device: str = "cpu", max_new_tokens: int = 48,
                 batch_size: int = 64):
        from .vl_adapter import clip_encoder
        from .vlt5 import VLT5

        self.model = VLT5.from_pretrained(directory).to(device).eval()
        # the VL-T5 reads its own CLIP's grid features (vl_features.feature_clip), whatever CLIP the adapters use
        self.encode = clip_encoder(None, None, self.model.num_visual_tokens, device)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        from .vl_adapter import predict_records
        from .vl_readers import VLSample

        feats = self.encode(list(images))  # (B, num_tokens, visual_dim)
        # a captioner has no references; the one placeholder target only makes the sample count as scorable
        samples = [VLSample(task="caption", uid=str(i), img_ids=[str(i)], text="", targets=["-"])
                   for i in range(len(images))]
        records, skipped = predict_records(self.model, None, "caption", samples, lambda i: feats[int(i)],
                                           batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)
        if skipped:
            raise ValueError(f"vlt5 captioner: could not caption image {skipped[0][0]} ({skipped[0][1]})")
        by_id = {r["id"]: r["prediction"] for r in records}
        return [by_id[str(i)] for i in range(len(images))]


def support_captions(captioner: str, root: str | os.PathLike, image_paths: Sequence[str | os.PathLike], *,
                     seed: int = 0, device: str = "cpu", batch_size: int = 64) -> dict[str, str]:
    """Captions of ``image_paths`` (images of the generated task at ``root``) by ``captioner`` (``CAPTIONERS``):
    ``{caption_key(path): caption}``. ``seed`` seeds the noisy captioner."""
    if captioner not in CAPTIONERS:
        raise ValueError(f"--captioner {captioner!r}: expected one of {', '.join(CAPTIONERS)}")
    if captioner == "vlt5":
        return caption_images(VLT5Captioner(device=device, batch_size=batch_size), image_paths, batch_size=batch_size)
    root = Path(root)
    truth = read_captions(root / "captions.jsonl")
    if captioner == "truth":
        return truth
    noisy = NoisyCaptioner(seed=seed)
    out = {}
    for p in image_paths:
        key = caption_key(p)
        if key in truth:  # a missing caption is reported by support_prompts, naming the file
            out[key] = noisy.perturb(truth[key], os.path.relpath(key, caption_key(root)))
    return out


class SynthImageGenerator:
    """The generator as a text-to-image :class:`~mmadapters.vision.caps_adapter.ImageGenerator`:
    ``generate(prompts, seed=s)`` -> one ``image_size`` RGB image per prompt, rendered from the attributes the prompt
    names (module docstring). Image i is a pure function of (seed, prompt, i)."""

    def __init__(self, image_size: int = 64):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size: expected an integer >= 8, got {image_size!r}")
        self.image_size = image_size

    def generate(self, prompts: Sequence[str], *, seed: int = 0) -> list[Image.Image]:
        images = []
        for i, prompt in enumerate(prompts):
            rng = np.random.default_rng([int(seed), zlib.crc32(prompt.encode("utf-8")), i])
            fixed = parse_attributes(prompt)
            scene = synth.sample_scene(rng, fixed, synth.PRETRAIN_STYLES, avoid=frozenset())
            images.append(synth.render(scene, self.image_size, rng))
        return images


def susx_prompt(classname: str) -> str:
    """SuS-X's plain support prompt for a class: ``"a photo of a {classname}."``."""
    return f"a photo of a {classname}."


@torch.inference_mode()
def encode_images(clip: Any, images: Sequence[Image.Image], *, device: str = "cpu", batch_size: int = 64) -> Tensor:
    """(N, D) L2-normalized CLIP image features of PIL images (the eval preprocess of ``clip``, a ClipBundle)."""
    out = []
    for s in range(0, len(images), batch_size):
        batch = torch.stack([clip.preprocess(im) for im in images[s:s + batch_size]]).to(device)
        out.append(F.normalize(clip.model.encode_image(batch).float(), dim=-1).cpu())
    return torch.cat(out)


__all__ = ["ATTRIBUTES", "CAPTIONERS", "NOISY_DROP", "NOISY_WRONG", "NoisyCaptioner", "SynthImageGenerator",
           "VLT5Captioner", "compose_caption", "encode_images", "parse_attributes", "support_captions", "susx_prompt"]
