"""Continue pretraining the tiny CLIP on frames of generated moving-shape videos (the Tem-Adapter world).

    python scripts/pretrain_video_clip.py --output video/assets/video_clip --steps 1500 --threads 1

Why: the shipped tiny CLIP saw one large shape per 64 px still. On frames of the moving-shape VideoQA clips
(:mod:`mmadapters.video.synth_traffic`: three small shapes in lanes) its features tell the background apart but
hardly the objects' colour or shape, and a linear probe cannot read an object's position or size from them — yet
moves, growth and collisions are changes of exactly those.

What: ``mmadapters train clip-pretrain`` with ``recipe.data: video-frames`` (state-only frame captions, mirrored
hard negatives, linear probes on held-out clips before and after: :mod:`mmadapters.vision.clip_pretrain`),
initialized from the shipped tiny CLIP (``--init none``: random), with the settings in ``VIDEO`` below; flags, run
folder and output as in ``scripts/pretrain_tiny_clip.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_tiny_clip import main  # noqa: E402

TINY_CLIP = Path(__file__).resolve().parent.parent / "vision" / "assets" / "tiny_clip"
# 64 clips per step, one frame + its mirror each (128 images); warmup 50 of 1500 steps; best/ by position R²
VIDEO = (f"recipe.init={TINY_CLIP}", "recipe.clips=1200", "recipe.frames_per_clip=1", "recipe.probe_clips=80",
         "trainer.steps=1500", "trainer.batch_size=64", "trainer.warmup_ratio=0.0334", "trainer.eval_every=100",
         "trainer.checkpoint_every=100", "trainer.select_metric=x_r2")


def run(argv: list[str] | None = None) -> int:
    return main(argv, data="video-frames", output="video/assets/video_clip", defaults=VIDEO, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(run())
