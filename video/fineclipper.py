"""FineCLIPER: fine-grained CLIP with adapters for dynamic facial expression recognition (DFER).

The method, as its paper describes it (no public code exists; the adapter placement below is ours):

1. **Labels as positive and negative descriptions.** Each class ``c`` becomes a positive description
   ("a face showing happiness: the corners of the mouth rise …") and a negative one ("a face not showing
   happiness: …"), encoded by CLIP's frozen text tower into ``P_c`` and ``N_c``. A video ``v`` scores
   ``s_c = τ · (⟨v, P_c⟩ − α ⟨v, N_c⟩)``: similar to what the class is, unlike what it is not
   (α learnable, initialised to 1); training is cross-entropy over ``s``.
2. **Hierarchical inputs.**
   - *low*: the sampled frames through CLIP's image tower;
   - *middle*: per-frame face-parsing masks (rendered as colour images, through the same image tower) and
     facial landmarks (a small MLP on the normalised coordinates and their displacement since the first
     sampled frame), each added to the frame features through a zero-initialised gate;
   - *high*: a description of the facial change across frames (from an MLLM in the paper; from the
     renderer's template on generated data) through the frozen text tower, added to the video feature
     through a zero-initialised linear map.
   A one-layer temporal transformer over the (fused) frame features and their change since the first
   frame, averaged over time and added to the frame mean through a zero-initialised projection, gives ``v``.
3. **PEFT on CLIP.** CLIP stays frozen. *Placement (our choice):* bottleneck adapters (AIM-style, zero-
   initialised up-projection) after the attention and the MLP of every block of the image tower
   (``@image_attn_out`` and ``@image_ffn_out``); the text tower is frozen, so class descriptions are encoded
   once. Trainable: the image adapters, the temporal transformer, the cue encoders and gates, α and τ.

Because every gate starts at zero and the adapters start as identities, the untrained model *is* frozen
CLIP scoring the frame-mean feature (plus an identity-initialised temporal residual), which is the zero-shot
baseline; each cue level can be switched off in :class:`FineClipperConfig` for ablations,
``linear_probe=True`` (no cues, no adapters) trains only a linear classifier on that frozen frame-mean feature
(the CLIP linear-probe baseline), and ``finetune_params`` (with no cues and no adapters) fine-tunes the named
image-tower parameters of CLIP itself under FineCLIPER's frames-only head (the fine-tuned CLIP baseline).
Training is ``mmadapters train fineclipper`` (:mod:`.fineclipper_train`).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mmadapters as mma

from .readers import DFEW_CLASSES, MAFW_CLASSES  # noqa: F401  (label orders of the benchmarks, re-exported)

# Fine-grained positive / negative descriptions (facial action cues). Unknown classes get a generic pair.
_CUES = {
    "happy": ("happiness", "the corners of the mouth rise, the cheeks lift and the eyes narrow into a smile"),
    "sad": ("sadness", "the corners of the mouth turn down and the inner brows rise"),
    "neutral": ("a neutral expression", "the mouth, brows and eyes stay relaxed and still"),
    "angry": ("anger", "the brows lower and draw together and the lips press tight"),
    "surprise": ("surprise", "the brows rise high, the eyes widen and the mouth drops open"),
    "disgust": ("disgust", "the nose wrinkles, the upper lip raises and the brows lower"),
    "fear": ("fear", "the brows rise and pull together, the eyes widen and the lips stretch sideways"),
    "contempt": ("contempt", "one corner of the mouth tightens and rises on one side"),
    "anxiety": ("anxiety", "the brows pull together and the lips tighten and tremble"),
    "helplessness": ("helplessness", "the brows rise in the middle and the mouth hangs slightly open"),
    "disappointment": ("disappointment", "the mouth corners sag and the eyelids droop"),
}
_ALIASES = {"anger": "angry", "happiness": "happy", "sadness": "sad"}


def class_descriptions(classes: Sequence[str]) -> tuple[list[str], list[str]]:
    """Positive and negative descriptions of each class (two lists of ``len(classes)`` strings)."""
    pos, neg = [], []
    for c in classes:
        key = _ALIASES.get(c.lower(), c.lower())
        noun, detail = _CUES.get(key, (c, f"the face moves the way {c} looks"))
        pos.append(f"a face showing {noun}: {detail}.")
        neg.append(f"a face not showing {noun}: it is not the case that {detail}.")
    return pos, neg


@dataclass
class FineClipperConfig:
    """What trains and which cue levels are used (drop a cue from ``cues`` to ablate it)."""

    cues: tuple[str, ...] = ("masks", "landmarks", "description")
    adapter_dim: int = 16  # bottleneck width of the image-tower adapters (0: no adapters, CLIP image tower frozen)
    adapter_points: tuple[str, ...] = ("@image_attn_out", "@image_ffn_out")
    temporal_layers: int = 1
    num_landmarks: int | None = None  # set from the data when None
    max_frames: int = 64
    negative_weight_init: float = 1.0
    dropout: float = 0.1
    # the CLIP linear-probe baseline: only a linear classifier on frozen CLIP's frame-mean feature trains
    linear_probe: bool = False
    # the fine-tuned CLIP baseline: these image-tower parameters (glob patterns over ``clip.visual``'s parameter
    # names; ``resblocks.-1.`` is the last block) train along with the temporal encoder, α and τ; empty: CLIP frozen
    finetune_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [c for c in self.cues if c not in ("masks", "landmarks", "description")]
        if unknown:
            raise ValueError(f"FineClipperConfig.cues: unknown cue(s) {unknown}; expected among masks, landmarks, description")
        if self.linear_probe and (self.cues or self.adapter_dim):
            raise ValueError(f"FineClipperConfig.linear_probe: the probe reads frozen CLIP's frame mean alone; expected "
                             f"cues=() and adapter_dim=0, got cues={tuple(self.cues)} and adapter_dim={self.adapter_dim}")
        if self.linear_probe and self.finetune_params:
            raise ValueError(f"FineClipperConfig.finetune_params: the linear probe keeps CLIP frozen; expected (), got "
                             f"{tuple(self.finetune_params)}")
        bad = [p for p in self.finetune_params if not isinstance(p, str) or not p]
        if bad:
            raise ValueError(f"FineClipperConfig.finetune_params: expected non-empty glob patterns, got {bad}")

    def to_dict(self) -> dict:
        return asdict(self)


def finetuned_parameter_names(visual: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names (relative to ``visual``, the image tower) of the parameters matched by ``patterns``: globs over the
    parameter names, where ``resblocks.-1.`` stands for the last transformer block; every pattern must match."""
    names = [n for n, _ in visual.named_parameters()]
    blocks = sorted({int(m.group(1)) for n in names if (m := re.search(r"resblocks\.(\d+)\.", n))})
    chosen: list[str] = []
    for pattern in patterns:
        resolved = pattern.replace("resblocks.-1.", f"resblocks.{blocks[-1]}.") if blocks else pattern
        hits = [n for n in names if fnmatch.fnmatchcase(n, resolved)]
        if not hits:
            raise ValueError(f"FineClipperConfig.finetune_params: {pattern!r} matches no image-tower parameter "
                             f"(names look like {names[:3]} ... {names[-2:]})")
        chosen += [n for n in hits if n not in chosen]
    return chosen


class TemporalEncoder(nn.Module):
    """Frame features (B, T, D) -> video feature (B, D): mean over time plus a transformer residual.

    The transformer sees each frame's feature and its change since the first sampled frame (facial
    dynamics: identities differ in their resting face, so the change, not the look, carries the
    expression). The residual's output projection starts at zero, so an untrained encoder returns the
    frame mean.
    """

    def __init__(self, dim: int, layers: int, max_frames: int, dropout: float = 0.1):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(max_frames, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.delta = nn.Linear(dim, dim)
        heads = max(1, dim // 64) if dim % max(1, dim // 64) == 0 else 1
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
                                    for _ in range(layers))
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"{x.shape[1]} frames but the temporal encoder holds positions for {self.pos.shape[0]} "
                             "(raise FineClipperConfig.max_frames)")
        h = x + self.pos[: x.shape[1]] + self.delta(x - x[:, :1])
        for layer in self.layers:
            h = layer(h)
        return x.mean(dim=1) + self.out(h.mean(dim=1))


class FineClipper(nn.Module):
    """CLIP with image-tower adapters, cue encoders and a temporal encoder, scoring class descriptions.

    Args:
        clip: an open_clip CLIP with adapter points declared (``mmadapters.vision.clip.load_clip``); it is
            frozen here and adapters are added to it in place.
        tokenizer: its tokenizer.
        classes: class names, in label order.
        config: :class:`FineClipperConfig`.
    """

    def __init__(self, clip: nn.Module, tokenizer: Callable[[list[str]], Tensor], classes: Sequence[str],
                 config: FineClipperConfig | None = None):
        super().__init__()
        self.config = config = config or FineClipperConfig()
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes contain duplicates: {sorted(c for c in set(classes) if list(classes).count(c) > 1)}")
        self.classes = list(classes)
        self.clip = clip
        self.tokenizer = tokenizer
        for p in clip.parameters():
            p.requires_grad_(False)
        if config.adapter_dim > 0:
            mma.add_adapter(clip, "fineclipper", mma.BottleneckConfig(bottleneck_dim=config.adapter_dim,
                                                                       target_modules=list(config.adapter_points)))
            mma.freeze_base(clip, adapters=["fineclipper"])
        dim = int(clip.text_projection.shape[1]) if hasattr(clip, "text_projection") else int(clip.visual.output_dim)
        self.dim = dim
        pos, neg = class_descriptions(self.classes)
        self.register_buffer("pos_text", self.encode_text(pos), persistent=False)
        self.register_buffer("neg_text", self.encode_text(neg), persistent=False)
        self.negative_weight = nn.Parameter(torch.tensor(float(config.negative_weight_init)))
        scale = float(clip.logit_scale.exp()) if hasattr(clip, "logit_scale") else 100.0
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.temporal = TemporalEncoder(dim, config.temporal_layers, config.max_frames, config.dropout)
        self.mask_gate = nn.Parameter(torch.zeros(1))
        self.landmark_mlp: nn.Module | None = None
        if "landmarks" in config.cues:
            if not config.num_landmarks:
                raise ValueError("FineClipperConfig.num_landmarks must be set when the landmarks cue is used")
            # per frame: the landmarks and their displacement since the first sampled frame
            self.landmark_mlp = nn.Sequential(nn.Linear(4 * config.num_landmarks, dim), nn.GELU(), nn.Linear(dim, dim))
            nn.init.zeros_(self.landmark_mlp[2].weight)
            nn.init.zeros_(self.landmark_mlp[2].bias)
        self.description_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.description_proj.weight)
        nn.init.zeros_(self.description_proj.bias)
        pcfg = getattr(clip.visual, "preprocess_cfg", {}) or {}
        self.image_size = int((pcfg.get("size") or getattr(clip.visual, "image_size", (224, 224)))[0])
        self.register_buffer("mean", torch.tensor(pcfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(pcfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(3, 1, 1),
                             persistent=False)
        # parts of an unused cue never get a gradient: keep them out of the trainable set (DDP reduces exactly those)
        if "masks" not in config.cues:
            self.mask_gate.requires_grad_(False)
        if "description" not in config.cues:
            self.description_proj.requires_grad_(False)
        # the fine-tuned CLIP baseline: unfreeze the chosen image-tower parameters (saved with the head)
        self.finetuned = ["clip.visual." + n for n in finetuned_parameter_names(clip.visual, config.finetune_params)]
        params = dict(self.named_parameters())
        for name in self.finetuned:
            params[name].requires_grad_(True)
        self.probe: nn.Linear | None = None
        if config.linear_probe:
            for p in self.parameters():
                p.requires_grad_(False)
            self.probe = nn.Linear(dim, len(self.classes))

    # -- encoders -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised frozen-text-tower features (N, D)."""
        from mmadapters.vision.zeroshot import encode_texts

        device = next(self.clip.parameters()).device
        return encode_texts(self.clip, self.tokenizer, list(texts), device=device).to(device).clone()  # leave inference mode

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) -> normalised float (N, 3, S, S) at CLIP's input size."""
        x = images.float().div(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 images (B, T, 3, H, W) -> image-tower features (B, T, D) (adapters active)."""
        b, t = images.shape[:2]
        feats = self.clip.encode_image(self.preprocess(images.flatten(0, 1)))
        return feats.float().view(b, t, -1)

    # -- forward --------------------------------------------------------------------------------------------

    def video_features(self, frames: Tensor, *, mask_images: Tensor | None = None, landmarks: Tensor | None = None,
                       description: Tensor | None = None) -> Tensor:
        """Fuse the cue levels into one L2-normalised video feature (B, D).

        Args:
            frames: uint8 (B, T, 3, H, W).
            mask_images: uint8 (B, T, 3, H', W') rendered parsing masks (``cues.render_masks``), if used.
            landmarks: float (B, T, K, 2) in [0, 1], if used.
            description: (B, D) L2-normalised text features of the clips' change descriptions, if used.
        """
        cues = self.config.cues
        f = self.encode_images(frames)
        if "masks" in cues:
            if mask_images is None:
                raise ValueError("the model uses the 'masks' cue but no mask_images were given")
            f = f + self.mask_gate * self.encode_images(mask_images)
        if "landmarks" in cues:
            if landmarks is None:
                raise ValueError("the model uses the 'landmarks' cue but no landmarks were given")
            marks = landmarks.flatten(2).float()
            f = f + self.landmark_mlp(torch.cat([marks - 0.5, marks - marks[:, :1]], dim=-1))
        v = self.temporal(f)
        if "description" in cues:
            if description is None:
                raise ValueError("the model uses the 'description' cue but no description features were given")
            v = v + self.description_proj(description.float())
        return F.normalize(v, dim=-1)

    def logits(self, video: Tensor) -> Tensor:
        """(B, D) normalised video features -> (B, C) class scores τ·(⟨v, P_c⟩ − α⟨v, N_c⟩) (the linear
        probe's logits with ``linear_probe``)."""
        if self.probe is not None:
            return self.probe(video)
        return self.log_scale.exp() * (video @ self.pos_text.T - self.negative_weight * (video @ self.neg_text.T))

    def forward(self, frames: Tensor, **cues) -> Tensor:
        return self.logits(self.video_features(frames, **cues))
