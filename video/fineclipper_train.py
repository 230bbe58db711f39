"""FineCLIPER on the training engine: ``mmadapters train fineclipper --config configs/fineclipper.yaml``.

The task wraps :class:`~mmadapters.video.fineclipper.FineClipper` (CLIP frozen, bottleneck adapters on the
image tower, cue encoders, temporal encoder, positive/negative class descriptions) and the data code of
:mod:`mmadapters.video.dfer`: a DFEW/MAFW/FERV39k fold file is read once into memory with its cues
(masks, landmarks, descriptions from :class:`~mmadapters.video.cues.PrecomputedCues`), every batch
samples TSN frames (a random frame per segment, from torch's global generator, whose state the engine
checkpoints), and the loss is the cross-entropy over the description scores. Validation is UAR (selection
metric) and WAR. ``linear_probe: true`` (with ``cues: []``, ``adapter_dim: 0``) is the CLIP linear-probe
baseline: only a linear classifier on frozen CLIP's frame-mean feature trains. ``baseline: finetune_clip`` (with
``cues: []``, ``adapter_dim: 0``) is the fine-tuned CLIP baseline at FineCLIPER's budget: the image-tower parameters
``finetune_params`` (glob patterns; by default the last block's qkv and MLP output projections) train under the
frames-only head, and are saved with it in ``fineclipper_head.safetensors`` (as ``clip.visual.*`` tensors).

``cue_source: realistic`` replaces the exact cues by what real extractors would give
(:class:`~mmadapters.video.realistic_cues.RealisticCues`: landmarks with jitter ``landmark_jitter`` and misses
``landmark_miss``, masks from a simple segmenter on the frames when ``mask_segmenter``, descriptions with captioner
errors ``description_drop`` / ``description_wrong`` / ``description_word_drop``, all seeded by ``cue_seed`` and the
clip); the choice and its rates are recorded in ``fineclipper.json`` (``cue_source``), and ``mmadapters eval dfer
--adapters`` reads the test clips' cues the same way.

Validation never reads the test split: ``val_annotation`` names a file, or ``val_fraction`` of the training
clips of every class (seeded with ``split_seed``) is held out. ``val_annotation`` equal to the training list
trains on every clip and reports training UAR/WAR (the protocol of ``scripts/run_fineclipper.py``).

A saved run directory (``best/``, ``last/``) holds

- ``fineclipper/`` — the image-tower adapters in the core format (:func:`mmadapters.save_adapters`), when
  ``adapter_dim > 0``;
- ``fineclipper_head.safetensors`` — the rest of the trainable parts (temporal encoder, cue encoders, gates,
  α and τ; and the fine-tuned image-tower parameters of ``baseline: finetune_clip``);
- ``fineclipper.json`` — the classes, the :class:`FineClipperConfig`, the CLIP, the frame count and the cue source.

:func:`load_fineclipper_run` rebuilds the model from them.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dfer import Batcher, DferSplit, load_split
from .fineclipper import FineClipper, FineClipperConfig

RECIPE_NAME = "fineclipper"
ADAPTER_NAME = "fineclipper"
HEAD_NAME = "fineclipper_head.safetensors"
META_NAME = "fineclipper.json"
# the fine-tuned CLIP baseline's default: the last image-tower block's qkv projection and MLP output projection
FINETUNE_PARAMS = ("transformer.resblocks.-1.attn.in_proj_*", "transformer.resblocks.-1.mlp.c_proj.*")


@dataclass
class FineClipperRecipeConfig:
    """The ``recipe:`` section of ``mmadapters train fineclipper`` (paths are relative to the working directory)."""

    data_dir: str = field(default="", metadata={
        "help": "dataset root: frame folders are resolved against it; holds annotation/ (and cues/ for PrecomputedCues)"})
    dataset: Literal["dfew", "mafw", "ferv39k"] = field(default="dfew", metadata={"help": "label set and file naming"})
    fold: int = field(default=1, metadata={"help": "fold of the annotation files (DFEW/MAFW 1..5; FERV39k 1)"})
    train_annotation: str | None = field(default=None, metadata={
        "help": "training list (default: DATA_DIR/annotation/<DATASET>_set_<fold>_train.txt)"})
    val_annotation: str | None = field(default=None, metadata={
        "help": "validation list (default: hold out val_fraction of each class of the training list)"})
    val_fraction: float = field(default=0.2, metadata={"help": "share of each class's training clips held out for validation"})
    split_seed: int = field(default=0, metadata={"help": "seed of the held-out clip choice"})
    label_base: Literal[0, 1] = field(default=1, metadata={"help": "number of the first class in the lists (1 DFEW; 0 DFER-CLIP)"})
    strip_prefix: str | None = field(default=None, metadata={"help": "leading part of absolute frame paths to drop"})
    cues_root: str | None = field(default=None, metadata={"help": "root of the precomputed cues (default: data_dir)"})
    model: str | None = field(default=None, metadata={
        "help": "CLIP: open_clip name, local-dir:DIR or hf-hub:org/repo (default: the shipped tiny CLIP)"})
    pretrained: str | None = field(default=None, metadata={"help": "pretrained tag or weights file for a built-in name"})
    cache_dir: str | None = field(default=None, metadata={"help": "weights cache (default: $MMADAPTERS_CACHE or ~/.cache/mmadapters)"})
    num_frames: int = field(default=16, metadata={"help": "TSN segments (one frame each) per clip"})
    cues: tuple[str, ...] = field(default=("masks", "landmarks", "description"), metadata={
        "help": "cue levels used: masks, landmarks (middle), description (high); drop one to ablate it"})
    adapter_dim: int = field(default=16, metadata={"help": "bottleneck width of the image-tower adapters (0: none)"})
    adapter_points: tuple[str, ...] = field(default=("@image_attn_out", "@image_ffn_out"), metadata={
        "help": "CLIP adapter points that get a bottleneck adapter"})
    temporal_layers: int = field(default=1, metadata={"help": "layers of the temporal transformer"})
    dropout: float = field(default=0.1, metadata={"help": "dropout of the temporal transformer"})
    negative_weight_init: float = field(default=1.0, metadata={"help": "initial α weighing the negative descriptions"})
    linear_probe: bool = field(default=False, metadata={
        "help": "the CLIP linear-probe baseline: train only a linear classifier on frozen CLIP's frame-mean feature "
                "(needs cues: [] and adapter_dim: 0)"})
    baseline: Literal["none", "finetune_clip"] = field(default="none", metadata={
        "help": "none: FineCLIPER as configured; finetune_clip: the fine-tuned CLIP baseline: the image-tower parameters "
                "finetune_params of CLIP itself train under FineCLIPER's frames-only head (temporal encoder, α, τ); "
                "needs cues: [] and adapter_dim: 0"})
    finetune_params: tuple[str, ...] = field(default=FINETUNE_PARAMS, metadata={
        "help": "finetune_clip: glob patterns over the image tower's parameter names (resblocks.-1. is the last block); "
                "the default (the last block's qkv projection and MLP output projection) gives the tiny CLIP 164,450 "
                "trainable parameters with the frames-only head, FineCLIPER's all-levels budget (163,491) within 0.6%"})
    eval_batch_size: int = field(default=32, metadata={"help": "clips per batch in validation"})
    cue_source: Literal["exact", "realistic"] = field(default="exact", metadata={
        "help": "exact: the precomputed cues as stored (the generated faces: the renderer's); realistic: the same cues "
                "degraded like real extractors' (video/realistic_cues.py: landmark jitter and misses, masks from a simple "
                "segmenter on the frames, captioner errors), seeded per clip; recorded with the run, so "
                "`mmadapters eval dfer --adapters` uses the same"})
    cue_seed: int = field(default=0, metadata={"help": "seed of the realistic cues' noise (with each clip's id)"})
    landmark_jitter: float = field(default=0.02, metadata={
        "help": "realistic: Gaussian std of each landmark coordinate as a fraction of the face size"})
    landmark_miss: float = field(default=0.1, metadata={
        "help": "realistic: share of frames where the detector fails (previous frame's landmarks, else the mean face)"})
    mask_segmenter: bool = field(default=True, metadata={
        "help": "realistic: masks from the simple colour segmenter on the frames (false: the stored masks)"})
    description_drop: float = field(default=0.2, metadata={"help": "realistic: chance that a described movement is left out"})
    description_wrong: float = field(default=0.15, metadata={
        "help": "realistic: chance that a kept movement is replaced by a wrong attribute (opposite direction or another part)"})
    description_word_drop: float = field(default=0.05, metadata={"help": "realistic: chance that each word is dropped"})

    def __post_init__(self) -> None:
        from .realistic_cues import RATE_FIELDS

        if self.cue_source not in ("exact", "realistic"):
            raise ValueError(f"recipe.cue_source: expected exact or realistic, got {self.cue_source!r}")
        for name in RATE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or not 0.0 <= value <= 1.0:
                raise ValueError(f"recipe.{name}: expected a number in [0, 1], got {value!r}")
        unknown = [c for c in self.cues if c not in ("masks", "landmarks", "description")]
        if unknown:
            raise ValueError(f"recipe.cues: unknown cue(s) {unknown}; expected among masks, landmarks, description")
        if self.val_annotation is None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"recipe.val_fraction: expected a number in (0, 1) when no val_annotation is given, "
                             f"got {self.val_fraction}")
        for name in ("num_frames", "eval_batch_size", "temporal_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.adapter_dim < 0:
            raise ValueError(f"recipe.adapter_dim: expected >= 0, got {self.adapter_dim}")
        if self.linear_probe and (self.cues or self.adapter_dim):
            raise ValueError(f"recipe.linear_probe: the probe reads frozen CLIP's frame mean alone; set recipe.cues: [] "
                             f"and recipe.adapter_dim: 0 (got {list(self.cues)} and {self.adapter_dim})")
        if self.baseline not in ("none", "finetune_clip"):
            raise ValueError(f"recipe.baseline: expected none or finetune_clip, got {self.baseline!r}")
        if self.baseline == "finetune_clip":
            if self.cues or self.adapter_dim or self.linear_probe:
                raise ValueError(f"recipe.baseline: finetune_clip fine-tunes CLIP under the frames-only head; set "
                                 f"recipe.cues: [], recipe.adapter_dim: 0 and recipe.linear_probe: false (got "
                                 f"{list(self.cues)}, {self.adapter_dim} and {self.linear_probe})")
            if isinstance(self.finetune_params, str) or not self.finetune_params \
                    or not all(isinstance(p, str) and p for p in self.finetune_params):
                raise ValueError(f"recipe.finetune_params: expected a non-empty list of glob patterns over the image "
                                 f"tower's parameter names, got {self.finetune_params!r}")

    def cue_provider(self):
        """The cues the run reads: :class:`~.cues.PrecomputedCues` under ``cues_root`` (or ``data_dir``), wrapped in
        :class:`~.realistic_cues.RealisticCues` when ``cue_source`` is realistic."""
        from .cues import PrecomputedCues
        from .realistic_cues import RealisticCues

        exact = PrecomputedCues(self.cues_root or self.data_dir)
        if self.cue_source == "exact":
            return exact
        return RealisticCues(exact, seed=self.cue_seed, landmark_jitter=self.landmark_jitter,
                             landmark_miss=self.landmark_miss, segmenter=self.mask_segmenter and "masks" in self.cues,
                             description_drop=self.description_drop, description_wrong=self.description_wrong,
                             description_word_drop=self.description_word_drop)

    def model_config(self, num_landmarks: int | None) -> FineClipperConfig:
        return FineClipperConfig(cues=tuple(self.cues), adapter_dim=self.adapter_dim, adapter_points=tuple(self.adapter_points),
                                 temporal_layers=self.temporal_layers, num_landmarks=num_landmarks,
                                 max_frames=max(64, self.num_frames), negative_weight_init=self.negative_weight_init,
                                 dropout=self.dropout, linear_probe=self.linear_probe,
                                 finetune_params=tuple(self.finetune_params) if self.baseline == "finetune_clip" else ())


def hold_out_per_class(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) indices: ``ceil(fraction · n_c)`` clips of each class with n_c >= 2 go to val (seeded)."""
    rng = random.Random(seed)
    val: set[int] = set()
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        if len(members) < 2:
            continue
        rng.shuffle(members)
        val.update(members[:min(math.ceil(fraction * len(members)), len(members) - 1)])
    return [i for i in range(len(labels)) if i not in val], sorted(val)


def annotation_rows(path: str | Path, config: FineClipperRecipeConfig) -> list[tuple[str, int]]:
    """(frame folder, 0-based label) rows of a DFER list, folders resolved against ``data_dir``."""
    from .readers import read_dfer_annotation

    clips = read_dfer_annotation(path, config.dataset, root=config.data_dir, strip_prefix=config.strip_prefix,
                                 label_base=config.label_base)
    return [(str(a.frame_dir), a.label) for a in clips]


def default_annotation(config: FineClipperRecipeConfig, split: str) -> Path:
    from .readers import dfer_annotation_path

    fold = config.fold if config.dataset != "ferv39k" else None
    return dfer_annotation_path(config.dataset, Path(config.data_dir) / "annotation", split, fold)


def clip_identity(info: dict[str, Any], model: str | None, pretrained: str | None) -> dict[str, Any]:
    """The part of a CLIP's description that a saved run records (and checks on load)."""
    return {"model": model, "pretrained": pretrained, "weights_sha256": info.get("weights_sha256"), "seed": info.get("seed")}


def save_fineclipper_run(model: FineClipper, directory: str | Path, metadata: dict[str, Any]) -> None:
    """Write ``model``'s trained parts into ``directory`` (see the module docstring); every file atomic."""
    from safetensors.torch import save

    import mmadapters as mma
    from mmadapters.eval.results_io import json_bytes
    from mmadapters.io import atomic_write_bytes

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model.config.adapter_dim > 0:
        mma.save_adapters(model.clip, directory, names=[ADAPTER_NAME])
    keep = set(model.finetuned)  # the fine-tuned CLIP baseline's image-tower parameters travel with the head
    head = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("clip.") or k in keep}
    atomic_write_bytes(directory / HEAD_NAME, save(head, metadata={"recipe": RECIPE_NAME}))
    atomic_write_bytes(directory / META_NAME, json_bytes(metadata))


def read_run_metadata(directory: str | Path) -> dict[str, Any]:
    """The ``fineclipper.json`` of a saved run, checked."""
    directory = Path(directory)
    path = directory / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a FineCLIPER run directory (expected {META_NAME}; "
                                "`mmadapters train fineclipper` writes it into OUTPUT/best/ and OUTPUT/last/)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("recipe") != RECIPE_NAME:
        raise ValueError(f"{path}: field 'recipe': expected {RECIPE_NAME!r}")
    for key, kind in (("classes", list), ("config", dict), ("clip", dict), ("num_frames", int)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{path}: field {key!r}: expected {kind.__name__}, got {meta.get(key)!r}")
    return meta


def load_clip_for_run(meta: dict[str, Any], *, device: str | torch.device = "cpu", cache_dir: str | None = None):
    """The CLIP bundle a saved run names (``meta`` from :func:`read_run_metadata`), with adapter points declared."""
    from mmadapters.vision.clip import load_clip

    clip_meta = meta["clip"]
    return load_clip(clip_meta.get("model"), clip_meta.get("pretrained"), device=device, cache_dir=cache_dir,
                     seed=clip_meta.get("seed") or 0)


def load_fineclipper_run(directory: str | Path, *, device: str | torch.device = "cpu", cache_dir: str | None = None,
                         bundle: Any = None) -> tuple[FineClipper, dict[str, Any]]:
    """(model in eval mode on ``device``, metadata) of a directory written by :func:`save_fineclipper_run`.

    The CLIP is ``bundle`` (a fresh :class:`~mmadapters.vision.clip.ClipBundle`, used up by the model) or the
    one the metadata names; its weights must hash as they did in training.
    """
    from safetensors.torch import load_file

    import mmadapters as mma

    directory = Path(directory)
    meta = read_run_metadata(directory)
    clip_meta = meta["clip"]
    if bundle is None:
        bundle = load_clip_for_run(meta, device=device, cache_dir=cache_dir)
    recorded = clip_meta.get("weights_sha256")
    if recorded and bundle.info.weights_sha256 != recorded:
        raise ValueError(f"{directory / META_NAME}: field 'clip.weights_sha256': the adapters were trained on CLIP weights "
                         f"{recorded[:12]}..., but {clip_meta.get('model') or 'the shipped tiny CLIP'} now hashes to "
                         f"{str(bundle.info.weights_sha256)[:12]}...")
    cfg = dict(meta["config"])
    for key in ("cues", "adapter_points", "finetune_params"):
        if key in cfg:  # runs saved before finetune_params keep its default, ()
            cfg[key] = tuple(cfg[key])
    model = FineClipper(bundle.model, bundle.tokenizer, meta["classes"], FineClipperConfig(**cfg))
    if model.config.adapter_dim > 0:
        mma.load_adapters(model.clip, directory, names=[ADAPTER_NAME], replace=True)
    head_path = directory / HEAD_NAME
    if not head_path.is_file():
        raise FileNotFoundError(f"{directory}: expected {HEAD_NAME} (the trained temporal encoder, cue encoders and gates, "
                                "and fine-tuned CLIP parameters if any)")
    head = load_file(str(head_path))
    expected = {k for k in model.state_dict() if not k.startswith("clip.")} | set(model.finetuned)
    if set(head) != expected:
        raise ValueError(f"{head_path}: tensors do not match the model built from {META_NAME}: missing "
                         f"{sorted(expected - set(head))[:5]}, unexpected {sorted(set(head) - expected)[:5]}")
    model.load_state_dict(head, strict=False)
    return model.to(device).eval(), meta


class FineClipperTask:
    """The engine's TrainTask for FineCLIPER: description-score cross-entropy, val UAR / WAR.

    ``metadata`` (:func:`run_metadata`) is what :func:`save_fineclipper_run` records next to the weights.
    """

    select_metric = "uar"
    select_mode = "max"

    def __init__(self, model: FineClipper, train: DferSplit, val: DferSplit, *, num_frames: int, metadata: dict[str, Any],
                 device: str | torch.device = "cpu", eval_batch_size: int = 32):
        self.model: nn.Module = model.to(device)
        self.train, self.val, self.device = train, val, torch.device(device)
        self.eval_batch_size, self.metadata = eval_batch_size, metadata
        self.batcher = Batcher(model, num_frames)
        if "description" in model.config.cues:  # once, in a fixed order: --resume sees the same features
            self.batcher.encode_descriptions(train.clips + val.clips)
        self.labels = torch.tensor([c.label for c in train.clips], dtype=torch.long)
        base = [(n, p) for n, p in model.clip.named_parameters() if ADAPTER_NAME not in n]
        self.backbone_parameters = sum(p.numel() for _, p in base)
        # a fine-tuned baseline's trainable CLIP tensors: counted once in the total (they are trainable and backbone)
        self.backbone_trainable = sum(p.numel() for _, p in base if p.requires_grad)
        self._train_mode()

    def _train_mode(self) -> None:
        self.model.train()
        self.model.clip.eval()  # the backbone keeps eval-mode behaviour (dropout off); adapters train

    def train_size(self) -> int:
        return len(self.train.clips)

    def get_batch(self, indices: list[int]) -> tuple[dict[str, Tensor], Tensor]:
        """(model inputs: frames (b, T, 3, H, W) uint8 and the cues, labels (b,)) with random TSN frames."""
        inputs = self.batcher([self.train.clips[i] for i in indices], training=True)
        return inputs, self.labels[indices].to(self.device)

    def loss(self, model: nn.Module, batch: tuple[dict[str, Tensor], Tensor]) -> Tensor:
        """Cross-entropy of the description scores (mean over the batch)."""
        inputs, labels = batch
        if not self.model.training or self.model.clip.training:
            self._train_mode()
        return F.cross_entropy(model(**inputs), labels)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """UAR and WAR on the validation clips (test-time TSN: the middle frame of each segment)."""
        from mmadapters.eval.metrics import uar, war

        self.model.eval()
        clips, step = self.val.clips, self.eval_batch_size
        with torch.random.fork_rng(devices=[]):  # leave the training stream's generator untouched
            pred = torch.cat([self.model(**self.batcher(clips[s:s + step], training=False)).argmax(1).cpu()
                              for s in range(0, len(clips), step)])
        self._train_mode()
        labels = torch.tensor([c.label for c in clips], dtype=torch.long)
        return {"uar": float(uar(labels, pred, len(self.model.classes))), "war": float(war(labels, pred))}

    def save(self, directory: Path) -> None:
        save_fineclipper_run(self.model, directory, self.metadata)

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": trainable + self.backbone_parameters - self.backbone_trainable,
                "backbone": self.backbone_parameters}


def run_metadata(config: FineClipperRecipeConfig, model: FineClipper, clip_info: dict[str, Any],
                 cues: Any = None) -> dict[str, Any]:
    """What ``fineclipper.json`` records; ``cue_source`` (:func:`~.realistic_cues.cue_record`) tells
    ``mmadapters eval dfer`` which cues the model was trained on (``cues``: the provider :meth:`cue_provider` built)."""
    from mmadapters import __version__

    from .realistic_cues import RealisticCues, cue_record

    source = cue_record(config.cue_source, cues if isinstance(cues, RealisticCues) else None)
    return {"recipe": RECIPE_NAME, "dataset": config.dataset, "classes": list(model.classes), "config": model.config.to_dict(),
            "clip": clip_info, "num_frames": config.num_frames, "cue_source": source, "baseline": config.baseline,
            "library_version": __version__}


def build_task(config: FineClipperRecipeConfig, trainer: Any) -> FineClipperTask:
    """The engine's entry point: read the clips and their cues, load CLIP, build the model (seeded)."""
    from mmadapters.distributed import device_for_rank
    from mmadapters.vision.clip import load_clip

    from .readers import DFER_DATASETS

    if not config.data_dir:
        raise ValueError("recipe.data_dir: the dataset root (frame folders, annotation/, cues/) is required")
    device = device_for_rank(trainer.device)
    train_file = Path(config.train_annotation) if config.train_annotation else default_annotation(config, "train")
    rows = annotation_rows(train_file, config)
    same = config.val_annotation is not None and Path(config.val_annotation).resolve() == train_file.resolve()
    if config.val_annotation is None:
        train_idx, val_idx = hold_out_per_class([y for _, y in rows], config.val_fraction, config.split_seed)
        rows, val_rows = [rows[i] for i in train_idx], [rows[i] for i in val_idx]
    else:
        val_rows = [] if same else annotation_rows(config.val_annotation, config)
    cues = config.cue_provider()
    needed = tuple(config.cues)
    train = load_split(rows, cues=cues, needed=needed, progress=False, desc="train clips")
    # validation on the training list reports training UAR/WAR (every clip trains; the clips are loaded once)
    val = train if same else load_split(val_rows, cues=cues, needed=needed, progress=False, desc="val clips")
    for name, split, source in (("training", train, train_file), ("validation", val, config.val_annotation or train_file)):
        if not split.clips:
            reasons = "; ".join(s["reason"] for s in split.skipped[:3])
            raise ValueError(f"{source}: the {name} split has no usable clip ({len(split.skipped)} skipped: {reasons})")
    landmarks = train.clips[0].landmarks
    num_landmarks = int(landmarks.shape[1]) if "landmarks" in needed and landmarks is not None else None
    bundle = load_clip(config.model, config.pretrained, device=device, cache_dir=config.cache_dir, seed=trainer.seed)
    clip_info = clip_identity(bundle.info.as_dict(), config.model, config.pretrained)
    if config.baseline == "finetune_clip":  # name the recipe's field when a pattern matches nothing
        from .fineclipper import finetuned_parameter_names

        try:
            finetuned_parameter_names(bundle.model.visual, config.finetune_params)
        except ValueError as e:
            raise ValueError(str(e).replace("FineClipperConfig.finetune_params", "recipe.finetune_params")) from None
    torch.manual_seed(trainer.seed)  # adapters, temporal encoder and cue encoders
    model = FineClipper(bundle.model, bundle.tokenizer, DFER_DATASETS[config.dataset], config.model_config(num_landmarks))
    return FineClipperTask(model, train, val, num_frames=config.num_frames, device=device,
                           eval_batch_size=config.eval_batch_size, metadata=run_metadata(config, model, clip_info, cues))


def _recipe():
    from mmadapters.training.recipe import Recipe

    return Recipe(
        name=RECIPE_NAME, config_class=FineClipperRecipeConfig, build_task=build_task,
        trainer_defaults={"lr": 3e-3, "batch_size": 16, "weight_decay": 0.01, "schedule": "cosine", "grad_clip": 1.0,
                          "select_metric": "uar", "select_mode": "max"},
        description="FineCLIPER (ACM MM'24): CLIP image-tower adapters + cue levels + pos/neg descriptions, DFER (UAR/WAR)")


def __getattr__(name: str) -> Any:
    # RECIPE is built on first access, so this module imports (and its task can be used) without the engine
    if name == "RECIPE":
        recipe = _recipe()
        globals()["RECIPE"] = recipe
        return recipe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
