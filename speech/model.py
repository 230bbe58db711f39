"""The cascaded Conformer transducer: a causal streaming first pass, a non-causal second pass, one decoder.

::

    waves (B, S) ─ FeatureFrontend ─ SpecAugment (training) ─ CausalConformer ─► enc1 (B, T, E) ─┐
                                                              NonCausalConformer(enc1) ─► enc2 ─┤
    tokens (B, U) ─ Predictor (embedding + LSTM) ─► pred (B, U, P) ──────────────────── Joiner ◄┘ ─► (B, T, U, V)

Training minimizes ``w1 * rnnt(enc1) + w2 * rnnt(enc2)`` (``torchaudio.functional.rnnt_loss``, blank 0,
float32 logits). The first pass streams (:meth:`CascadedTransducer.stream`); the second pass re-encodes
the whole utterance for a better final transcript. Both are decoded by the same predictor and joiner.

Adapter points (:func:`declare_asr_points`), for both passes with ``first_``/``second_`` prefixes and
unprefixed names covering both: ``attn_out`` (self-attention output), ``ffn_out`` (second feed-forward),
``block_out`` (end of each block), ``attn`` (attention projections, for LoRA); plus ``predictor_out``
(LSTM output) and ``joiner_in`` (the joiner's two input projections). The second pass's torchaudio layers
are time-major, so their points declare ``batch_dim=1``.

A model directory (:func:`save_asr` / :func:`load_asr`): ``config.json``, ``model.safetensors`` and the
tokenizer's files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchaudio
from torch import Tensor, nn

import mmadapters as mma
from mmadapters.io import atomic_write_bytes

from .conformer import CausalConformer, ConformerStream, NonCausalConformer
from .features import FeatureFrontend, FeatureStream, SpecAugment
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer

TINY_ASR_DIR = Path(__file__).resolve().parent / "assets" / "tiny_asr"
# the shipped foundation's LDA language adapters (scripts/run_lda.py --ship): mma.load_adapters(model, TINY_ASR_LDA_DIR)
TINY_ASR_LDA_DIR = TINY_ASR_DIR.parent / "tiny_asr_lda"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
LDA_FRACTION = 0.004  # the LDA paper's adapter size per language: 0.4% of the model


@dataclass
class TransducerConfig:
    """Every size and setting of a :class:`CascadedTransducer` (saved as ``config.json``)."""

    vocab_size: int = field(metadata={"help": "Output ids including the blank (id 0)."})
    # features
    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    # SpecAugment (training only)
    freq_masks: int = 2
    freq_mask_param: int = 27
    time_masks: int = 2
    time_mask_param: int = 100
    time_mask_p: float = 0.2
    freq_warp: float = field(default=0.0, metadata={"help": "Mel-axis stretch of up to +-w per training sample "
                                                             "(vocal tract length perturbation; 0: off)."})
    # first pass: causal streaming Conformer
    subsampling_channels: int = 64
    d_model: int = field(default=144, metadata={"help": "Width E of the first pass and of both passes' outputs."})
    first_layers: int = 6
    first_heads: int = 4
    first_ffn_dim: int = 288
    first_kernel_size: int = 15
    chunk_size: int = field(default=4, metadata={"help": "Attention chunk in encoder frames (40 ms each)."})
    left_chunks: int = field(default=8, metadata={"help": "Previous chunks a frame attends to (-1: all)."})
    # second pass: torchaudio Conformer
    second_d_model: int = 144
    second_layers: int = 2
    second_heads: int = 4
    second_ffn_dim: int = 288
    second_kernel_size: int = 15
    # decoder
    pred_embed_dim: int = 128
    pred_dim: int = 160
    pred_layers: int = 1
    joint_dim: int = 192
    dropout: float = 0.1
    # loss
    loss_weight_first: float = 0.5
    loss_weight_second: float = 0.5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"TransducerConfig.{f.name}: expected an integer, got {value!r}")
            if f.type == "float" and not isinstance(value, int | float):
                raise ValueError(f"TransducerConfig.{f.name}: expected a number, got {value!r}")
        positive = ("vocab_size", "sample_rate", "n_mels", "n_fft", "win_length", "hop_length", "subsampling_channels",
                    "d_model", "first_layers", "first_heads", "first_ffn_dim", "first_kernel_size", "chunk_size",
                    "second_d_model", "second_heads", "second_ffn_dim", "second_kernel_size", "pred_embed_dim",
                    "pred_dim", "pred_layers", "joint_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TransducerConfig.{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.vocab_size < 2:
            raise ValueError(f"TransducerConfig.vocab_size: expected at least 2 (blank + one token), got {self.vocab_size}")
        if self.second_layers < 0:
            raise ValueError(f"TransducerConfig.second_layers: expected >= 0, got {self.second_layers}")
        if self.second_kernel_size % 2 == 0:
            raise ValueError(f"TransducerConfig.second_kernel_size: torchaudio's Conformer needs an odd kernel, "
                             f"got {self.second_kernel_size}")
        if not 0.0 <= self.freq_warp < 0.5:
            raise ValueError(f"TransducerConfig.freq_warp: expected a value in [0, 0.5), got {self.freq_warp!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransducerConfig.dropout: expected a value in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "TransducerConfig") -> TransducerConfig:
        """Build from a dict; unknown or missing fields raise naming ``source`` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of model settings, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; expected fields of TransducerConfig")
        if "vocab_size" not in data:
            raise ValueError(f"{source}: missing field 'vocab_size'")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "TransducerConfig") -> TransducerConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: not valid JSON ({err})") from None
        return cls.from_dict(data, source)


def tiny_asr_config(vocab_size: int, **overrides: Any) -> TransducerConfig:
    """A few-thousand-parameter config for tests (every part present, tiny widths; no dropout)."""
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size, subsampling_channels=4, d_model=16, first_layers=2, first_heads=2, first_ffn_dim=32,
        first_kernel_size=3, chunk_size=2, left_chunks=2, second_d_model=16, second_layers=1, second_heads=2,
        second_ffn_dim=32, second_kernel_size=3, pred_embed_dim=16, pred_dim=16, joint_dim=16, dropout=0.0,
        freq_mask_param=10, time_mask_param=10)
    settings.update(overrides)
    return TransducerConfig(**settings)


class Predictor(nn.Module):
    """Label predictor: embedding (the blank, id 0, is the start symbol) + LSTM.

    ``forward(tokens (B, U) long, state=None) -> (pred (B, U, P), state)``; ``state = (h, c)``, each
    (layers, B, P)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        emb = self.embedding(tokens)
        if emb.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # oneDNN builds a bf16 LSTM only on CPUs with native bf16 (AVX512-BF16, AMX); elsewhere it raises "could
            # not create a primitive descriptor". The LSTM is a small share of the work: run it in float32.
            with torch.autocast("cpu", enabled=False):
                out, state = self.lstm(emb.float(), None if state is None else (state[0].float(), state[1].float()))
        else:
            out, state = self.lstm(emb, state)
        return self.dropout(out), state


JOINT_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}


class Joiner(nn.Module):
    """``out(act(enc_proj(enc) + pred_proj(pred)))``, ``act`` tanh (ours) or relu / sigmoid (NeMo's ``RNNTJoint``).

    Both 3-D, ``enc (B, T, E)`` and ``pred (B, U, P)`` -> logits ``(B, T, U, V)`` (every pair). Otherwise the
    projections broadcast as they are: e.g. ``enc (B, T, 1, E)`` with ``pred (B, 1, U, P)``, or ``(B, E)`` with
    ``(B, P)`` -> ``(B, V)`` for one decoding step."""

    def __init__(self, enc_dim: int, pred_dim: int, joint_dim: int, vocab_size: int, activation: str = "tanh"):
        super().__init__()
        if activation not in JOINT_ACTIVATIONS:
            raise ValueError(f"Joiner: activation must be one of {sorted(JOINT_ACTIVATIONS)}, got {activation!r}")
        self.enc_proj = nn.Linear(enc_dim, joint_dim)
        self.pred_proj = nn.Linear(pred_dim, joint_dim)
        self.out = nn.Linear(joint_dim, vocab_size)
        self.activation = JOINT_ACTIVATIONS[activation]

    def forward(self, enc: Tensor, pred: Tensor) -> Tensor:
        e, p = self.enc_proj(enc), self.pred_proj(pred)
        if e.dim() == 3 and p.dim() == 3:
            e, p = e.unsqueeze(2), p.unsqueeze(1)
        return self.out(self.activation(e + p))


class EncoderStream:
    """First-pass streaming for ``B`` synchronous streams (all rows advance by the same samples).

    ``push(wave_chunk (B, s)) -> (B, t, E)``: the first-pass frames that became final (a whole number of
    attention chunks); ``flush() -> (B, r, E)``: the rest, at the end of the audio. However the audio is
    cut, the frames concatenated equal ``model.encode(waves, lengths, "first")``; the second pass at the end
    of an utterance is ``model.second(frames, lengths)``. Modules run in the mode they are in: call
    ``model.eval()`` first (dropout would make frames random), and push under ``torch.no_grad()`` (the
    caches would otherwise keep autograd graphs)."""

    def __init__(self, model: CascadedTransducer, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"EncoderStream.batch_size: expected a positive number of streams, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.features = FeatureStream(model.frontend, batch_size)
        self.encoder = ConformerStream(model.first, batch_size)
        self.samples_in = 0
        self.frames_out = 0
        self.finished = False

    def push(self, wave_chunk: Tensor) -> Tensor:
        if self.finished:
            raise RuntimeError("EncoderStream.push: the stream was flushed; start a new one with model.stream()")
        if wave_chunk.dim() == 1 and self.batch_size == 1:
            wave_chunk = wave_chunk[None]
        self.samples_in += wave_chunk.shape[-1]
        frames = self.encoder.push(self.features.push(wave_chunk))
        self.frames_out += frames.shape[1]
        return frames

    def flush(self) -> Tensor:
        if self.finished:
            raise RuntimeError("EncoderStream.flush: the stream was already flushed")
        self.finished = True
        last = self.features.flush()
        frames = [self.encoder.push(last)] if last.shape[1] else []
        frames.append(self.encoder.flush())
        out = torch.cat(frames, dim=1)
        self.frames_out += out.shape[1]
        return out


class CascadedTransducer(nn.Module):
    """The model (see the module docstring). ``blank = 0``; ``config`` is its :class:`TransducerConfig`."""

    blank = 0

    def __init__(self, config: TransducerConfig):
        super().__init__()
        c = self.config = config
        self.frontend = FeatureFrontend(c.sample_rate, c.n_mels, c.n_fft, c.win_length, c.hop_length)
        self.spec_augment = SpecAugment(c.freq_masks, c.freq_mask_param, c.time_masks, c.time_mask_param, c.time_mask_p,
                                        c.freq_warp)
        self.first = CausalConformer(c.n_mels, c.d_model, c.first_layers, c.first_heads, c.first_ffn_dim,
                                     c.first_kernel_size, c.chunk_size, c.left_chunks, c.subsampling_channels, c.dropout)
        self.second = NonCausalConformer(c.d_model, c.second_d_model, c.second_layers, c.second_heads, c.second_ffn_dim,
                                         c.second_kernel_size, c.dropout)
        self.predictor = Predictor(c.vocab_size, c.pred_embed_dim, c.pred_dim, c.pred_layers, c.dropout)
        self.joiner = Joiner(c.d_model, c.pred_dim, c.joint_dim, c.vocab_size)
        declare_asr_points(self)

    # -- encoders ------------------------------------------------------------------------------------------
    def encode(self, waves: Tensor, wave_lengths: Tensor, pass_: str = "second") -> tuple[Tensor, Tensor]:
        """``waves (B, S)``, ``wave_lengths (B,)`` -> ``(enc (B, T, E), enc_lengths (B,))`` of the ``"first"``
        (causal, streaming) or ``"second"`` (non-causal) pass. No SpecAugment (that is :meth:`forward`'s)."""
        if pass_ not in ("first", "second"):
            raise ValueError(f"encode: pass_ must be 'first' or 'second', got {pass_!r}")
        feats, feat_lengths = self.frontend(waves, wave_lengths)
        enc, lengths = self.first(feats, feat_lengths)
        if pass_ == "second":
            enc, lengths = self.second(enc, lengths)
        return enc, lengths

    def encode_both(self, waves: Tensor, wave_lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """-> ``(enc_first (B, T, E), enc_second (B, T, E), enc_lengths (B,))`` in one run of the first pass."""
        feats, feat_lengths = self.frontend(waves, wave_lengths)
        enc1, lengths = self.first(feats, feat_lengths)
        enc2, _ = self.second(enc1, lengths)
        return enc1, enc2, lengths

    def stream(self, batch_size: int = 1) -> EncoderStream:
        """A first-pass :class:`EncoderStream` for ``batch_size`` synchronous streams."""
        return EncoderStream(self, batch_size)

    # -- decoder ---------------------------------------------------------------------------------------------
    def predict(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``tokens (B, U) long`` -> ``(pred (B, U, P), state)``. Feed the blank (0) as the start token."""
        return self.predictor(tokens, state)

    def joint(self, enc: Tensor, pred: Tensor) -> Tensor:
        """Joiner logits: ``enc (B, T, E)``, ``pred (B, U, P)`` -> ``(B, T, U, V)``; other shapes broadcast (see :class:`Joiner`)."""
        return self.joiner(enc, pred)

    # -- training ---------------------------------------------------------------------------------------------
    def forward(self, waves: Tensor, wave_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> dict[str, Tensor]:
        """Transducer loss on both passes.

        ``waves (B, S)``, ``wave_lengths (B,)``, ``targets (B, U)`` token ids padded with 0, ``target_lengths (B,)``
        -> ``{"loss", "loss_first", "loss_second"}`` (scalars; each pass's loss is the batch mean)."""
        if targets.dim() != 2 or targets.shape[0] != waves.shape[0]:
            raise ValueError(f"forward: targets must be (B, U) with B={waves.shape[0]}, got {tuple(targets.shape)}")
        feats, feat_lengths = self.frontend(waves, wave_lengths)
        feats = self.spec_augment(feats)
        enc1, lengths = self.first(feats, feat_lengths)
        if bool((lengths < 1).any()):
            bad = int((lengths < 1).nonzero()[0, 0])
            raise ValueError(f"forward: sample {bad} has {int(wave_lengths[bad])} samples, too short for one encoder frame")
        targets = targets.long()
        if targets.numel() and (int(targets.max()) >= self.config.vocab_size or int(targets.min()) < 0):
            raise ValueError(f"forward: target ids must lie in [0, {self.config.vocab_size}), got "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        start = torch.full((targets.shape[0], 1), self.blank, dtype=torch.long, device=targets.device)
        pred, _ = self.predictor(torch.cat([start, targets], dim=1))  # (B, U + 1, P)
        out = {"loss_first": self._rnnt(enc1, lengths, pred, targets, target_lengths)}
        if self.config.second_layers > 0 or self.config.loss_weight_second:
            enc2, _ = self.second(enc1, lengths)
            out["loss_second"] = self._rnnt(enc2, lengths, pred, targets, target_lengths)
        else:
            out["loss_second"] = out["loss_first"].new_zeros(())
        out["loss"] = self.config.loss_weight_first * out["loss_first"] + self.config.loss_weight_second * out["loss_second"]
        return out

    def _rnnt(self, enc: Tensor, enc_lengths: Tensor, pred: Tensor, targets: Tensor, target_lengths: Tensor) -> Tensor:
        logits = self.joiner(enc, pred).float()  # (B, T, U + 1, V); rnnt_loss wants float32
        return torchaudio.functional.rnnt_loss(logits, targets.int(), enc_lengths.int(), target_lengths.int(),
                                               blank=self.blank, reduction="mean")


def declare_asr_points(model: CascadedTransducer) -> CascadedTransducer:
    """Declare the adapter points (see the module docstring) on ``model``, its passes and its decoder."""
    d, d2 = model.config.d_model, model.config.second_d_model
    first = {
        "attn_out": mma.AdapterPoint("re:layers\\.\\d+\\.attn", dim=d, doc="self-attention output (B, T, D)"),
        "ffn_out": mma.AdapterPoint("re:layers\\.\\d+\\.ffn2", dim=d, doc="second feed-forward output (B, T, D)"),
        "block_out": mma.AdapterPoint("re:layers\\.\\d+", dim=d, doc="end of each causal Conformer block (B, T, D)"),
        "attn": mma.AdapterPoint(["re:layers\\.\\d+\\.attn\\.qkv", "re:layers\\.\\d+\\.attn\\.out"],
                                 doc="attention projections (LoRA)"),
    }
    layers = "re:conformer\\.conformer_layers\\.\\d+"
    second = {
        "attn_out": mma.AdapterPoint(f"{layers}\\.self_attn", dim=d2, batch_dim=1,
                                     doc="self-attention output (T, B, D), torchaudio MultiheadAttention"),
        "ffn_out": mma.AdapterPoint(f"{layers}\\.ffn2", dim=d2, batch_dim=1, doc="second feed-forward output (T, B, D)"),
        "block_out": mma.AdapterPoint(layers, dim=d2, batch_dim=1, doc="end of each torchaudio ConformerLayer (T, B, D)"),
        "attn": mma.AdapterPoint(f"{layers}\\.self_attn", batch_dim=1, doc="nn.MultiheadAttention (LoRA on in_proj/out_proj)"),
    }
    mma.declare_adapter_points(model.first, {**first, **{f"first_{k}": v for k, v in first.items()}})
    if model.config.second_layers > 0:
        mma.declare_adapter_points(model.second, {**second, **{f"second_{k}": v for k, v in second.items()}})
    mma.declare_adapter_points(model, {
        "predictor_out": mma.AdapterPoint("predictor.lstm", dim=model.config.pred_dim, doc="LSTM output (B, U, P)"),
        "joiner_in": mma.AdapterPoint(["joiner.enc_proj", "joiner.pred_proj"], doc="the joiner's input projections"),
    })
    return model


# -- sizes -------------------------------------------------------------------------------------------------------
def parameter_counts(model: nn.Module, fraction: float = LDA_FRACTION) -> dict[str, int]:
    """Base parameters per part (``frontend``, ``first``, ``second``, ``predictor``, ``joiner``), their ``total``
    and ``adapter_budget``: ``fraction`` of the total (default 0.4%, the LDA paper's size per language).
    Adapter parameters (if any are attached) are not counted."""
    from mmadapters.targets import SHARED_ATTR, iter_logical_modules

    counts: dict[str, int] = {name: 0 for name, _ in model.named_children() if name != SHARED_ATTR}
    seen: set[int] = set()
    for name, module, _parent, _attr in iter_logical_modules(model):
        if SHARED_ATTR in name.split("."):
            continue
        part = name.split(".", 1)[0] if name else "other"
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                counts[part] = counts.get(part, 0) + p.numel()
    counts["total"] = sum(counts.values())
    counts["adapter_budget"] = int(counts["total"] * fraction)
    return counts


# -- model directories ---------------------------------------------------------------------------------------
@dataclass
class AsrBundle:
    """A loaded ASR model: ``model`` (eval mode), its ``tokenizer`` and ``config``; ``path`` it came from."""

    model: CascadedTransducer
    tokenizer: Tokenizer
    config: TransducerConfig
    path: Path | None = None


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The backbone's own parameters and persistent buffers under their original names (adapter wrappers
    seen through, adapters and shared adapter modules left out). Raises if adapters are merged in."""
    return _base_tensors(model)[0]


def _base_tensors(model: nn.Module) -> tuple[dict[str, Tensor], set[str]]:
    """(base state dict, names in it that are parameters)."""
    from mmadapters.model import state_of
    from mmadapters.targets import iter_logical_modules

    if state_of(model).merged is not None:
        raise ValueError("base_state_dict: adapters are merged into the base weights; call mma.unmerge(model) first")
    out: dict[str, Tensor] = {}
    params: set[str] = set()
    for name, module, _parent, _attr in iter_logical_modules(model):
        prefix = f"{name}." if name else ""
        for pname, p in module.named_parameters(recurse=False):
            out[prefix + pname] = p.detach()
            params.add(prefix + pname)
        for bname, b in module.named_buffers(recurse=False):
            if b is not None and bname not in module._non_persistent_buffers_set:
                out[prefix + bname] = b.detach()
    return out, params


def save_asr(directory: str | os.PathLike, model: CascadedTransducer, tokenizer: Tokenizer, *, fp16: bool = False) -> Path:
    """Write ``config.json``, ``model.safetensors`` (float parameters in float16 with ``fp16``; buffers such as
    the CMVN statistics stay float32) and the tokenizer's files into ``directory``. Each file is written
    atomically; ``config.json`` last, so a directory with a config is complete. Adapters are not saved
    (use :func:`mmadapters.save_adapters`)."""
    from safetensors.torch import save as st_save

    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"save_asr: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, params = _base_tensors(model)
    tensors = {}
    for name, t in state.items():
        t = t.detach().cpu()
        if fp16 and name in params and t.is_floating_point():
            t = t.half()
        tensors[name] = t.contiguous().clone()
    atomic_write_bytes(directory / WEIGHTS_NAME, st_save(tensors))
    tokenizer.save(directory)
    meta = {"architecture": "CascadedTransducer", "format_version": FORMAT_VERSION,
            "weights": WEIGHTS_NAME, "weights_dtype": "float16" if fp16 else "float32",
            "parameters": sum(state[n].numel() for n in params),
            "config": model.config.to_dict()}
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(meta, indent=1).encode())
    return directory


def resolve_asr_dir(directory: str | os.PathLike | None) -> Path:
    """``None`` -> the shipped tiny model (with a clear error when it has not been created yet)."""
    if directory is not None:
        return Path(directory)
    if not (TINY_ASR_DIR / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"the shipped tiny ASR model is missing: expected {TINY_ASR_DIR / CONFIG_NAME} with its weights and "
            "tokenizer. Pass a model directory (--model DIR), or create it with scripts/pretrain_tiny_asr.py")
    return TINY_ASR_DIR


def load_asr(directory: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> AsrBundle:
    """Load a model directory written by :func:`save_asr` (``None``: the shipped tiny model), a transformers
    Parakeet RNN-T / TDT folder (:func:`mmadapters.speech.parakeet.load_parakeet`, a ``ParakeetBundle``) or a NeMo
    cache-aware streaming FastConformer ``.nemo`` file (:func:`mmadapters.speech.nemo.load_nemo`, a ``NemoBundle``) in
    eval mode, float32, on ``device``. Missing or corrupt files raise errors that name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    directory = resolve_asr_dir(directory)
    if directory.suffix == ".nemo" and not directory.is_dir():
        from .nemo import load_nemo

        return load_nemo(directory, device=device)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: ASR model directory not found")
    from .parakeet import load_parakeet, parakeet_model_type

    if parakeet_model_type(directory) is not None:
        return load_parakeet(directory, device=device)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: model config not found (a directory written by save_asr has one)")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("architecture") != "CascadedTransducer":
        raise ValueError(f"{config_path}: field 'architecture' must be 'CascadedTransducer' (not a save_asr config)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: field 'format_version' is {meta.get('format_version')!r}; this library reads {FORMAT_VERSION}")
    config = TransducerConfig.from_dict(meta.get("config"), f"{config_path}: field 'config'")
    weights_name = meta.get("weights", WEIGHTS_NAME)
    if not isinstance(weights_name, str) or Path(weights_name).name != weights_name:
        raise ValueError(f"{config_path}: field 'weights' must be a file name in the same directory, got {weights_name!r}")
    weights_path = directory / weights_name
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: model weights not found (named by {config_path})")
    try:
        tensors = st_load(weights_path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err})") from None
    try:
        tokenizer = load_tokenizer(directory)
    except TokenizerError as err:
        raise ValueError(f"ASR model {directory}: {err}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but {config_path} says vocab_size "
                         f"{config.vocab_size}")
    model = CascadedTransducer(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: tensors do not match {config_path}: missing {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"{weights_path}: tensor {name!r} has shape {tuple(t.shape)}, the config needs "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict({n: t.to(expected[n].dtype) for n, t in tensors.items()})
    model.to(device).eval()
    return AsrBundle(model, tokenizer, config, directory)


__all__ = ["CONFIG_NAME", "LDA_FRACTION", "TINY_ASR_DIR", "TINY_ASR_LDA_DIR", "WEIGHTS_NAME", "AsrBundle", "CascadedTransducer",
           "EncoderStream", "Joiner", "Predictor", "TransducerConfig", "base_state_dict", "declare_asr_points",
           "load_asr", "parameter_counts", "resolve_asr_dir", "save_asr", "tiny_asr_config"]
