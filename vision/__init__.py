"""mmadapters.vision — image and vision-language backbones and recipes.

Modules (import the one you need; nothing heavy is imported here):

- :mod:`~mmadapters.vision.clip` — CLIP through open_clip's factory (tags, local files, ``local-dir:``,
  ``hf-hub:``, the shipped tiny CLIP) with adapter points on both towers;
- :mod:`~mmadapters.vision.vit` — timm ViTs (local weights via ``pretrained_cfg_overlay``) with adapter points;
- :mod:`~mmadapters.vision.zeroshot` — the zero-shot classifier (batched, cached on disk) and image features;
- :mod:`~mmadapters.vision.fewshot`, ``tip_adapter``, ``caps_adapter`` — Tip-Adapter / Tip-Adapter-F and
  CapS-Adapter on a K-shot support set;
- :mod:`~mmadapters.vision.synth` — a seeded generator of captioned images (tasks for tests and benchmarks).

Still to come: the VL-T5 backbone and the VL-Adapter recipe (shared adapters, Hyperformer, Compacter).
"""
