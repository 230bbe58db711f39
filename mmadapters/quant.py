"""Low-bit storage of adapter weights: per-channel integer codes packed into bytes.

Used by :func:`mmadapters.save_adapter` (``bits=8|4|2|1``) and undone transparently by
:func:`mmadapters.load_adapter`. Only the file is low-bit: a loaded adapter is full precision again.

What is quantized
    Every tensor with two or more dimensions, one scale per slice along dim 0 ("channel"): the output
    channel of a Linear/Conv weight ``(out, in[, k...])``, a LoRA rank row of ``lora_A`` ``(r, in)``, an
    output row of ``lora_B`` ``(out, r)``, a prompt token ``(tokens, dim)``, a Kronecker index of a PHM
    tensor ``(n, ., .)``. LoRA's ``A`` and ``B`` are quantized separately (their product is not formed),
    so the error of ``B A`` is the sum of two small per-factor errors.

What is kept
    Tensors with 0 or 1 dimensions (biases, gates, norm weights, bias/norm deltas, task embeddings) are
    stored unchanged in their own dtype: they are a tiny fraction of an adapter and the most sensitive
    to rounding (a gate or a norm scale multiplies everything behind it).

Schemes
    ``bits`` 8, 4, 2: ``"affine"`` (asymmetric min-max). Per channel ``lo = min(w)``, ``hi = max(w)``,
    ``scale = (hi - lo) / (2**bits - 1)``, codes ``q = round((w - lo) / scale)`` in ``[0, 2**bits - 1]``,
    ``w ~ lo + scale * q``. All ``2**bits`` levels are used (at 2 bits: four levels spanning the
    channel's range, which also suits channels that are not centred on zero); the error is at most
    ``scale / 2``. A constant channel (e.g. a zero-initialized LoRA ``B``) has ``scale = 0`` and comes
    back exactly (no division by zero, no NaN).

    ``bits`` 1: ``"sign"`` (one-bit adapters, "precision redundancy"): the sign of each weight plus one
    per-channel scale ``mean(|w|)``; ``w ~ sign(w) * mean|w|`` with ``sign(0)`` taken as ``+`` (a zero
    channel has scale 0 and comes back as zeros).

    Scales and offsets are float32, 4 bytes per channel each: on a LoRA ``B`` of rank 8 at 1 bit the
    scale costs as much as the codes, so small-rank factors shrink less than ``32 / bits``.

Packing
    Codes of the flattened tensor, little-end first: ``8 / bits`` codes per ``uint8`` (two 4-bit codes,
    four 2-bit, eight 1-bit), zero-padded to a whole byte.

In the safetensors file a quantized tensor ``K`` becomes ``K.__codes`` (uint8, packed), ``K.__scale``
(float32, ``(channels,)``) and, for ``"affine"``, ``K.__offset`` (float32); the config JSON's
``quantization`` field records bits, scheme and each quantized tensor's original shape and dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ALLOWED_BITS = (8, 4, 2, 1)
SCHEMES = {8: "affine", 4: "affine", 2: "affine", 1: "sign"}
CODES, SCALE, OFFSET = ".__codes", ".__scale", ".__offset"
QUANT_FORMAT_VERSION = 1


def check_bits(bits: object, owner: str = "save_adapter") -> int | None:
    """Validate a ``bits`` argument: None (full precision) or one of :data:`ALLOWED_BITS`."""
    if bits is None:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"{owner}: argument 'bits' must be None (full precision) or one of {list(ALLOWED_BITS)}, "
                         f"got {bits!r}")
    return bits


def is_quantized(t: Tensor) -> bool:
    """Which tensors low-bit storage quantizes: floating tensors with at least two dimensions."""
    return t.dim() >= 2 and t.is_floating_point() and t.numel() > 0


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` (any shape) into a flat uint8 tensor, ``8 // bits`` per byte."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    per = 8 // bits
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    return (flat.view(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes, flat, as int64."""
    if bits == 8:
        return packed[:numel].to(torch.int64)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:numel].to(torch.int64)


def packed_size(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def quantize(t: Tensor, bits: int) -> dict[str, Tensor]:
    """Quantize ``t`` of shape ``(C, ...)`` per channel (dim 0).

    Returns ``{"codes": uint8 (packed_size,), "scale": float32 (C,)}`` plus ``"offset": float32 (C,)``
    for the affine scheme (8/4/2 bits)."""
    check_bits(bits, "quantize")
    w = t.detach().to("cpu", torch.float32).reshape(t.shape[0], -1)  # (C, N)
    if bits == 1:
        scale = w.abs().mean(dim=1)
        codes = (w >= 0).to(torch.uint8)
        return {"codes": pack(codes, 1), "scale": scale.contiguous()}
    levels = (1 << bits) - 1
    lo, hi = w.min(dim=1).values, w.max(dim=1).values
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant channel: every code 0, w = lo
    codes = torch.round((w - lo[:, None]) / safe[:, None]).clamp_(0, levels)
    return {"codes": pack(codes, bits), "scale": scale.contiguous(), "offset": lo.contiguous()}


def dequantize(parts: dict[str, Tensor], bits: int, shape: list[int], dtype: torch.dtype) -> Tensor:
    """Rebuild a tensor of ``shape``/``dtype`` from :func:`quantize`'s parts."""
    channels = shape[0]
    numel = math.prod(shape)
    codes = unpack(parts["codes"], bits, numel).view(channels, -1).to(torch.float32)
    scale = parts["scale"].to(torch.float32)[:, None]
    if bits == 1:
        w = (2.0 * codes - 1.0) * scale
    else:
        w = parts["offset"].to(torch.float32)[:, None] + codes * scale
    return w.reshape(shape).to(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: object, source: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{source}: expected a floating dtype name such as 'float32', got {name!r}")
    return dtype


def quantize_state(tensors: dict[str, Tensor], bits: int) -> tuple[dict[str, Tensor], dict]:
    """Quantize a whole adapter state. Returns (tensors to write, the config's ``quantization`` record)."""
    check_bits(bits)
    out: dict[str, Tensor] = {}
    record: dict[str, dict] = {}
    for key, t in tensors.items():
        if not is_quantized(t):
            out[key] = t
            continue
        if not torch.isfinite(t).all():
            raise ValueError(f"tensor {key!r} has NaN or infinite values; it cannot be stored with bits={bits}")
        parts = quantize(t, bits)
        out[key + CODES] = parts["codes"]
        out[key + SCALE] = parts["scale"]
        if "offset" in parts:
            out[key + OFFSET] = parts["offset"]
        record[key] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    meta = {"version": QUANT_FORMAT_VERSION, "bits": bits, "scheme": SCHEMES[bits], "channel_dim": 0,
            "scale_dtype": "float32", "tensors": record}
    return out, meta


def dequantize_state(tensors: dict[str, Tensor], meta: object, source: str) -> dict[str, Tensor]:
    """Undo :func:`quantize_state`. ``source`` names the file in errors (field and tensor included)."""
    field = f"{source}: field 'quantization'"
    if not isinstance(meta, dict):
        raise ValueError(f"{field}: expected a JSON object, got {type(meta).__name__}")
    version = meta.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{field}.version: expected a positive integer, got {version!r}")
    if version > QUANT_FORMAT_VERSION:
        raise ValueError(f"{field}: version {meta['version']} is newer than this library reads "
                         f"({QUANT_FORMAT_VERSION}); upgrade mmadapters")
    bits = meta.get("bits")
    if bits not in ALLOWED_BITS:
        raise ValueError(f"{field}.bits: expected one of {list(ALLOWED_BITS)}, got {bits!r}")
    if meta.get("scheme") != SCHEMES[bits]:
        raise ValueError(f"{field}.scheme: expected {SCHEMES[bits]!r} for {bits} bits, got {meta.get('scheme')!r}")
    record = meta.get("tensors")
    if not isinstance(record, dict):
        raise ValueError(f"{field}.tensors: expected a JSON object of tensor name -> {{shape, dtype}}")
    out = dict(tensors)
    for key, info in record.items():
        where = f"{field}.tensors[{key!r}]"
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list) or len(shape) < 2 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"{where}.shape: expected a list of at least two positive integers, got {shape!r}")
        dtype = _dtype_from_name(info.get("dtype"), f"{where}.dtype")
        names = [key + CODES, key + SCALE] + ([key + OFFSET] if bits != 1 else [])
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{source}: quantized tensor {key!r} lacks {missing} in the weights file")
        parts = {"codes": out.pop(key + CODES), "scale": out.pop(key + SCALE)}
        if bits != 1:
            parts["offset"] = out.pop(key + OFFSET)
        expected = {"codes": ((packed_size(math.prod(shape), bits),), torch.uint8),
                    "scale": ((shape[0],), torch.float32), "offset": ((shape[0],), torch.float32)}
        for part, value in parts.items():
            want_shape, want_dtype = expected[part]
            if tuple(value.shape) != want_shape or value.dtype != want_dtype:
                raise ValueError(f"{source}: tensor {key + '.__' + part!r} is {value.dtype} {list(value.shape)}, "
                                 f"expected {want_dtype} {list(want_shape)} for shape {shape} at {bits} bits")
        out[key] = dequantize(parts, bits, shape, dtype)
    leftover = sorted(k for k in out if k.endswith((CODES, SCALE, OFFSET)))
    if leftover:
        raise ValueError(f"{source}: quantized parts {leftover[:5]} are not listed in {field}.tensors")
    return out
