"""Tem-Adapter (Chen et al., ICCV 2023): adapting frozen CLIP to video question answering.

The image–text model stays frozen; two small aligners learn on its features:

1. **Semantic Aligner** (:class:`SemanticAligner`). Each candidate answer — question and answer fused by
   a template, encoded by the frozen CLIP text tower — is refined by attending to its own video: the
   text feature is projected D -> D/4 (512 -> 128 for ViT-B/32), passes one pre-norm transformer decoder
   layer whose cross-attention reads the projected frame features, and is projected back to D as Δ.
   The aligned text is ``t' = t + γ ⊙ Δ`` with ``γ`` a learnable per-channel scale initialized to 1e-4,
   so training starts from CLIP's own text features.
2. **Temporal Aligner** (:class:`TemporalAligner`). Frame features get sinusoidal positions and one
   transformer encoder layer, giving the video embedding ``E`` (B, T, D). A causal transformer decoder,
   guided by the aligned text of the ground-truth answer (added to its memory), predicts the *next*
   frame's feature from the frames so far (auto-regressive future prediction; training only).
3. **Scores**: ``s_j = <t'_j, mean_t E>``; the prediction is the argmax over the candidates.
4. **Loss**: the multiple-choice hinge ``Σ_{j≠gt} max(0, 1 + s_j − s_gt)`` (summed over the batch,
   weight 0.01) plus the MSE between predicted and true future frame features.

Two flaws of the official code are reproduced behind flags (both off by default) for the ablation:

- ``official_repeat_pairing``: the official Semantic Aligner pairs the B·K flattened candidates with
  ``frames.repeat(K, 1, 1)``, so candidate row ``b·K + j`` attends to video ``(b·K + j) mod B`` — another
  question's video. The pairing the method needs is ``frames.repeat_interleave(K, dim=0)``
  (:func:`pair_with_videos`).
- ``official_unshifted_future``: the official decoder's target is the *same* frame sequence it is fed
  (output t compared with input t), so the "future" regression is a reconstruction the residual path
  solves. Here the decoder reads frames ``0..T-2`` and predicts frames ``1..T-1``.

Reading the method, note one more property we keep as the paper describes it: the decoder's memory is
the bidirectionally encoded video, so even with the shift, cross-attention can see frame t+1's encoding;
the future target is a regularizer on ``E`` more than a forecasting task.

Also here: :func:`frame_mean_scores` (the zero-shot baseline: cosine of the mean frame feature and each
candidate's text) and safetensors save/load. Training is ``mmadapters train tem-adapter``
(:mod:`mmadapters.video.tem_train`); the features come from :mod:`mmadapters.video.qa_features`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class TemAdapterConfig:
    """Sizes and switches of the two aligners and the loss. ``dim`` is the CLIP embedding size D."""

    dim: int = 512
    semantic_width: int | None = field(default=None, metadata={"help": "Semantic Aligner width (None: dim // 4)"})
    semantic_heads: int = field(default=4, metadata={"help": "heads of the Semantic Aligner's decoder layer"})
    semantic_dropout: float = 0.2
    temporal_heads: int = field(default=8, metadata={"help": "heads of the Temporal Aligner's encoder/decoder"})
    temporal_dropout: float = 0.1
    feedforward_mult: int = 4
    max_frames: int = 1024
    gamma_init: float = field(default=1e-4, metadata={"help": "initial value of the per-channel scale γ"})
    margin: float = 1.0
    hinge_weight: float = field(default=0.01, metadata={"help": "weight of the multiple-choice hinge loss"})
    future_weight: float = field(default=1.0, metadata={"help": "weight of the future-feature MSE"})
    official_repeat_pairing: bool = field(default=False, metadata={
        "help": "official-code bug: pair candidates with videos by repeat (wrong videos) instead of repeat_interleave"})
    official_unshifted_future: bool = field(default=False, metadata={
        "help": "official-code bug: regress the decoder's own input frames instead of the next frames"})

    def __post_init__(self) -> None:
        width = self.width
        if self.dim < 1 or width < 1:
            raise ValueError(f"TemAdapterConfig: dim ({self.dim}) and semantic_width ({width}) must be >= 1")
        if width % self.semantic_heads:
            raise ValueError(f"TemAdapterConfig field 'semantic_heads': {self.semantic_heads} does not divide the "
                             f"Semantic Aligner width {width}")
        if self.dim % self.temporal_heads:
            raise ValueError(f"TemAdapterConfig field 'temporal_heads': {self.temporal_heads} does not divide dim "
                             f"{self.dim}")

    @property
    def width(self) -> int:
        return self.semantic_width if self.semantic_width is not None else max(self.dim // 4, 1)

    @classmethod
    def for_dim(cls, dim: int, **overrides: Any) -> TemAdapterConfig:
        """A config for embedding size ``dim`` whose head counts fit it as the official ones fit D = 512.

        Heads: the most of 16, 8, 4, 2, 1 that divide the width and keep heads at least as wide as the
        official code's (128 / 16 = 8 in the Semantic Aligner, 512 / 16 = 32 in the Temporal Aligner).
        """
        width = overrides.get("semantic_width") or max(dim // 4, 1)
        overrides.setdefault("semantic_heads", _heads_for(width, min_head_dim=8))
        overrides.setdefault("temporal_heads", _heads_for(dim, min_head_dim=32))
        return cls(dim=dim, **overrides)


def _heads_for(width: int, min_head_dim: int) -> int:
    return next((h for h in (16, 8, 4, 2) if width % h == 0 and width // h >= min_head_dim), 1)


def pair_with_videos(videos: Tensor, num_candidates: int, *, official_repeat: bool = False) -> Tensor:
    """Repeat per-video tensors ``(B, ...)`` to one row per candidate ``(B·K, ...)``.

    Candidates are flattened video-major (row ``b·K + j`` is candidate j of question b), so row
    ``b·K + j`` must hold video b: ``repeat_interleave``. ``official_repeat=True`` reproduces the official
    code's ``repeat``, which gives row i the video ``i mod B``.
    """
    if official_repeat:
        return videos.repeat(num_candidates, *([1] * (videos.dim() - 1)))
    return videos.repeat_interleave(num_candidates, dim=0)


class PreNormDecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: x += SA(LN x); x += CA(LN x, memory); x += MLP(LN x)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1, mlp_mult: int = 4):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width * mlp_mult), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(width * mlp_mult, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        """``x`` (N, L, W) queries, ``memory`` (N, M, W) -> (N, L, W)."""
        h = self.norm_self(x)
        x = x + self.dropout(self.self_attn(h, h, h, need_weights=False)[0])
        h = self.norm_cross(x)
        x = x + self.dropout(self.cross_attn(h, memory, memory, need_weights=False)[0])
        return x + self.dropout(self.mlp(self.norm_mlp(x)))


class SemanticAligner(nn.Module):
    """Refines candidate text features with their video: ``t' = t + γ ⊙ Δ(t, frames)``."""

    def __init__(self, dim: int, width: int | None = None, heads: int = 4, dropout: float = 0.2,
                 gamma_init: float = 1e-4, mlp_mult: int = 4):
        super().__init__()
        width = width or max(dim // 4, 1)
        self.visual_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.LayerNorm(width))
        self.text_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.decoder = PreNormDecoderLayer(width, heads, dropout, mlp_mult)
        self.out_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))
        self.apply(_init_small)

    def forward(self, text: Tensor, frames: Tensor, *, official_repeat: bool = False) -> Tensor:
        """``text`` (B, K, D) candidate features, ``frames`` (B, T, D) -> aligned text (B, K, D)."""
        b, k, d = text.shape
        if frames.shape[0] != b or frames.shape[-1] != d:
            raise ValueError(f"SemanticAligner: text {tuple(text.shape)} and frames {tuple(frames.shape)} disagree "
                             "on batch size or feature size")
        queries = text.reshape(b * k, 1, d)
        memory = pair_with_videos(self.visual_proj(frames), k, official_repeat=official_repeat)  # (B·K, T, W)
        delta = self.out_proj(self.decoder(self.text_proj(queries), memory))  # (B·K, 1, D)
        return (queries + self.gamma * delta).reshape(b, k, d)


class SinusoidalPositions(nn.Module):
    """Adds the fixed sin/cos position code of "Attention is all you need" to (B, T, D), then dropout."""

    def __init__(self, dim: int, dropout: float = 0.1, max_len: int = 1024):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2] = torch.sin(position * div)
        table[:, 1::2] = torch.cos(position * div)[:, : dim // 2]
        self.register_buffer("table", table, persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > self.table.shape[0]:
            raise ValueError(f"{x.shape[1]} frames: more than max_frames={self.table.shape[0]} positions")
        return self.dropout(x + self.table[: x.shape[1]].to(x.dtype))


@dataclass
class TemporalOutput:
    embedding: Tensor  # E (B, T, D)
    prediction: Tensor | None = None  # (B, T', D): decoder outputs
    target: Tensor | None = None  # (B, T', D): the frame features they regress


class TemporalAligner(nn.Module):
    """Encoder over frames (-> E) and a text-guided causal decoder predicting the next frame's feature."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1, max_frames: int = 1024, ff_mult: int = 4):
        super().__init__()
        self.positions = SinusoidalPositions(dim, dropout, max_frames)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, dim * ff_mult, dropout, batch_first=True)
        self.decoder = nn.TransformerDecoderLayer(dim, heads, dim * ff_mult, dropout, batch_first=True)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, frames: Tensor, guide: Tensor | None = None, *, official_unshifted: bool = False) -> TemporalOutput:
        """``frames`` (B, T, D); ``guide`` (B, D) the aligned ground-truth answer (None: encode only)."""
        x = self.positions(frames)
        embedding = self.encoder(x)
        if guide is None:
            return TemporalOutput(embedding)
        if official_unshifted:
            inputs, target = x, frames  # output t regresses input t: no future in it
        else:
            if frames.shape[1] < 2:
                raise ValueError("TemporalAligner: predicting the next frame needs at least 2 frames per video")
            inputs, target = x[:, :-1], frames[:, 1:]  # output t (frames <= t) regresses frame t + 1
        causal = nn.Transformer.generate_square_subsequent_mask(inputs.shape[1], device=frames.device, dtype=x.dtype)
        memory = embedding + guide[:, None, :]
        prediction = self.decoder(inputs, memory, tgt_mask=causal, tgt_is_causal=True)
        return TemporalOutput(embedding, prediction, target)


@dataclass
class TemAdapterOutput:
    scores: Tensor  # (B, K) s_j = <t'_j, mean_t E>, masked candidates at -inf
    aligned_text: Tensor  # (B, K, D) t'
    video: Tensor  # (B, D) mean_t E
    prediction: Tensor | None = None  # (B, T', D)
    target: Tensor | None = None  # (B, T', D)


class TemAdapter(nn.Module):
    """Semantic Aligner + Temporal Aligner on frozen CLIP features (see the module docstring)."""

    def __init__(self, config: TemAdapterConfig):
        super().__init__()
        self.config = config
        self.semantic = SemanticAligner(config.dim, config.width, config.semantic_heads, config.semantic_dropout,
                                        config.gamma_init, config.feedforward_mult)
        self.temporal = TemporalAligner(config.dim, config.temporal_heads, config.temporal_dropout,
                                        config.max_frames, config.feedforward_mult)

    def forward(self, frames: Tensor, candidates: Tensor, answer: Tensor | None = None,
                mask: Tensor | None = None) -> TemAdapterOutput:
        """``frames`` (B, T, D), ``candidates`` (B, K, D) text features, ``answer`` (B,) ground-truth index
        (given in training: it guides the future prediction), ``mask`` (B, K) True for real candidates."""
        cfg = self.config
        aligned = self.semantic(candidates, frames, official_repeat=cfg.official_repeat_pairing)
        guide = None if answer is None else aligned[torch.arange(len(answer), device=aligned.device), answer]
        temporal = self.temporal(frames, guide, official_unshifted=cfg.official_unshifted_future)
        video = temporal.embedding.mean(dim=1)
        scores = torch.einsum("bkd,bd->bk", aligned, video)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return TemAdapterOutput(scores, aligned, video, temporal.prediction, temporal.target)

    def loss(self, output: TemAdapterOutput, answer: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
        """{"loss": w_h·hinge + w_f·future_mse, "hinge", "future_mse"} (scalars)."""
        hinge = multiple_choice_hinge(output.scores, answer, self.config.margin, mask)
        if output.prediction is None:
            future = output.scores.new_zeros(())
        else:
            future = F.mse_loss(output.prediction, output.target)
        total = self.config.hinge_weight * hinge + self.config.future_weight * future
        return {"loss": total, "hinge": hinge, "future_mse": future}


def multiple_choice_hinge(scores: Tensor, answer: Tensor, margin: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """``Σ_b Σ_{j≠gt_b} max(0, margin + s_bj − s_b,gt)`` for ``scores`` (B, K), ``answer`` (B,).

    Summed over the batch as the official code does (the 0.01 weight was set for that). The official sum
    also runs over j = gt, which adds exactly ``margin`` per question — a constant with no gradient — so
    the values differ by ``B·margin`` and training is the same. Masked-out candidates (``mask`` False)
    contribute nothing.
    """
    gt = scores.gather(1, answer[:, None])  # (B, 1)
    terms = (margin + scores - gt).clamp(min=0)
    keep = F.one_hot(answer, scores.shape[1]) == 0
    if mask is not None:
        keep = keep & mask
    return torch.where(keep, terms, torch.zeros_like(terms)).sum()


def frame_mean_scores(frames: Tensor, candidates: Tensor, mask: Tensor | None = None) -> Tensor:
    """Zero-shot CLIP baseline: cosine of the mean frame feature (B, T, D) with each candidate (B, K, D) -> (B, K)."""
    video = F.normalize(frames.float().mean(dim=1), dim=-1)
    scores = torch.einsum("bkd,bd->bk", F.normalize(candidates.float(), dim=-1), video)
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def save_tem_adapter(model: TemAdapter, path: str | Path) -> None:
    """Weights as safetensors with the config in the file's metadata (written atomically)."""
    from safetensors.torch import save

    from mmadapters.io import atomic_write_bytes

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(path), save(state, metadata={"tem_adapter_config": json.dumps(asdict(model.config))}))


def load_tem_adapter(path: str | Path) -> TemAdapter:
    """A model saved by :func:`save_tem_adapter` (safetensors only; nothing is unpickled)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = (f.metadata() or {}).get("tem_adapter_config")
    if meta is None:
        raise ValueError(f"{path}: no 'tem_adapter_config' in the safetensors metadata; not a Tem-Adapter file")
    known = {f.name for f in fields(TemAdapterConfig)}
    model = TemAdapter(TemAdapterConfig(**{k: v for k, v in json.loads(meta).items() if k in known}))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def _init_small(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights and zero biases, unit LayerNorms (the aligner's init)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
