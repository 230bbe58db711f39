"""CLIP grid features for VL-T5: the last visual block's patch tokens, pooled to a fixed grid.

VL-Adapter feeds T5 the patch tokens of CLIP's last visual block (not the pooled embedding). Here they
come from open_clip's own ``VisionTransformer.forward_intermediates`` (the last block's output, through
``ln_post``, without the class token), reshaped to the patch grid ``(B, width, H/p, W/p)`` and
average-pooled to ``sqrt(num_tokens) x sqrt(num_tokens)``.

:func:`extract_features` writes them for a set of images to

- an ``.h5`` file: one dataset per ``img_id``, shape ``(num_tokens, width)``; file attributes
  ``num_tokens``, ``dim`` and ``clip`` (the CLIP's identity), or
- a directory of ``<img_id>.safetensors`` files, tensor key ``"features"`` (same shape), metadata
  ``num_tokens``, ``dim``, ``clip``,

the two formats ``mmadapters.vision.vl_readers`` reads (``H5Features``, ``SafetensorsDirFeatures``).
Command line: ``python -m mmadapters.vision.vl_features --images DIR --out FEATS.h5``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURES_KEY = "features"


def feature_clip(clip_model: str | None, clip_pretrained: str | None = None) -> str | None:
    """The CLIP that computes VL-T5 grid features: ``clip_model`` when given, else the CLIP the shipped tiny VL-T5 was
    pretrained on (``vision/assets/tiny_vlt5/feature_clip``, the tiny CLIP of before the re-shipped one: a VL-T5's
    visual projection only reads the features of the CLIP it was trained with)."""
    if clip_model is not None or clip_pretrained is not None:
        return clip_model
    from .vlt5 import TINY_VLT5_DIR

    return f"local-dir:{TINY_VLT5_DIR / 'feature_clip'}"


def _visual_tower(clip_model: nn.Module) -> nn.Module:
    visual = getattr(clip_model, "visual", clip_model)
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "patch_size"):
        raise TypeError(f"clip_grid_features: {type(visual).__name__} is not an open_clip VisionTransformer "
                        "(expected a CLIP whose .visual has forward_intermediates and patch_size)")
    return visual


def grid_side(num_tokens: int) -> int:
    """``sqrt(num_tokens)``; raises unless ``num_tokens`` is a positive perfect square."""
    side = math.isqrt(num_tokens) if num_tokens > 0 else 0
    if side * side != num_tokens or side == 0:
        raise ValueError(f"num_tokens: expected a positive perfect square (4, 9, 16, 36, ...), got {num_tokens}")
    return side


@torch.no_grad()
def clip_grid_features(clip_model: nn.Module, images: Tensor, num_tokens: int = 16) -> Tensor:
    """``(B, 3, H, W)`` preprocessed images -> ``(B, num_tokens, width)`` grid features (float32).

    ``clip_model`` is an open_clip CLIP (or its ``.visual`` tower). The tokens are the last residual
    block's output after ``ln_post`` (the class token dropped), adaptive-average-pooled from the
    ``H/p x W/p`` patch grid to ``sqrt(num_tokens)`` per side (row-major order).
    """
    visual = _visual_tower(clip_model)
    side = grid_side(num_tokens)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected (B, 3, H, W), got shape {tuple(images.shape)}")
    param = next(visual.parameters())
    out = visual.forward_intermediates(images.to(device=param.device, dtype=param.dtype), indices=1,
                                       normalize_intermediates=True, intermediates_only=True, output_fmt="NCHW")
    grid = out["image_intermediates"][-1]  # (B, width, H/p, W/p)
    if side > min(grid.shape[-2:]):
        raise ValueError(f"num_tokens={num_tokens}: a {side}x{side} grid is finer than the model's {grid.shape[-2]}x"
                         f"{grid.shape[-1]} patch grid")
    pooled = F.adaptive_avg_pool2d(grid.float(), side)  # (B, width, side, side)
    return pooled.flatten(2).transpose(1, 2).contiguous()  # (B, side*side, width)


def _as_id_map(images: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike]) -> dict[str, Path]:
    if isinstance(images, Mapping):
        return {str(k): Path(v) for k, v in images.items()}
    out: dict[str, Path] = {}
    for p in images:
        p = Path(p)
        if p.stem in out:
            raise ValueError(f"extract_features: two images share the id {p.stem!r}: {out[p.stem]} and {p}")
        out[p.stem] = p
    return out


def _safe_id(img_id: str) -> str:
    if not img_id or "/" in img_id or "\\" in img_id or img_id in (".", "..") or img_id.startswith("."):
        raise ValueError(f"extract_features: image id {img_id!r} cannot be a file name")
    return img_id


def extract_features(images: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike], bundle: Any,
                     out: str | os.PathLike, *, num_tokens: int = 16, batch_size: int = 32, dtype: torch.dtype = torch.float32,
                     overwrite: bool = False, progress: bool = True) -> Path:
    """Encode images with a CLIP bundle (:func:`mmadapters.vision.clip.load_clip`) and store their grid features.

    ``images``: ``{img_id: path}``, or a list of paths (id = file stem). ``out`` ending in ``.h5``: one HDF5
    file, written to a temporary name and renamed when complete. Otherwise a directory of
    ``<img_id>.safetensors`` files, each written atomically; existing files are kept unless ``overwrite``
    (so an interrupted run resumes). Returns ``out``.
    """
    from PIL import Image
    from safetensors.torch import save
    from tqdm.auto import tqdm

    from mmadapters.io import atomic_write_bytes

    id_map = _as_id_map(images)
    for img_id in id_map:
        _safe_id(img_id)
    out = Path(out)
    as_h5 = out.suffix in (".h5", ".hdf5")
    identity = bundle.info.identity() if hasattr(bundle, "info") else type(bundle.model).__name__
    todo = list(id_map)
    if as_h5:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out}: exists (pass overwrite=True to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        if not overwrite:
            todo = [i for i in todo if not (out / f"{i}.safetensors").is_file()]

    h5 = tmp_path = None
    if as_h5:
        import h5py

        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp_path = Path(tmp_name)
        h5 = h5py.File(tmp_path, "w")
        h5.attrs["num_tokens"] = num_tokens
        h5.attrs["clip"] = identity
    dim = None
    try:
        bar = tqdm(total=len(todo), desc=f"CLIP grid features -> {out.name}", unit="img", disable=not progress)
        for start in range(0, len(todo), batch_size):
            ids = todo[start:start + batch_size]
            batch = []
            for i in ids:
                path = id_map[i]
                if not path.is_file():
                    raise FileNotFoundError(f"extract_features: image {i!r}: file not found: {path}")
                with Image.open(path) as img:
                    batch.append(bundle.preprocess(img.convert("RGB")))
            feats = clip_grid_features(bundle.model, torch.stack(batch), num_tokens)  # (b, N, D)
            dim = feats.shape[-1]
            for i, f in zip(ids, feats.to(dtype).cpu(), strict=True):
                if h5 is not None:
                    h5.create_dataset(i, data=f.numpy())
                else:
                    meta = {"num_tokens": str(num_tokens), "dim": str(dim), "clip": identity}
                    atomic_write_bytes(out / f"{i}.safetensors", save({FEATURES_KEY: f.contiguous()}, metadata=meta))
            bar.update(len(ids))
        bar.close()
        if h5 is not None:
            if dim is None:  # no images: record the width from the model itself
                dim = clip_grid_features(bundle.model, torch.zeros(1, 3, *_image_size(bundle.model)), num_tokens).shape[-1]
            h5.attrs["dim"] = dim
            h5.close()
            h5 = None
            os.chmod(tmp_path, 0o644)
            os.replace(tmp_path, out)
    finally:
        if h5 is not None:
            h5.close()
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()
    return out


def _image_size(clip_model: nn.Module) -> tuple[int, int]:
    size = getattr(_visual_tower(clip_model), "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CLIP grid features of a folder of images (.h5 or a dir of .safetensors)")
    p.add_argument("--images", required=True, help="folder of images (every *.png / *.jpg; id = file stem)")
    p.add_argument("--out", required=True, help="FILE.h5, or a directory for <img_id>.safetensors files")
    p.add_argument("--model", default=None, help="open_clip model (default: the shipped tiny CLIP)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--num-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--fp16", action="store_true", help="store float16")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from .clip import load_clip

    paths = sorted(q for q in Path(args.images).iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise SystemExit(f"{args.images}: no .png/.jpg images")
    bundle = load_clip(feature_clip(args.model, args.pretrained), args.pretrained)
    out = extract_features(paths, bundle, args.out, num_tokens=args.num_tokens, batch_size=args.batch_size,
                           dtype=torch.float16 if args.fp16 else torch.float32, overwrite=args.overwrite)
    print(f"wrote {len(paths)} images' features to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["FEATURES_KEY", "clip_grid_features", "extract_features", "grid_side", "main"]
