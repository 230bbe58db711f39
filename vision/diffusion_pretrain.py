"""A tiny text-conditioned pixel-space diffusion model on generated shapes: ``mmadapters train diffusion-pretrain``.

The go / no-go of the generation adapters (issue 23): can a tiny conditioned diffusion model be trained on
2 CPU cores to where guidance, and so an adapter's effect, is measurable?

    mmadapters train diffusion-pretrain --config configs/diffusion-pretrain.yaml --set trainer.max_minutes=60
    mmadapters train diffusion-pretrain --config configs/diffusion-pretrain.yaml --resume    # after a crash

- **Data**: a pool of ``pool_size`` 32 px stills of :mod:`~mmadapters.vision.synth` (photo style, solid texture,
  centred, medium or large; any of the 10 task colours × 10 shapes on a random background), each captioned
  "a {colour} {shape}", rendered once.
- **Condition**: the frozen CLIP's (the shipped tiny CLIP unless ``clip``) text-tower token states after its final
  layer norm, for the caption's tokens up to end-of-text (a key mask hides the padding), through the DiT's
  cross-attention; and, as SDXL adds its pooled text embedding to the timestep embedding, the end-of-text state
  through a small MLP (``text_emb``) added to the timestep embedding, so it modulates every block's adaLN (a first
  run with cross-attention alone left the output almost independent of the caption after 1,000 steps). A caption
  is replaced by the empty caption with probability ``cond_dropout`` (classifier-free guidance's unconditional
  branch).
- **Model**: diffusers' ``PixArtTransformer2DModel`` (a DiT with adaLN-single timestep modulation and cross-
  attention on the condition tokens), ε-prediction under a cosine (``squaredcos_cap_v2``) DDPM schedule; an EMA
  of the weights (``ema_decay``) lives beside it in ``task.model`` as buffers (so ``--resume`` keeps it) and is
  what samples and ``best/`` / ``last/`` hold.
- **Validation** every ``trainer.eval_every`` steps: one sample per colour × shape (``eval_samples`` in all,
  ``sample_steps`` DDIM steps from fixed noise), with guidance (``guidance_scale``) and without. The frozen CLIP
  classifies each sample among the 100 captions "a photo of a {colour} {shape}." (images upsampled to its input
  size): ``guided_colour_acc`` / ``guided_shape_acc``, ``unguided_*``, and ``guidance_gap`` = guided − unguided
  colour accuracy. ``go`` is 1.0 when guided colour ≥ 0.7 and the gap ≥ 0.1 (the issue's bar). The same CLIP on
  the pool's real images is recorded once as ``real_colour_acc`` / ``real_shape_acc`` (the metric's ceiling).

``best/`` and ``last/``: the EMA model in diffusers' layout (``config.json``, fp16
``diffusion_pytorch_model.safetensors``, loadable with ``PixArtTransformer2DModel.from_pretrained``), the pooled-
caption embedder (``text_embedding.safetensors``), the scheduler config and ``conditioning.json`` (the CLIP, the
captions, the metrics). Needs ``pip install
'mmadapters[gen]'`` (diffusers).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmadapters.training.recipe import Recipe

from . import synth

RECIPE_NAME = "diffusion-pretrain"
COLOURS = synth.TASK_COLOURS
CAPTIONS = tuple(f"a {c} {s}" for c in COLOURS for s in synth.SHAPES)  # index = colour * 10 + shape
SCORE_TEMPLATE = "a photo of a {c}."
TEXT_EMBEDDING_NAME = "text_embedding.safetensors"


@dataclass
class DiffusionPretrainConfig:
    """The ``recipe:`` section of ``mmadapters train diffusion-pretrain`` (configs/diffusion-pretrain.yaml)."""

    clip: str | None = None  # the frozen CLIP that conditions and scores (None: the shipped tiny CLIP)
    image_size: int = 32
    pool_size: int = 12000  # stills rendered once
    layers: int = 6
    heads: int = 4
    head_dim: int = 32  # width = heads x head_dim
    patch_size: int = 4
    cond_dropout: float = 0.1
    train_timesteps: int = 1000
    ema_decay: float = 0.999
    sample_steps: int = 25
    guidance_scale: float = 3.0
    eval_samples: int = 100  # cycles through the 100 colour x shape captions
    eval_seed: int = 1000

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> None:
            raise ValueError(f"recipe.{name}: expected {expected}, got {getattr(self, name)!r}")

        if self.image_size < 8 or self.image_size % self.patch_size:
            bad("image_size", f"at least 8 and a multiple of recipe.patch_size={self.patch_size}")
        for name in ("pool_size", "layers", "heads", "head_dim", "patch_size", "train_timesteps", "sample_steps",
                     "eval_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        if not 0 <= self.cond_dropout < 1:
            bad("cond_dropout", "a probability in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "a number in [0, 1)")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 1):
            bad("guidance_scale", "a finite number >= 1 (1 = no guidance)")
        if self.sample_steps > self.train_timesteps:
            bad("sample_steps", f"at most recipe.train_timesteps={self.train_timesteps}")


def render_pool(n: int, seed: int, image_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` stills (N, H, W, 3) uint8 and their caption indices (N,) into :data:`CAPTIONS`."""
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in tqdm(range(n), desc="rendering stills", disable=not progress, leave=False):
        rng = np.random.default_rng([seed, synth._key("diffusion"), i])
        label = int(rng.integers(len(CAPTIONS)))
        colour, shape = COLOURS[label // len(synth.SHAPES)], synth.SHAPES[label % len(synth.SHAPES)]
        fixed = {"colour": colour, "shape": shape, "style": "photo", "texture": "solid", "position": "center",
                 "size": str(rng.choice(["medium", "large"]))}
        scene = synth.sample_scene(rng, fixed)
        images[i] = np.asarray(synth.render(scene, image_size, rng))
        labels[i] = label
    return images, labels


@torch.no_grad()
def text_states(clip: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The CLIP text tower's token states after ``ln_final`` (N, L, width) and the key mask (N, L): 1 up to and
    including end-of-text. ``L`` is trimmed to the longest caption (causal attention: padding changes nothing)."""
    eot = tokens.argmax(dim=-1)  # open_clip: end-of-text has the largest id
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    x = clip.token_embedding(tokens) + clip.positional_embedding[:length]
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
    mask = (torch.arange(length)[None, :] <= eot[:, None]).float()
    return x.float(), mask


def build_dit(config: DiffusionPretrainConfig, caption_channels: int) -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    width = config.heads * config.head_dim
    return PixArtTransformer2DModel(
        num_attention_heads=config.heads, attention_head_dim=config.head_dim, in_channels=3, out_channels=3,
        num_layers=config.layers, cross_attention_dim=width, sample_size=config.image_size,
        patch_size=config.patch_size, norm_type="ada_norm_single", caption_channels=caption_channels,
        use_additional_conditions=False, interpolation_scale=1)


def make_scheduler(config: DiffusionPretrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type="epsilon", clip_sample=True)


def to_model_range(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class EmaBuffers(nn.Module):
    """An exponential moving average of named parameters, kept as buffers (so the engine's resumable state holds
    it beside the trained parameters)."""

    def __init__(self, named: dict[str, Tensor]):
        super().__init__()
        self.names = list(named)
        for i, t in enumerate(named.values()):
            self.register_buffer(f"b{i}", t.detach().clone())

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"b{i}") for i, name in enumerate(self.names)}

    @torch.no_grad()
    def update(self, named: dict[str, Tensor], decay: float) -> None:
        for i, name in enumerate(self.names):
            getattr(self, f"b{i}").lerp_(named[name].detach(), 1 - decay)


class DiffusionPretrainTask:
    """The engine's TrainTask: ``model`` = {"net": the DiT, "text_emb": the pooled-caption embedder (both trained),
    "ema": their EMA (buffers)}."""

    select_metric = "guided_colour_acc"
    select_mode = "max"

    def __init__(self, config: DiffusionPretrainConfig, clip_bundle, images: np.ndarray, labels: np.ndarray, *,
                 device: torch.device | str = "cpu", seed: int = 0, record: dict[str, Any] | None = None):
        self.config, self.device, self.seed = config, torch.device(device), seed
        self.clip = clip_bundle.model.to(self.device).eval()
        for p in self.clip.parameters():
            p.requires_grad_(False)
        tokens = clip_bundle.tokenizer([*CAPTIONS, ""])
        self.states, self.masks = (t.to(self.device) for t in text_states(self.clip, tokens.to(self.device)))
        eot = tokens.argmax(dim=-1).to(self.device)
        self.pooled = self.states[torch.arange(len(eot), device=self.device), eot]  # (101, width): end-of-text states
        self.null = len(CAPTIONS)  # index of the empty caption
        net = build_dit(config, self.states.shape[-1])
        width = config.heads * config.head_dim
        text_emb = nn.Sequential(nn.Linear(self.states.shape[-1], width), nn.SiLU(), nn.Linear(width, width))
        trained = nn.ModuleDict({"net": net, "text_emb": text_emb})
        self.model = nn.ModuleDict({"net": net, "text_emb": text_emb,
                                    "ema": EmaBuffers(dict(trained.named_parameters()))}).to(self.device)
        self._trained = trained
        self._ema_copy = copy.deepcopy(trained).requires_grad_(False)
        self._added: Tensor | None = None
        net.adaln_single.emb.register_forward_hook(self._add_text)
        self._ema_copy["net"].adaln_single.emb.register_forward_hook(self._add_text)
        self.images, self.labels = images, labels
        self.scheduler = make_scheduler(config)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device)
        self.ema_updates = 0
        self.record = dict(record or {})
        size = self.clip.visual.image_size
        self.clip_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.score_weights = self._score_weights(clip_bundle)
        self.metrics: dict[str, float] = {}

    def _add_text(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        """Forward hook on the DiT's timestep embedder: + the pooled caption's embedding (as SDXL adds its pooled
        text embedding to the timestep embedding), so the caption also modulates every block's adaLN."""
        return out if self._added is None else out + self._added.to(out.dtype)

    def _score_weights(self, clip_bundle) -> Tensor:
        from .zeroshot import build_classifier

        return build_classifier(self.clip, clip_bundle.tokenizer, list(CAPTIONS), [SCORE_TEMPLATE],
                                device=self.device, progress=False).to(self.device)

    def train_size(self) -> int:
        return len(self.images)

    def get_batch(self, indices: list[int]) -> dict[str, Tensor]:
        """Images, caption ids (the empty caption at rate ``cond_dropout``), timesteps and noise: all drawn from
        ``(seed, indices)``, so ``--resume`` repeats them."""
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, *indices]).integers(2**62)))
        x0 = to_model_range(self.images[indices])
        cond = torch.from_numpy(self.labels[indices])
        cond = torch.where(torch.rand(len(indices), generator=gen) < self.config.cond_dropout, self.null, cond)
        t = torch.randint(0, self.config.train_timesteps, (len(indices),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        return {k: v.to(self.device) for k, v in {"x0": x0, "cond": cond, "t": t, "noise": noise}.items()}

    def _update_ema(self) -> None:
        """EMA of the trained weights, updated at the start of each step (with the previous step's weights)."""
        self.ema_updates += 1
        decay = min(self.config.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        self.model["ema"].update(dict(self._trained.named_parameters()), decay)

    def denoise(self, modules: nn.ModuleDict, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """ε-prediction of ``modules`` ({"net", "text_emb"}) for noisy images ``x`` at timesteps ``t``, captions ``cond``."""
        self._added = modules["text_emb"](self.pooled[cond])
        try:
            return modules["net"](x, encoder_hidden_states=self.states[cond], encoder_attention_mask=self.masks[cond],
                                  timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        finally:
            self._added = None

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        self._update_ema()
        a = self.alphas_cumprod[batch["t"]].view(-1, 1, 1, 1)
        noisy = a.sqrt() * batch["x0"] + (1 - a).sqrt() * batch["noise"]
        return F.mse_loss(self.denoise(self._trained, noisy, batch["t"], batch["cond"]), batch["noise"])

    def ema_modules(self) -> nn.ModuleDict:
        """A copy of {"net", "text_emb"} holding the EMA weights (refreshed on each call)."""
        with torch.no_grad():
            params = dict(self._ema_copy.named_parameters())
            for name, t in self.model["ema"].tensors().items():
                params[name].copy_(t)
        return self._ema_copy

    @torch.no_grad()
    def sample(self, cond: Tensor, guidance_scale: float, *, modules: nn.ModuleDict | None = None, seed: int = 0,
               steps: int | None = None) -> Tensor:
        """DDIM samples (N, 3, H, W) in [-1, 1] for caption ids ``cond`` with ``modules`` (default: the EMA weights);
        guidance_scale 1 = unguided (one pass)."""
        from diffusers import DDIMScheduler

        modules = modules if modules is not None else self.ema_modules()
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps or self.config.sample_steps)
        gen = torch.Generator().manual_seed(seed)
        size = self.config.image_size
        x = torch.randn((len(cond), 3, size, size), generator=gen).to(self.device)
        cond = cond.to(self.device)
        null = torch.full_like(cond, self.null)
        for t in sched.timesteps:
            tt = torch.full((len(cond),), int(t), device=self.device)
            if guidance_scale == 1:
                eps = self.denoise(modules, x, tt, cond)
            else:
                both = self.denoise(modules, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, null]))
                eps_c, eps_u = both.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            x = sched.step(eps, t, x).prev_sample
        return x.clamp(-1, 1)

    @torch.no_grad()
    def score(self, images: Tensor, cond: Tensor) -> dict[str, float]:
        """The frozen CLIP's colour and shape accuracy on ``images`` ([-1, 1]) made for caption ids ``cond``."""
        from .clip_pretrain import MEAN, STD

        x = F.interpolate((images + 1) / 2, size=self.clip_size, mode="bilinear", align_corners=False)
        x = (x - torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)) / torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        pred = (F.normalize(self.clip.encode_image(x).float(), dim=-1) @ self.score_weights).argmax(-1).cpu()
        cond = cond.cpu()
        n = len(synth.SHAPES)
        return {"colour_acc": float((pred // n == cond // n).float().mean()),
                "shape_acc": float((pred % n == cond % n).float().mean())}

    def eval_conditions(self) -> Tensor:
        return torch.arange(self.config.eval_samples) % len(CAPTIONS)

    def validate(self) -> dict[str, float]:
        cond = self.eval_conditions()
        metrics: dict[str, float] = {}
        for name, scale in (("guided", self.config.guidance_scale), ("unguided", 1.0)):
            scores = self.score(self.sample(cond, scale, seed=self.config.eval_seed), cond)
            metrics.update({f"{name}_{k}": v for k, v in scores.items()})
        metrics["guidance_gap"] = metrics["guided_colour_acc"] - metrics["unguided_colour_acc"]
        metrics["go"] = float(metrics["guided_colour_acc"] >= 0.7 and metrics["guidance_gap"] >= 0.1)
        self.metrics = {k: round(v, 4) for k, v in metrics.items()}
        return metrics

    def save(self, directory: Path) -> None:
        """The EMA DiT in diffusers' layout (fp16), the pooled-caption embedder (``text_embedding.safetensors``), the
        scheduler config and ``conditioning.json``."""
        from safetensors.torch import save_file

        ema = self.ema_modules()
        net = build_dit(self.config, self.states.shape[-1])  # a clean copy: no hook, on the CPU
        net.load_state_dict(ema["net"].state_dict())
        net.to(torch.float16).save_pretrained(directory, safe_serialization=True)
        save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in ema["text_emb"].state_dict().items()},
                  str(directory / TEXT_EMBEDDING_NAME))
        self.scheduler.save_pretrained(directory)
        info = {**self.record, "captions": list(CAPTIONS), "null_caption": "", "score_template": SCORE_TEMPLATE,
                "text_embedding": {"file": TEXT_EMBEDDING_NAME, "input": "the CLIP's end-of-text token state",
                                   "added_to": "adaln_single.emb output"},
                "metrics": self.metrics, "ema_updates": self.ema_updates}
        (directory / "conditioning.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    def parameter_counts(self) -> dict[str, int]:
        n = sum(p.numel() for p in self._trained.parameters())
        return {"trainable": n, "total": n}


def build_task(config: DiffusionPretrainConfig, trainer: Any) -> DiffusionPretrainTask:
    """The engine's entry point: load the frozen CLIP, render the pool, build the DiT and its EMA."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise ValueError(f"{RECIPE_NAME} needs diffusers: pip install 'mmadapters[gen]'") from None
    from mmadapters.distributed import device_for_rank
    from mmadapters.training.config_io import to_mapping

    from .clip import load_clip

    device = device_for_rank(trainer.device)
    bundle = load_clip(config.clip, device=device, declare_points=False)
    images, labels = render_pool(config.pool_size, trainer.seed, config.image_size, trainer.progress)
    record = {"trained_by": f"mmadapters train {RECIPE_NAME}", "recipe": to_mapping(config),
              "trainer": to_mapping(trainer), "clip": bundle.info.as_dict()}
    task = DiffusionPretrainTask(config, bundle, images, labels, device=device, seed=trainer.seed, record=record)
    real = torch.arange(min(len(labels), 500))
    task.record["real_images"] = {f"real_{k}": round(v, 4) for k, v in
                                  task.score(to_model_range(images[real.numpy()]).to(device),
                                             torch.from_numpy(labels[real.numpy()])).items()}
    return task


RECIPE = Recipe(
    name=RECIPE_NAME, config_class=DiffusionPretrainConfig, build_task=build_task,
    trainer_defaults={"steps": 8000, "batch_size": 64, "lr": 5e-4, "weight_decay": 0.0, "warmup_ratio": 0.01,
                      "schedule": "constant", "grad_clip": 1.0, "eval_every": 500, "checkpoint_every": 500},
    description="a tiny text-conditioned pixel diffusion DiT on generated shapes (issue 23's go / no-go; needs diffusers)")
