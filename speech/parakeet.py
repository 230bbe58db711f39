"""transformers' Parakeet RNN-T / TDT folders (FastConformer transducers) as an ASR backbone of this library.

``load_asr(DIR)`` hands a folder whose ``config.json`` has ``model_type`` ``parakeet_rnnt`` or ``parakeet_tdt``
(nvidia/parakeet-rnnt-*, nvidia/parakeet-tdt-0.6b-v2 / -v3 converted by transformers) to :func:`load_parakeet`.
The model is transformers' own (``ParakeetForRNNT`` / ``ParakeetForTDT``, weights and feature extractor as the
folder ships them), wrapped by :class:`ParakeetTransducer` in the interface the rest of :mod:`mmadapters.speech`
uses: ``encode(waves, wave_lengths) -> (B, T, D), lengths`` (the mel frontend, the encoder and its projection into
the joint), ``predict`` (the LSTM prediction network), ``joint`` (token logits), ``forward`` (transformers' own
RNN-T / TDT loss, so ``mmadapters train lda`` trains on it) and adapter points:

- ``attn_out``, ``ffn_out``, ``block_out`` on every encoder block (self-attention output, second feed-forward
  output, block output; (B, T, D)), ``attn`` (LoRA on q/k/v/o projections);
- ``predictor_out`` (the LSTM output) and ``joiner_in`` (the encoder and decoder projections into the joint).

Greedy decoding (:func:`mmadapters.speech.decode.greedy_decode`; for TDT it advances by the predicted duration)
emits what transformers' ``generate`` emits on one utterance, up to ``max_symbols_per_step`` symbols per frame as
its RNN-T guard does. (transformers' batched ``generate`` decodes padding frames, and for TDT emits duration ids as
tokens unless they are suppressed; ours decodes each utterance's own frames.)
There is one pass (``pass_`` is accepted and ignored) and no streaming encoder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import mmadapters as mma

MODEL_TYPES = ("parakeet_rnnt", "parakeet_tdt")


def parakeet_model_type(directory: str | os.PathLike) -> str | None:
    """``model_type`` of ``directory/config.json`` when it is a Parakeet transducer folder, else None."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return kind if kind in MODEL_TYPES else None


class ParakeetTokenizer:
    """The folder's transformers tokenizer in this library's tokenizer interface (ids exclude the blank)."""

    def __init__(self, tokenizer: Any, vocab_size: int, blank: int):
        self.hf, self._vocab_size, self.blank = tokenizer, vocab_size, blank

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False)
        if any(i >= self._vocab_size or i == self.blank for i in ids):
            raise ValueError(f"ParakeetTokenizer: {text!r} encodes to ids outside the model's vocabulary")
        return ids

    def decode(self, ids) -> str:
        # transducer ids: no CTC grouping of repeats (transformers' processor does the same for RNN-T / TDT)
        return self.hf.decode([int(i) for i in ids if int(i) != self.blank], skip_special_tokens=True,
                              group_tokens=False).strip()


class ParakeetTransducer(nn.Module):
    """A transformers ``ParakeetForRNNT`` / ``ParakeetForTDT`` with its feature extractor (see the module docstring)."""

    def __init__(self, hf_model: nn.Module, feature_extractor: Any):
        super().__init__()
        self.hf = hf_model
        self.feature_extractor = feature_extractor
        config = hf_model.config
        self.blank = int(config.blank_token_id)
        self.vocab_size = int(config.vocab_size)
        self.max_symbols_per_step = int(config.max_symbols_per_step)
        self.durations = [int(d) for d in config.durations] if config.model_type == "parakeet_tdt" else None

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def features(self, waves: Tensor, wave_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The folder's mel frontend: ``input_features (B, F, mel)`` and its attention mask (B, F)."""
        device = waves.device
        out = self.feature_extractor([w[: int(n)].detach().cpu().float().numpy() for w, n in zip(waves, wave_lengths, strict=True)],
                                     sampling_rate=self.sampling_rate, return_tensors="pt", return_attention_mask=True)
        return out["input_features"].to(device), out["attention_mask"].to(device)

    def encode(self, waves: Tensor, wave_lengths: Tensor, pass_: str = "second") -> tuple[Tensor, Tensor]:
        """Encoder output projected into the joint ``(B, T, D)`` and valid frames ``(B,)``."""
        feats, mask = self.features(waves, wave_lengths)
        out = self.hf.get_audio_features(input_features=feats, attention_mask=mask, output_attention_mask=True)
        return out.pooler_output, out.attention_mask.sum(-1)

    def predict(self, tokens: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Prediction network: ``tokens (B, U)`` -> ``(B, U, D)`` and the LSTM state."""
        dec = self.hf.decoder
        out, state = dec.lstm(dec.embedding(tokens), state)
        return dec.decoder_projector(out), state

    def joint_logits(self, enc: Tensor, pred: Tensor) -> Tensor:
        """The joint's full output ``(B, T, U, V [+ durations])`` for ``enc (B, T, D)`` and ``pred (B, U, D)``."""
        joint = self.hf.joint
        return joint.head(joint.activation(enc.unsqueeze(2) + pred.unsqueeze(1)))

    def joint(self, enc: Tensor, pred: Tensor) -> Tensor:
        """Token logits ``(B, T, U, V)`` (TDT's duration logits left out: :meth:`joint_logits`)."""
        return self.joint_logits(enc, pred)[..., : self.vocab_size]

    def forward(self, waves: Tensor, wave_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> dict[str, Tensor]:
        """transformers' own transducer loss (RNN-T, or TDT with its durations): ``{"loss"}``."""
        enc, lengths = self.encode(waves, wave_lengths)
        targets = targets.long()
        start = torch.full((targets.shape[0], 1), self.blank, dtype=torch.long, device=targets.device)
        pred, _ = self.predict(torch.cat([start, targets], dim=1))
        logits = self.joint_logits(enc, pred).float()
        if self.durations is None:
            loss = self.hf.loss_function(logits=logits, labels=targets, logit_lengths=lengths,
                                         label_lengths=target_lengths, blank_token_id=self.blank)
        else:
            loss = self.hf.loss_function(token_logits=logits[..., : self.vocab_size],
                                         duration_logits=logits[..., self.vocab_size:], labels=targets,
                                         logit_lengths=lengths, label_lengths=target_lengths, blank_token_id=self.blank,
                                         durations=self.durations)
        return {"loss": loss}


def declare_parakeet_points(model: ParakeetTransducer) -> ParakeetTransducer:
    """Adapter points (see the module docstring) on the wrapped transformers model."""
    d = model.hf.config.encoder_config.hidden_size
    p = model.hf.config.decoder_hidden_size
    blocks = "re:hf\\.encoder\\.layers\\.\\d+"
    mma.declare_adapter_points(model, {
        "attn_out": mma.AdapterPoint(f"{blocks}\\.self_attn", dim=d, doc="self-attention output (B, T, D)"),
        "ffn_out": mma.AdapterPoint(f"{blocks}\\.feed_forward2", dim=d, doc="second feed-forward output (B, T, D)"),
        "block_out": mma.AdapterPoint(blocks, dim=d, doc="end of each FastConformer block (B, T, D)"),
        "attn": mma.AdapterPoint([f"{blocks}\\.self_attn\\.{n}_proj" for n in "qkvo"], doc="attention projections (LoRA)"),
        "predictor_out": mma.AdapterPoint("hf.decoder.lstm", dim=p, doc="LSTM output (B, U, P)"),
        "joiner_in": mma.AdapterPoint(["hf.encoder_projector", "hf.decoder.decoder_projector"],
                                      doc="the projections into the joint"),
    })
    return model


@dataclass
class ParakeetBundle:
    """What :func:`mmadapters.speech.model.load_asr` returns for a Parakeet folder (the fields of ``AsrBundle``)."""

    model: ParakeetTransducer
    tokenizer: ParakeetTokenizer
    config: Any  # the transformers config
    path: Path | None = None


def load_parakeet(directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> ParakeetBundle:
    """A transformers Parakeet RNN-T / TDT folder (config.json, model.safetensors, the feature extractor's and the
    tokenizer's files) in eval mode, float32, with adapter points declared."""
    from transformers import AutoFeatureExtractor, AutoTokenizer, ParakeetForRNNT, ParakeetForTDT

    directory = Path(directory)
    kind = parakeet_model_type(directory)
    if kind is None:
        raise ValueError(f"{directory / 'config.json'}: field 'model_type' must be one of {list(MODEL_TYPES)}")
    cls = ParakeetForTDT if kind == "parakeet_tdt" else ParakeetForRNNT
    try:
        hf = cls.from_pretrained(directory, dtype=torch.float32)
        extractor = AutoFeatureExtractor.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory}: not a loadable {cls.__name__} folder ({type(err).__name__}: {err})") from None
    model = declare_parakeet_points(ParakeetTransducer(hf, extractor)).to(device).eval()
    return ParakeetBundle(model, ParakeetTokenizer(tokenizer, model.vocab_size, model.blank), hf.config, directory)
