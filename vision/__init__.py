"""mmadapters.vision — image and vision-language backbones and recipes.

Modules (import the one you need; nothing heavy is imported here):

- :mod:`~mmadapters.vision.clip` — CLIP through open_clip's factory (tags, local files, ``local-dir:``,
  ``hf-hub:``, the shipped tiny CLIP) with adapter points on both towers; :mod:`~mmadapters.vision.hf_clip`
  converts transformers CLIP folders into open_clip ones once (and maps peft LoRAs saved on them);
- :mod:`~mmadapters.vision.vit` — timm ViTs (timm state dicts and transformers ViT folders, loaded strictly) with
  adapter points;
- :mod:`~mmadapters.vision.zeroshot` — the zero-shot classifier (batched, cached on disk) and image features;
- :mod:`~mmadapters.vision.readers` — image classification datasets (image folder, CSV, CoOp split JSON,
  CLIP_benchmark wds) and how a run opens them (generated tasks, splits, class names, templates);
- :mod:`~mmadapters.vision.fewshot`, ``tip_adapter``, ``caps_adapter`` — Tip-Adapter / Tip-Adapter-F and
  CapS-Adapter on a K-shot support set;
- :mod:`~mmadapters.vision.synth` — a seeded generator of captioned images (tasks for tests and benchmarks);
- :mod:`~mmadapters.vision.synth_vl` — generated multi-object scenes with VQA-, GQA-, NLVR2- and COCO-format tasks;
- :mod:`~mmadapters.vision.vlt5` — VL-T5: stock transformers T5 plus a visual projection of CLIP grid features,
  with adapter points (``vl_tokenizer``: word-level T5-layout tokenizers; ``vl_features``: CLIP grid features);
- :mod:`~mmadapters.vision.vl_readers` — VQAv2 Karpathy, GQA, NLVR2 and COCO Karpathy readers and image-feature
  sources (h5, a folder of safetensors, images encoded on demand);
- :mod:`~mmadapters.vision.vl_variants`, :mod:`~mmadapters.vision.vl_adapter` — VL-Adapter: full fine-tuning,
  per-task / half-shared / shared adapters, Hyperformer, Compacter, PHM, LoRA, prompt tuning; the recipe's
  inputs and batches, its one prediction + metrics path (``mmadapters eval`` and validation) and checkpoints;
- :mod:`~mmadapters.vision.fewshot_train`, :mod:`~mmadapters.vision.vl_train` — ``mmadapters train tip-adapter |
  caps-adapter | vl-adapter`` (the recipes on the training engine); :mod:`~mmadapters.vision.gate` — the few-shot
  gate of generated tasks (16-shot linear probe minus zero-shot);
- :mod:`~mmadapters.vision.clip_pretrain`, :mod:`~mmadapters.vision.vlt5_pretrain` — ``mmadapters train
  clip-pretrain | vlt5-pretrain``: pretraining the shipped tiny backbones on generated data;
  :mod:`~mmadapters.vision.diffusion_pretrain` — ``mmadapters train diffusion-pretrain``: a tiny text-conditioned
  diffusion DiT on generated shapes (the generation adapters' go / no-go; needs the ``gen`` extra, diffusers).
"""
