"""VL-T5: a stock ``transformers`` T5 that reads frozen CLIP grid features before its text.

Cho et al. 2021 (VL-T5) as VL-Adapter (Sung et al. 2022) uses it: image features ``(B, N, D_v)`` (or
``(B, I, N, D_v)`` for NLVR2's image pairs) go through a trainable visual projection — ``Linear(D_v,
d_model)`` + ``LayerNorm``, plus a learned embedding of each visual token's position and of its image's
index — and are prepended to the T5 encoder's text embeddings; the attention mask covers both. The
model is ``transformers.T5ForConditionalGeneration`` unchanged (T5 v1.0 ReLU FFN or v1.1 gated-GELU).

``encoder_input`` (an ``nn.Identity``) sees the concatenated ``[visual; text]`` embeddings
``(B, L, d_model)``: a prompt adapter there (``mma.PromptConfig`` on ``"@encoder_input"``) prepends
tokens, and :meth:`VLT5.forward` extends the attention mask by as many always-visible positions.

A *VL-T5 directory* (:meth:`VLT5.save_pretrained`) is a T5 checkpoint directory plus two files::

    config.json, model.safetensors          the T5 (transformers' own layout; loads with T5ForConditionalGeneration)
    tokenizer.json, tokenizer_config.json   the tokenizer (AutoTokenizer.from_pretrained(dir))
    visual_projection.safetensors           the visual projection
    vlt5.json                               {"format_version", "visual_dim", "num_visual_tokens", "max_images", ...}

:meth:`VLT5.from_pretrained` also takes a plain T5 checkpoint directory (no ``vlt5.json``; the visual
projection starts fresh, so ``visual_dim`` and ``num_visual_tokens`` must be given). Weights are read
from safetensors only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import mmadapters as mma
from mmadapters.io import atomic_write_bytes

TINY_VLT5_DIR = Path(__file__).resolve().parent / "assets" / "tiny_vlt5"
VLT5_CONFIG = "vlt5.json"
PROJECTION_WEIGHTS = "visual_projection.safetensors"
T5_CONFIG = "config.json"
T5_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1


class VisualProjection(nn.Module):
    """Grid features -> T5 input embeddings.

    ``(B, N, D_v)`` or ``(B, I, N, D_v)`` -> ``(B, I*N, d_model)``: ``LayerNorm(Linear(x))`` plus a learned
    embedding of the token's grid position (``N`` of them) and of its image's index (``I <= max_images``).
    """

    def __init__(self, visual_dim: int, d_model: int, num_visual_tokens: int, max_images: int = 2):
        super().__init__()
        self.visual_dim, self.num_visual_tokens, self.max_images = visual_dim, num_visual_tokens, max_images
        self.feat_proj = nn.Linear(visual_dim, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pos_embed = nn.Embedding(num_visual_tokens, d_model)
        self.img_embed = nn.Embedding(max_images, d_model)
        nn.init.normal_(self.pos_embed.weight, std=0.02)
        nn.init.normal_(self.img_embed.weight, std=0.02)

    def forward(self, feats: Tensor) -> Tensor:
        if feats.dim() == 3:
            feats = feats.unsqueeze(1)
        if feats.dim() != 4:
            raise ValueError(f"visual_feats: expected (B, N, D) or (B, I, N, D), got shape {tuple(feats.shape)}")
        b, i, n, d = feats.shape
        if d != self.visual_dim:
            raise ValueError(f"visual_feats: feature dim mismatch: the visual projection expects {self.visual_dim}, got {d}")
        if n != self.num_visual_tokens:
            raise ValueError(f"visual_feats: token count mismatch: the visual projection expects {self.num_visual_tokens} "
                             f"tokens per image, got {n}")
        if i > self.max_images:
            raise ValueError(f"visual_feats: {i} images per sample, the visual projection has max_images={self.max_images}")
        x = self.norm(self.feat_proj(feats.to(self.feat_proj.weight.dtype)))  # (B, I, N, d_model)
        x = x + self.pos_embed.weight[None, None, :n] + self.img_embed.weight[None, :i, None]
        return x.reshape(b, i * n, -1)


class VLT5(nn.Module):
    """T5ForConditionalGeneration + :class:`VisualProjection` + the ``encoder_input`` prompt point.

    Attributes: ``t5`` (stock), ``visual_proj``, ``encoder_input`` (``nn.Identity``), ``tokenizer``
    (a ``PreTrainedTokenizerFast``; may be ``None`` for a model built without one).
    """

    def __init__(self, t5: nn.Module, visual_dim: int, num_visual_tokens: int, *, max_images: int = 2, tokenizer: Any = None):
        super().__init__()
        self.t5 = t5
        d_model = t5.config.d_model
        self.visual_proj = VisualProjection(visual_dim, d_model, num_visual_tokens, max_images)
        self.encoder_input = nn.Identity()
        self.tokenizer = tokenizer
        declare_vlt5_points(self)

    @property
    def config(self):
        """The T5 config (``d_model``, ``vocab_size``, ...)."""
        return self.t5.config

    @property
    def visual_dim(self) -> int:
        return self.visual_proj.visual_dim

    @property
    def num_visual_tokens(self) -> int:
        return self.visual_proj.num_visual_tokens

    # ---- encoder inputs -------------------------------------------------------------------------------
    def encoder_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, visual_feats: Tensor,
                       visual_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``[visual; text]`` encoder embeddings ``(B, L', d_model)`` and their mask ``(B, L')``.

        ``input_ids`` (B, T); ``visual_feats`` (B, N, D_v) or (B, I, N, D_v); ``visual_mask`` (B, I*N) or
        (B, I, N), default all visible. ``L' = I*N + T`` plus any tokens ``encoder_input``'s adapters prepend
        (those are always visible).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected (B, T), got shape {tuple(input_ids.shape)}")
        b = input_ids.shape[0]
        if visual_feats.shape[0] != b:
            raise ValueError(f"visual_feats: batch size {visual_feats.shape[0]} != input_ids batch size {b}")
        vis = self.visual_proj(visual_feats)  # (B, I*N, d_model)
        text = self.t5.get_input_embeddings()(input_ids)  # (B, T, d_model); T5 does not scale embeddings
        embeds = torch.cat([vis.to(text.dtype), text], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        if visual_mask is None:
            visual_mask = torch.ones(b, vis.shape[1], dtype=attention_mask.dtype, device=attention_mask.device)
        visual_mask = visual_mask.reshape(b, -1)
        if visual_mask.shape[1] != vis.shape[1]:
            raise ValueError(f"visual_mask: expected {vis.shape[1]} positions per sample, got {visual_mask.shape[1]}")
        mask = torch.cat([visual_mask.to(attention_mask.dtype), attention_mask], dim=1)
        embeds = self.encoder_input(embeds)
        extra = embeds.shape[1] - mask.shape[1]
        if extra < 0:
            raise ValueError(f"encoder_input: its output has {embeds.shape[1]} positions, fewer than its input's {mask.shape[1]}")
        if extra:  # prompt tokens prepended by an adapter on encoder_input: visible everywhere
            mask = torch.cat([mask.new_ones(b, extra), mask], dim=1)
        return embeds, mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, visual_feats: Tensor, labels: Tensor | None = None,
                visual_mask: Tensor | None = None, **t5_kwargs: Any):
        """``transformers`` ``Seq2SeqLMOutput`` (``.loss`` when ``labels`` (B, T_out) are given; ``.logits``
        (B, T_out, vocab)). Label ids equal to the pad id are ignored by the loss (T5 never predicts ``<pad>``).
        Other keyword arguments (``decoder_input_ids``, ...) go to the T5 unchanged.
        """
        embeds, mask = self.encoder_inputs(input_ids, attention_mask, visual_feats, visual_mask)
        if labels is not None:
            labels = labels.masked_fill(labels == self.t5.config.pad_token_id, -100)
        return self.t5(inputs_embeds=embeds, attention_mask=mask, labels=labels, **t5_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None, visual_feats: Tensor, max_new_tokens: int = 20,
                 num_beams: int = 1, visual_mask: Tensor | None = None, **generate_kwargs: Any) -> Tensor:
        """Greedy/beam decoding: LongTensor (B, T) beginning with the decoder start token (``decode`` drops it)."""
        from transformers.modeling_outputs import BaseModelOutput

        embeds, mask = self.encoder_inputs(input_ids, attention_mask, visual_feats, visual_mask)
        encoder_outputs = BaseModelOutput(last_hidden_state=self.t5.get_encoder()(inputs_embeds=embeds, attention_mask=mask)[0])
        return self.t5.generate(encoder_outputs=encoder_outputs, attention_mask=mask, max_new_tokens=max_new_tokens,
                                num_beams=num_beams, do_sample=False, **generate_kwargs)

    # ---- text ---------------------------------------------------------------------------------------------
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("VLT5 has no tokenizer: load it with VLT5.from_pretrained(dir) or set model.tokenizer")
        return self.tokenizer

    def encode_text(self, texts: Sequence[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, both (B, T) LongTensors, right-padded, ``</s>`` appended."""
        if isinstance(texts, str):
            raise TypeError("encode_text: expected a list of strings, got one string")
        tok = self._require_tokenizer()
        enc = tok(list(texts), padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt")
        device = self.t5.device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def encode_targets(self, texts: Sequence[str], max_length: int | None = None) -> Tensor:
        """Training labels (B, T): token ids with padding set to -100."""
        ids, mask = self.encode_text(texts, max_length)
        return ids.masked_fill(mask == 0, -100)

    def decode(self, ids: Tensor) -> list[str]:
        """Token ids (B, T) -> strings (special tokens dropped, spaces cleaned)."""
        return [s.strip() for s in self._require_tokenizer().batch_decode(ids, skip_special_tokens=True)]

    # ---- saving and loading -------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *, fp16: bool = False, extra: dict[str, Any] | None = None) -> Path:
        """Write a VL-T5 directory (see the module docstring). Each file is written atomically; ``vlt5.json``
        last, so a directory with it is complete. Adapters are not saved (``mma.save_adapters`` does that);
        their base weights are. ``fp16`` stores floating tensors in float16; ``extra`` goes into ``vlt5.json``.
        """
        from safetensors.torch import save

        from .vl_tokenizer import save_word_tokenizer

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)

        def cast(t: Tensor) -> Tensor:
            t = t.detach().cpu()
            return (t.half() if fp16 and t.is_floating_point() else t).contiguous().clone()

        t5_state = {k: cast(v) for k, v in _base_state(self.t5).items()}
        proj_state = {k: cast(v) for k, v in _base_state(self.visual_proj).items()}
        atomic_write_bytes(directory / T5_WEIGHTS, save(t5_state, metadata={"format": "pt"}))
        atomic_write_bytes(directory / PROJECTION_WEIGHTS, save(proj_state, metadata={"format": "pt"}))
        atomic_write_bytes(directory / T5_CONFIG, self.t5.config.to_json_string().encode())
        if self.tokenizer is not None:
            save_word_tokenizer(self.tokenizer, directory)
        meta = {"architecture": "VLT5", "format_version": FORMAT_VERSION, "visual_dim": self.visual_dim,
                "num_visual_tokens": self.num_visual_tokens, "max_images": self.visual_proj.max_images,
                "weights_dtype": "float16" if fp16 else "float32", **(extra or {})}
        atomic_write_bytes(directory / VLT5_CONFIG, (json.dumps(meta, indent=1) + "\n").encode())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike | None = None, visual_dim: int | None = None,
                        num_visual_tokens: int | None = None, *, max_images: int = 2, device: str | torch.device = "cpu",
                        seed: int = 0) -> VLT5:
        """Load a VL-T5 directory, or a plain T5 checkpoint directory with a fresh visual projection
        (initialized from ``seed``). ``None`` loads the shipped tiny VL-T5 (:data:`TINY_VLT5_DIR`).
        The model comes back float32, in eval mode, on ``device``."""
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load
        from transformers import AutoTokenizer, T5ForConditionalGeneration

        directory = resolve_vlt5_dir(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: model directory not found")
        config_path = directory / T5_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: T5 config not found (a T5 checkpoint directory has one)")
        if not (directory / T5_WEIGHTS).is_file() and not (directory / f"{T5_WEIGHTS}.index.json").is_file():
            raise FileNotFoundError(f"{directory / T5_WEIGHTS}: T5 weights not found (only safetensors weights are read; "
                                    "convert a pytorch_model.bin checkpoint with transformers' save_pretrained first)")
        meta_path = directory / VLT5_CONFIG
        proj_state = None
        if meta_path.is_file():
            meta = _read_json(meta_path)
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{meta_path}: field 'format_version' is {meta.get('format_version')!r}; "
                                 f"this library reads {FORMAT_VERSION}")
            for field_name, given in (("visual_dim", visual_dim), ("num_visual_tokens", num_visual_tokens), ("max_images", None)):
                value = meta.get(field_name)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise ValueError(f"{meta_path}: field {field_name!r} missing or not a positive integer (got {value!r})")
                if given is not None and given != value:
                    raise ValueError(f"{meta_path}: field {field_name!r} is {value}, but {field_name}={given} was requested")
            visual_dim, num_visual_tokens, max_images = meta["visual_dim"], meta["num_visual_tokens"], meta["max_images"]
            proj_path = directory / PROJECTION_WEIGHTS
            if not proj_path.is_file():
                raise FileNotFoundError(f"{proj_path}: visual projection weights not found (named by {meta_path})")
            try:
                proj_state = st_load(proj_path.read_bytes())
            except (SafetensorError, ValueError, RuntimeError) as err:
                raise ValueError(f"{proj_path}: not a readable safetensors file ({err})") from None
        elif visual_dim is None or num_visual_tokens is None:
            raise ValueError(f"{directory}: a plain T5 checkpoint (no {VLT5_CONFIG}): pass visual_dim= and num_visual_tokens= "
                             "for its fresh visual projection")

        try:
            t5 = T5ForConditionalGeneration.from_pretrained(str(directory), use_safetensors=True, dtype=torch.float32)
        except OSError as err:
            raise ValueError(f"{directory}: T5ForConditionalGeneration could not load it ({err})") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError) as err:
            raise ValueError(f"{directory}: no loadable tokenizer ({err})") from None
        if len(tokenizer) > t5.config.vocab_size:
            raise ValueError(f"{directory}: the tokenizer has {len(tokenizer)} tokens but {config_path} says vocab_size "
                             f"{t5.config.vocab_size}")
        torch.manual_seed(seed)
        model = cls(t5, visual_dim, num_visual_tokens, max_images=max_images, tokenizer=tokenizer)
        if proj_state is not None:
            expected = model.visual_proj.state_dict()
            missing, unexpected = sorted(set(expected) - set(proj_state)), sorted(set(proj_state) - set(expected))
            if missing or unexpected:
                raise ValueError(f"{directory / PROJECTION_WEIGHTS}: tensors do not match {meta_path}: missing {missing}, "
                                 f"unexpected {unexpected}")
            for name, t in proj_state.items():
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{directory / PROJECTION_WEIGHTS}: tensor {name!r} has shape {tuple(t.shape)}, "
                                     f"{meta_path} needs {tuple(expected[name].shape)}")
            model.visual_proj.load_state_dict({n: t.float() for n, t in proj_state.items()})
        return model.to(device).eval()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _base_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's own parameters and persistent buffers under their logical names: adapter wrappers seen
    through and adapters left out; a tensor shared by several modules (T5's tied embeddings) kept once,
    under its first name (``shared.weight``), as transformers' own checkpoints do."""
    from mmadapters.targets import iter_logical_modules

    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, base, _parent, _attr in iter_logical_modules(module):
        prefix = f"{name}." if name else ""
        for pname, p in base.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out[prefix + pname] = p
        for bname, b in base.named_buffers(recurse=False):
            if b is not None and bname not in base._non_persistent_buffers_set and id(b) not in seen:
                seen.add(id(b))
                out[prefix + bname] = b
    return out


def resolve_vlt5_dir(directory: str | os.PathLike | None) -> Path:
    """``None`` -> the shipped tiny VL-T5 (with a clear error when it has not been created)."""
    if directory is not None:
        return Path(directory)
    if not (TINY_VLT5_DIR / VLT5_CONFIG).is_file():
        raise FileNotFoundError(f"the shipped tiny VL-T5 is missing: expected {TINY_VLT5_DIR / VLT5_CONFIG} with its weights. "
                                "Pass a model directory, or create it with scripts/pretrain_tiny_vlt5.py")
    return TINY_VLT5_DIR


def declare_vlt5_points(model: VLT5) -> VLT5:
    """Declare VL-T5's adapter points on ``model`` (names as in VL-Adapter). Returns ``model``.

    ``enc_attn_out`` / ``enc_ffn_out``: each encoder block's self-attention output projection (``o``) and FFN
    output (``wo``; also T5 v1.1's gated FFN); ``dec_attn_out`` / ``dec_cross_out`` / ``dec_ffn_out``: the
    decoder's self-attention, cross-attention and FFN outputs; ``attn_out`` / ``ffn_out``: encoder + decoder
    (self-attention only); ``cross_attn_out``; ``attn_q`` / ``attn_v``: every query / value projection
    (self- and cross-attention; LoRA); ``encoder_input``: the ``[visual; text]`` embeddings (prompt tuning).
    """
    d = model.t5.config.d_model
    enc, dec = "t5.encoder.block.*.layer", "t5.decoder.block.*.layer"
    points = {
        "enc_attn_out": mma.AdapterPoint(f"{enc}.0.SelfAttention.o", dim=d, doc="encoder self-attention output"),
        "enc_ffn_out": mma.AdapterPoint(f"{enc}.1.DenseReluDense.wo", dim=d, doc="encoder FFN output"),
        "dec_attn_out": mma.AdapterPoint(f"{dec}.0.SelfAttention.o", dim=d, doc="decoder self-attention output"),
        "dec_cross_out": mma.AdapterPoint(f"{dec}.1.EncDecAttention.o", dim=d, doc="decoder cross-attention output"),
        "dec_ffn_out": mma.AdapterPoint(f"{dec}.2.DenseReluDense.wo", dim=d, doc="decoder FFN output"),
        "attn_out": mma.AdapterPoint([f"{enc}.0.SelfAttention.o", f"{dec}.0.SelfAttention.o"], dim=d,
                                     doc="self-attention outputs, encoder and decoder"),
        "ffn_out": mma.AdapterPoint([f"{enc}.1.DenseReluDense.wo", f"{dec}.2.DenseReluDense.wo"], dim=d,
                                    doc="FFN outputs, encoder and decoder"),
        "cross_attn_out": mma.AdapterPoint(f"{dec}.1.EncDecAttention.o", dim=d, doc="decoder cross-attention output"),
        "attn_q": mma.AdapterPoint([f"{enc}.0.SelfAttention.q", f"{dec}.0.SelfAttention.q", f"{dec}.1.EncDecAttention.q"],
                                   doc="query projections (LoRA)"),
        "attn_v": mma.AdapterPoint([f"{enc}.0.SelfAttention.v", f"{dec}.0.SelfAttention.v", f"{dec}.1.EncDecAttention.v"],
                                   doc="value projections (LoRA)"),
        "encoder_input": mma.AdapterPoint("encoder_input", dim=d, doc="[visual; text] encoder embeddings (prompt tuning)"),
    }
    mma.declare_adapter_points(model, points)
    return model


def tiny_t5_config(vocab_size: int, *, d_model: int = 32, d_ff: int = 64, num_layers: int = 2, num_decoder_layers: int | None = None,
                   num_heads: int = 2, gated: bool = False, **overrides: Any):
    """A small ``T5Config``: T5 v1.0 (ReLU FFN, decoder output scaled by ``d_model**-0.5``), or with ``gated=True``
    v1.1 (gated-GELU FFN, no scaling). transformers 5 always ties ``lm_head`` to the embeddings at init and keeps
    them apart only when a checkpoint stores a different ``lm_head`` (as real v1.1 checkpoints do)."""
    from transformers import T5Config

    cfg = {"vocab_size": vocab_size, "d_model": d_model, "d_kv": d_model // num_heads, "d_ff": d_ff, "num_layers": num_layers,
           "num_decoder_layers": num_decoder_layers or num_layers, "num_heads": num_heads, "dropout_rate": 0.0,
           "feed_forward_proj": "gated-gelu" if gated else "relu", "tie_word_embeddings": not gated,
           "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "relative_attention_num_buckets": 16,
           "relative_attention_max_distance": 64}
    cfg.update(overrides)
    return T5Config(**cfg)


def tiny_vlt5(directory: str | os.PathLike, vocab_texts: Sequence[str], *, visual_dim: int = 32, num_visual_tokens: int = 4,
              max_images: int = 2, extra_ids: int = 20, seed: int = 0, **t5_overrides: Any) -> VLT5:
    """Write a tiny random VL-T5 directory (word-level tokenizer built from ``vocab_texts``) and load it back.

    ``t5_overrides`` go to :func:`tiny_t5_config` (``d_model``, ``d_ff``, ``num_layers``, ``num_heads``, ``gated``...).
    """
    from transformers import T5ForConditionalGeneration

    from .vl_tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(vocab_texts, extra_ids=extra_ids)
    torch.manual_seed(seed)
    t5 = T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), **t5_overrides))
    model = VLT5(t5, visual_dim, num_visual_tokens, max_images=max_images, tokenizer=tokenizer)
    model.save_pretrained(directory)
    return VLT5.from_pretrained(directory)


__all__ = ["FORMAT_VERSION", "PROJECTION_WEIGHTS", "TINY_VLT5_DIR", "VLT5", "VLT5_CONFIG", "VisualProjection",
           "declare_vlt5_points", "resolve_vlt5_dir", "tiny_t5_config", "tiny_vlt5"]
