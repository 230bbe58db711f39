"""Reading a NeMo ``.nemo`` file: the tar in memory, its config checked into settings, its tokenizer.

- :func:`read_nemo` — the tar (``model_config.yaml``, ``model_weights.ckpt`` and the tokenizer's files) is read in
  memory, never extracted (members with an absolute path or ``..`` are refused; links are never followed), the
  config with ``yaml.safe_load`` and the weights with ``torch.load(weights_only=True)``: nothing else is unpickled.
  The result is a :class:`NemoArchive`.
- :func:`nemo_settings` — ``model_config.yaml`` read into :class:`NemoSettings` (the frontend's, the encoder's and the
  transducer's). What NeMo can configure but :mod:`mmadapters.speech.nemo` does not rebuild (other subsamplings,
  ``regular`` attention, absolute positions, CTC-only or TDT models, ...) is refused naming the field; fields left
  out take NeMo's defaults.
- :func:`nemo_tokenizer` — the file's tokenizer: characters (``labels``, :class:`NemoCharTokenizer`) or SentencePiece
  BPE (``tokenizer.type: bpe``, :class:`NemoSentencePieceTokenizer`).

Every error names the file and the member or the config field.
"""

from __future__ import annotations

import io
import math
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from .fastconformer import EncoderSettings
from .nemo_features import SAMPLE_RATE, FrontendSettings

CONFIG_MEMBER = "model_config.yaml"
WEIGHTS_MEMBER = "model_weights.ckpt"


# -- the .nemo file ---------------------------------------------------------------------------------------------
@dataclass
class NemoArchive:
    """A ``.nemo`` file read in memory: its ``config`` (model_config.yaml), ``state`` (model_weights.ckpt) and the
    other members' bytes by name (``files``; tokenizer files)."""

    path: Path
    config: dict[str, Any]
    state: dict[str, Tensor]
    files: dict[str, bytes] = field(default_factory=dict)


def _member_name(member: tarfile.TarInfo, path: Path) -> str:
    name = PurePosixPath(member.name)
    parts = [p for p in name.parts if p not in ("", ".")]
    if name.is_absolute() or ".." in parts:
        raise ValueError(f"{path}: unsafe member name {member.name!r} in the .nemo tar (absolute or with '..')")
    return "/".join(parts)


def read_nemo(path: str | os.PathLike) -> NemoArchive:
    """Read ``path`` (a NeMo ``.nemo`` tar) in memory; errors name the file and the member."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: .nemo file not found")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                name = _member_name(member, path)
                if not member.isfile():
                    continue  # directories; links and devices are never followed (nothing is extracted)
                if "/" in name:
                    continue  # NeMo writes its members at the top level
                handle = tar.extractfile(member)
                if handle is not None:
                    files[name] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a .nemo file (a tar archive of {CONFIG_MEMBER} and {WEIGHTS_MEMBER}): {err}") from None
    for needed in (CONFIG_MEMBER, WEIGHTS_MEMBER):
        if needed not in files:
            raise ValueError(f"{path}: the .nemo tar has no {needed} (members: {sorted(files)[:8]})")
    try:
        config = yaml.safe_load(files.pop(CONFIG_MEMBER).decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: {CONFIG_MEMBER} is not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: {CONFIG_MEMBER} must be a mapping of model settings, got {type(config).__name__}")
    try:
        state = torch.load(io.BytesIO(files.pop(WEIGHTS_MEMBER)), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many kinds (pickle, zip, runtime) for a bad file
        raise ValueError(f"{path}: {WEIGHTS_MEMBER} does not load with torch.load(weights_only=True) "
                         f"({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{path}: {WEIGHTS_MEMBER} must hold a state dict (parameter name -> tensor)")
    return NemoArchive(path, config, state, files)


# -- config -----------------------------------------------------------------------------------------------------
class _Fields:
    """Typed reads of model_config.yaml with errors naming the file and the field."""

    def __init__(self, config: dict[str, Any], path: Path):
        self.config, self.where = config, f"{path}: {CONFIG_MEMBER}"

    def error(self, name: str, message: str) -> ValueError:
        return ValueError(f"{self.where}: field '{name}' {message}")

    def get(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        node: Any = self.config
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                if required:
                    raise self.error(name, "is missing")
                return default
            node = node[part]
        return default if node is None and not required else node

    def int(self, name: str, default: int | None = None, *, minimum: int | None = None) -> int:
        value = self.get(name, default, required=default is None)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value}")
        return value

    def number(self, name: str, default: float | None = None) -> float:
        value = self.get(name, default, required=default is None)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.error(name, f"must be a number, got {value!r}")
        return float(value)

    def choice(self, name: str, allowed: tuple, default: Any = None) -> Any:
        value = self.get(name, default)
        if value not in allowed:
            raise self.error(name, f"is {value!r}; this loader rebuilds {' or '.join(repr(a) for a in allowed)}")
        return value


@dataclass
class NemoSettings:
    """Everything :class:`~mmadapters.speech.nemo.NemoTransducer` is built from (read from model_config.yaml by
    :func:`nemo_settings`)."""

    frontend: FrontendSettings
    encoder: EncoderSettings
    num_classes: int  # tokens without the blank
    pred_hidden: int
    pred_layers: int
    joint_hidden: int
    joint_activation: str = "relu"
    max_symbols_per_step: int = 10
    hybrid: bool = False  # a hybrid RNN-T + CTC model (its CTC branch is not loaded)
    model_class: str = ""


def _context_sizes(fields: _Fields) -> list[list[int]]:
    raw = fields.get("encoder.att_context_size")
    if raw is None:
        raise fields.error("encoder.att_context_size", "is missing; a cache-aware streaming model sets it")
    sizes = [raw] if raw and isinstance(raw[0], int) else raw
    out = []
    for cs in sizes:
        if (not isinstance(cs, list) or len(cs) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in cs)
                or cs[0] < -1 or cs[1] < -1):
            raise fields.error("encoder.att_context_size", f"must be [left, right] integers (>= -1) or a list of them, got {raw!r}")
        if cs[0] > 0 and cs[1] >= 0 and cs[0] % (cs[1] + 1):
            raise fields.error("encoder.att_context_size", f"{cs}: the left context must be a multiple of the chunk "
                               f"size (right + 1) for chunked_limited attention")
        if cs[1] < 0 and len(sizes) == 1:
            raise fields.error("encoder.att_context_size", f"{cs}: chunked_limited attention needs a finite right context")
        out.append(list(cs))
    return out


def nemo_settings(config: dict[str, Any], path: Path) -> NemoSettings:
    """Read and check model_config.yaml; what this loader does not rebuild raises naming the field."""
    f = _Fields(config, path)
    decoder_target = str(f.get("decoder._target_", ""))
    if not decoder_target.endswith("RNNTDecoder"):
        raise f.error("decoder._target_", f"is {decoder_target!r}; only transducer models (RNNTDecoder, RNN-T or "
                      "hybrid RNN-T + CTC) load, not CTC-only or other decoders")
    joint_target = str(f.get("joint._target_", ""))
    if not joint_target.endswith("RNNTJoint"):
        raise f.error("joint._target_", f"is {joint_target!r}; expected RNNTJoint")
    if f.get("loss.loss_name", "default") not in ("default", "warprnnt", "warprnnt_numba", "pytorch"):
        raise f.error("loss.loss_name", f"is {f.get('loss.loss_name')!r}: TDT and multi-blank transducers do not load "
                      "here (a plain RNN-T does)")
    if f.get("model_defaults.tdt_durations") or f.get("joint.num_extra_outputs", 0):
        raise f.error("joint.num_extra_outputs", "is set: TDT / multi-blank transducers do not load here")
    pre_target = str(f.get("preprocessor._target_", ""))
    if not pre_target.endswith("AudioToMelSpectrogramPreprocessor"):
        raise f.error("preprocessor._target_", f"is {pre_target!r}; expected AudioToMelSpectrogramPreprocessor")

    # -- frontend
    sr = f.int("preprocessor.sample_rate", SAMPLE_RATE)
    if sr != SAMPLE_RATE:
        raise f.error("preprocessor.sample_rate", f"is {sr}; this library feeds {SAMPLE_RATE} Hz audio")
    win = f.get("preprocessor.n_window_size") or int(f.number("preprocessor.window_size", 0.02) * sr)
    hop = f.get("preprocessor.n_window_stride") or int(f.number("preprocessor.window_stride", 0.01) * sr)
    n_fft = f.get("preprocessor.n_fft") or 2 ** math.ceil(math.log2(win))
    if f.int("preprocessor.frame_splicing", 1) != 1:
        raise f.error("preprocessor.frame_splicing", "must be 1")
    normalize = f.get("preprocessor.normalize", "per_feature")
    if isinstance(normalize, dict):
        raise f.error("preprocessor.normalize", "with fixed_mean / fixed_std is not supported")
    pad_to = f.get("preprocessor.pad_to", 16)
    if not isinstance(pad_to, int) or isinstance(pad_to, bool) or pad_to < 0:
        raise f.error("preprocessor.pad_to", f"must be an integer >= 0 ('max' is not supported), got {pad_to!r}")
    guard_value = f.get("preprocessor.log_zero_guard_value", 2**-24)
    if not (isinstance(guard_value, int | float) or guard_value in ("tiny", "eps")):
        raise f.error("preprocessor.log_zero_guard_value", f"must be a number, 'tiny' or 'eps', got {guard_value!r}")
    preemph = f.get("preprocessor.preemph", 0.97)
    frontend = FrontendSettings(
        sample_rate=sr, win_length=int(win), hop_length=int(hop), n_fft=int(n_fft), n_mels=f.int("preprocessor.features", 64),
        preemph=None if preemph is None else float(preemph), log=bool(f.get("preprocessor.log", True)),
        log_zero_guard_type=f.choice("preprocessor.log_zero_guard_type", ("add", "clamp"), "add"),
        log_zero_guard_value=guard_value, normalize=normalize if normalize in ("per_feature", "all_features") else None,
        pad_to=pad_to, pad_value=f.number("preprocessor.pad_value", 0.0), mag_power=f.number("preprocessor.mag_power", 2.0),
        dither=f.number("preprocessor.dither", 1e-5), exact_pad=bool(f.get("preprocessor.exact_pad", False)))
    if frontend.exact_pad and frontend.hop_length % 2:
        raise f.error("preprocessor.exact_pad", "needs an even hop length")

    # -- encoder
    enc_target = str(f.get("encoder._target_", ""))
    if not enc_target.endswith("ConformerEncoder"):
        raise f.error("encoder._target_", f"is {enc_target!r}; expected ConformerEncoder (FastConformer)")
    f.choice("encoder.subsampling", ("dw_striding",), "striding")
    if f.get("encoder.causal_downsampling", False) is not True:
        raise f.error("encoder.causal_downsampling", "must be true (the cache-aware streaming subsampling)")
    f.choice("encoder.self_attention_model", ("rel_pos",), "rel_pos")
    f.choice("encoder.att_context_style", ("chunked_limited",), "regular")
    conv_norm = f.choice("encoder.conv_norm_type", ("batch_norm", "layer_norm"), "batch_norm")
    f.choice("encoder.conv_context_style", ("regular",), "regular")
    if f.get("encoder.use_bias", True) is not True:
        raise f.error("encoder.use_bias", "must be true")
    if f.get("encoder.untie_biases", True) is not True:
        raise f.error("encoder.untie_biases", "must be true (per-layer relative-position biases)")
    if f.get("encoder.reduction") or f.int("encoder.reduction_factor", 1) > 1:
        raise f.error("encoder.reduction", "is set; time reduction inside the encoder is not supported")
    d_model = f.int("encoder.d_model", minimum=1)
    feat_out = f.int("encoder.feat_out", -1)
    if feat_out > 0 and feat_out != d_model:
        raise f.error("encoder.feat_out", f"is {feat_out}; an output projection is not supported (-1 or d_model)")
    factor = f.int("encoder.subsampling_factor", 4, minimum=2)
    if factor & (factor - 1):
        raise f.error("encoder.subsampling_factor", f"must be a power of 2, got {factor}")
    heads = f.int("encoder.n_heads", 4, minimum=1)
    if d_model % heads:
        raise f.error("encoder.n_heads", f"({heads}) must divide encoder.d_model ({d_model})")
    kernel = f.int("encoder.conv_kernel_size", 31, minimum=1)
    if kernel % 2 == 0:
        raise f.error("encoder.conv_kernel_size", f"must be odd, got {kernel}")
    conv_ctx = f.get("encoder.conv_context_size")
    if conv_ctx is None:
        conv_context = ((kernel - 1) // 2, (kernel - 1) // 2)
    elif conv_ctx == "causal":
        conv_context = (kernel - 1, 0)
    elif isinstance(conv_ctx, list) and len(conv_ctx) == 2 and conv_ctx[0] + conv_ctx[1] + 1 == kernel:
        conv_context = (int(conv_ctx[0]), int(conv_ctx[1]))
    else:
        raise f.error("encoder.conv_context_size", f"must be 'causal' or [left, right] with left + right + 1 = "
                      f"conv_kernel_size ({kernel}), got {conv_ctx!r}")
    channels = f.int("encoder.subsampling_conv_channels", -1)
    expansion = f.number("encoder.ff_expansion_factor", 4)
    encoder = EncoderSettings(
        feat_in=f.int("encoder.feat_in", minimum=1), n_layers=f.int("encoder.n_layers", minimum=1), d_model=d_model,
        n_heads=heads, d_ff=int(d_model * expansion), subsampling_factor=factor,
        subsampling_channels=d_model if channels == -1 else channels, att_context_sizes=_context_sizes(f),
        conv_kernel_size=kernel, conv_context=conv_context, conv_norm_type=conv_norm,
        xscaling=bool(f.get("encoder.xscaling", True)), dropout=f.number("encoder.dropout", 0.0))
    if encoder.feat_in != frontend.n_mels:
        raise f.error("encoder.feat_in", f"({encoder.feat_in}) must equal preprocessor.features ({frontend.n_mels})")

    # -- transducer
    if f.get("decoder.blank_as_pad", True) is not True:
        raise f.error("decoder.blank_as_pad", "must be true (the blank is the prediction network's padding embedding)")
    if f.get("decoder.normalization_mode") is not None:
        raise f.error("decoder.normalization_mode", "must be null (an LSTM without layer normalization)")
    pred_hidden = f.int("decoder.prednet.pred_hidden", minimum=1)
    rnn_hidden = f.int("decoder.prednet.rnn_hidden_size", -1)
    if rnn_hidden > 0 and rnn_hidden != pred_hidden:
        raise f.error("decoder.prednet.rnn_hidden_size", f"({rnn_hidden}) must be -1 or pred_hidden ({pred_hidden})")
    num_classes = f.int("joint.num_classes", minimum=1)
    vocab = f.get("decoder.vocab_size", num_classes)
    if vocab != num_classes:
        raise f.error("decoder.vocab_size", f"({vocab}) must equal joint.num_classes ({num_classes})")
    greedy = f.get("decoding.greedy") or {}
    max_symbols = greedy.get("max_symbols", None) if isinstance(greedy, dict) else None
    if max_symbols is None and isinstance(greedy, dict):
        max_symbols = greedy.get("max_symbols_per_step", None)
    if max_symbols is None:
        max_symbols = 10  # NeMo's default (GreedyRNNTInferConfig.max_symbols_per_step)
    if not isinstance(max_symbols, int) or max_symbols < 1:
        raise f.error("decoding.greedy.max_symbols", f"must be a positive integer, got {max_symbols!r}")
    return NemoSettings(
        frontend=frontend, encoder=encoder, num_classes=num_classes, pred_hidden=pred_hidden,
        pred_layers=f.int("decoder.prednet.pred_rnn_layers", 1, minimum=1),
        joint_hidden=f.int("joint.jointnet.joint_hidden", minimum=1),
        joint_activation=f.choice("joint.jointnet.activation", ("relu", "tanh", "sigmoid"), "relu"),
        max_symbols_per_step=max_symbols, hybrid="aux_ctc" in config, model_class=str(config.get("target", "")))



# -- tokenizers -------------------------------------------------------------------------------------------------
class NemoCharTokenizer:
    """A character model's ``labels`` (id i = labels[i]; the blank is ``len(labels)``). Characters outside the labels
    are dropped when encoding."""

    kind = "char"

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.blank = len(self.labels)
        self._index = {c: i for i, c in enumerate(self.labels)}

    @property
    def vocab_size(self) -> int:
        return len(self.labels) + 1

    def encode(self, text: str) -> list[int]:
        return [self._index[c] for c in text if c in self._index]

    def decode(self, ids) -> str:
        return "".join(self.labels[int(i)] for i in ids if 0 <= int(i) < self.blank)


class NemoSentencePieceTokenizer:
    """The ``.nemo`` file's SentencePiece model (``tokenizer.model_path``); the blank is ``vocab_size - 1``."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.blank = self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return self.blank + 1

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.blank])


def nemo_tokenizer(archive: NemoArchive, num_classes: int) -> NemoCharTokenizer | NemoSentencePieceTokenizer:
    """The tokenizer a ``.nemo`` file carries: SentencePiece (``tokenizer.type: bpe``) or characters (``labels``)."""
    fields = _Fields(archive.config, archive.path)
    tok = fields.get("tokenizer")
    if tok:
        fields.choice("tokenizer.type", ("bpe",))
        ref = str(fields.get("tokenizer.model_path", required=True))
        name = ref[len("nemo:"):] if ref.startswith("nemo:") else PurePosixPath(ref).name
        if name not in archive.files:
            raise fields.error("tokenizer.model_path", f"names {ref!r}, which the .nemo tar does not hold")
        try:
            tokenizer: Any = NemoSentencePieceTokenizer(archive.files[name])
        except (RuntimeError, OSError) as err:
            raise ValueError(f"{archive.path}: {name} is not a SentencePiece model ({err})") from None
    else:
        labels = fields.get("labels") or fields.get("joint.vocabulary") or fields.get("decoder.vocabulary")
        if not isinstance(labels, list) or not all(isinstance(c, str) for c in labels):
            raise fields.error("labels", "is missing: a character model lists its labels (or set tokenizer)")
        tokenizer = NemoCharTokenizer(labels)
    if tokenizer.vocab_size != num_classes + 1:
        raise fields.error("joint.num_classes", f"({num_classes}) does not match the tokenizer's {tokenizer.vocab_size - 1} tokens")
    return tokenizer



__all__ = ["CONFIG_MEMBER", "WEIGHTS_MEMBER", "NemoArchive", "NemoCharTokenizer", "NemoSentencePieceTokenizer",
           "NemoSettings", "nemo_settings", "nemo_tokenizer", "read_nemo"]
