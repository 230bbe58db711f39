"""mmadapters.video — video loading and video recipes.

- :mod:`.io` — ``load_clip(path, num_frames, strategy)``: decord first, PyAV fallback, frame directories,
  TSN/random/strided sampling, time-bounded decoding and named errors (:class:`VideoError`).
- :mod:`.data` — datasets decoding in DataLoader workers (bad files skipped and counted) and a frozen-CLIP
  frame-feature cache on disk.
- :mod:`.readers` — SUTD-TrafficQA jsonl and DFEW / MAFW / FERV39k annotation files.
- :mod:`.qa_features` — frozen-CLIP frame and question+candidate features of a VideoQA split, VideoQA accuracy.
- :mod:`.tem_adapter` — Tem-Adapter (Semantic and Temporal Aligners) for multiple-choice VideoQA.
- :mod:`.fineclipper`, :mod:`.cues`, :mod:`.dfer` — FineCLIPER for dynamic facial expression recognition: the
  model, the landmark / mask / description cues, the clips and their batches.
- :mod:`.tem_train`, :mod:`.fineclipper_train` — ``mmadapters train tem-adapter | fineclipper`` (the only
  training path; ``mmadapters eval videoqa | dfer`` scores their ``best/`` or ``last/``).
- :mod:`.synth` — generated moving-shape QA videos and cartoon expression clips.

(``mmadapters.video.load_clip`` loads a *video clip*; ``mmadapters.vision.clip.load_clip`` loads a CLIP model.)
"""

from .io import VideoError, load_clip, sample_indices

__all__ = ["VideoError", "load_clip", "sample_indices"]
