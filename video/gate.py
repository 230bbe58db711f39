"""The gate of a generated VideoQA world: do a CLIP's frame features encode what changes?

:func:`x_position_gate` decodes the world's videos, encodes every frame with a CLIP (unit-norm image
features, as the Tem-Adapter recipe feeds them by default), fits a ridge regression from the features to the
actor's x-position on the train split's frames and reports R² on the test split's frames (other clips: the
probe never sees a test video). Aim: R² ≥ 0.8 (issue 19); below it, the frames do not say where the object is
and no temporal model on top can tell "starts on the left" from "ends on the left".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["GATE_AIM", "ridge_r2", "x_position_gate"]

GATE_AIM = 0.8
ALPHAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    w = np.linalg.solve(z.T @ z + alpha * len(z) * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return mean, scale, float(y.mean()), w


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1.0 - ((y - pred) ** 2).sum() / max(1e-12, ((y - y.mean()) ** 2).sum()))


def ridge_r2(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             train_groups: np.ndarray | None = None) -> tuple[float, float]:
    """Ridge probe ``train_x`` (N, D) → ``train_y`` (N,), scored on ``test_x`` (M, D), ``test_y`` (M,).

    The penalty (per sample, on standardised features) is picked among :data:`ALPHAS` on a held-out fifth of
    the train groups (whole clips when ``train_groups`` (N,) is given), then refit on all train rows.
    Returns ``(R² on test, alpha)``.
    """
    if len(train_x) < 2 or len(test_x) < 2:
        raise ValueError(f"ridge_r2: need at least 2 train and 2 test rows, got {len(train_x)} and {len(test_x)}")
    groups = train_groups if train_groups is not None else np.arange(len(train_x))
    ids = np.unique(groups)
    held = np.isin(groups, ids[np.random.default_rng(0).permutation(len(ids))[: max(1, len(ids) // 5)]])
    best = ALPHAS[0], -np.inf
    if held.any() and (~held).sum() >= 2:
        for alpha in ALPHAS:
            mean, scale, bias, w = _ridge_fit(train_x[~held], train_y[~held], alpha)
            score = _r2(train_y[held], ((train_x[held] - mean) / scale) @ w + bias)
            best = max(best, (alpha, score), key=lambda t: t[1])
    mean, scale, bias, w = _ridge_fit(train_x, train_y, best[0])
    return _r2(test_y, ((test_x - mean) / scale) @ w + bias), best[0]


def _decode(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _encode(bundle, frames: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N, D) unit-norm CLIP image features."""
    import torch
    from PIL import Image

    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            pixels = torch.stack([bundle.preprocess(Image.fromarray(f)) for f in frames[i : i + batch]])
            feats = bundle.model.encode_image(pixels).float()
            out.append(torch.nn.functional.normalize(feats, dim=-1).numpy())
    return np.concatenate(out)


def x_position_gate(root: str | os.PathLike, model: str | None = None, *, bundle=None) -> dict:
    """Measure the x-position probe on the world under ``root`` (``meta.jsonl`` + ``videos/``).

    ``model`` is what :func:`mmadapters.vision.clip.load_clip` accepts (None: the shipped tiny CLIP);
    ``bundle`` an already loaded :class:`~mmadapters.vision.clip.ClipBundle`. Returns the record written
    into ``dataset.json``: R², the aim, whether it passed, the model, frame counts and the penalty.
    """
    root = Path(root)
    meta_path = root / "meta.jsonl"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: no meta.jsonl; x_position_gate needs a world written by generate_motion")
    if bundle is None:
        from ..vision.clip import load_clip

        bundle = load_clip(model, declare_points=False)
    rows = {"train": ([], [], []), "test": ([], [], [])}
    for line in meta_path.read_text(encoding="utf-8").splitlines():
        m = json.loads(line)
        for field in ("split", "vid_filename", "actor", "track"):
            if field not in m:
                raise ValueError(f"{meta_path}: record {m.get('record_id')} lacks {field!r}")
        frames = _decode(root / "videos" / m["vid_filename"])
        xs = np.array(m["track"]["x"], dtype=np.float64)[:, m["actor"]]
        if len(frames) != len(xs):
            raise ValueError(f"{root / 'videos' / m['vid_filename']}: {len(frames)} frames decoded, meta.jsonl tracks {len(xs)}")
        feats, targets, groups = rows[m["split"]]
        feats.append(_encode(bundle, frames))
        targets.append(xs)
        groups.append(np.full(len(xs), m["record_id"]))
    train_x, train_y, train_g = (np.concatenate(a) for a in rows["train"])
    test_x, test_y, _ = (np.concatenate(a) for a in rows["test"])
    r2, alpha = ridge_r2(train_x, train_y, test_x, test_y, train_g)
    return {"x_position_probe_r2": round(r2, 4), "aim": GATE_AIM, "passed": bool(r2 >= GATE_AIM),
            "model": model or "tiny_clip (shipped)", "features": "unit-norm encode_image", "probe": "ridge",
            "alpha": alpha, "frames": {"train": len(train_y), "test": len(test_y)}}
