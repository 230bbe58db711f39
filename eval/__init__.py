"""mmadapters.eval — metrics, benchmark readers, evaluators and the ``mmadapters`` command line.

Metrics and readers are leaves (numpy/torch only); evaluators and the CLI sit on top of every other
package and import their heavy dependencies only when they run.

- :mod:`~mmadapters.eval.metrics` — top-1/top-5 accuracy (NaN with fewer classes than k), mean per-class recall,
  UAR/WAR (DFER), corpus WER/CER and the ASR text normalization;
- :mod:`~mmadapters.eval.readers` — image folder, CSV, CoOp split JSON and CLIP_benchmark wds readers;
- :mod:`~mmadapters.eval.zeroshot_eval` — the ``mmadapters zeroshot`` evaluator (CLIP_benchmark's results schema);
- :mod:`~mmadapters.eval.fewshot_compare` — ``mmadapters fewshot-compare``: zero-shot vs Tip / Tip-F / CapS on generated tasks;
- :mod:`~mmadapters.eval.asr_eval` — ``mmadapters asr eval|transcribe``: per-language WER/CER, relative reduction,
  real-time factor and first-partial latency;
- :mod:`~mmadapters.eval.videoqa_eval` — multiple-choice VideoQA accuracy (Tem-Adapter); its settings and the
  ``mmadapters videoqa`` command line are in :mod:`~mmadapters.eval.videoqa_config` (no torch import);
- :mod:`~mmadapters.eval.vl_metrics` — the official VQA accuracy (answer normalization, leave-one-out), exact match
  (GQA, NLVR2), captioning BLEU-4 and CIDEr (pycocoevalcap's scorers with a Python PTB-like tokenizer);
- :mod:`~mmadapters.eval.vl_readers` — VQAv2 Karpathy, GQA, NLVR2 and COCO Karpathy readers and image-feature
  sources (h5, a folder of safetensors, images encoded on demand);
- :mod:`~mmadapters.eval.results_schema` — the one results schema of ``mmadapters eval <task>`` (torch-free);
- :mod:`~mmadapters.eval.sample_runner` — per-sample records for resumable, rank-sharded evaluation;
- :mod:`~mmadapters.eval.eval_cli` — ``mmadapters eval``; its tasks: ``eval_clip_args``/``clip_tasks`` (zeroshot,
  fewshot), ``eval_vl_args``/``vl_tasks`` (vqa, gqa, nlvr, caption), ``eval_video_args``/``video_tasks``
  (videoqa, dfer), ``eval_asr_args``/``asr_tasks`` (asr);
- :mod:`~mmadapters.eval.train_cli` — ``mmadapters train <recipe> --config FILE.yaml`` (the recipe registry);
- :mod:`~mmadapters.eval.report`, ``report_args`` — ``mmadapters report``: results files to markdown/CSV and PNG plots;
- :mod:`~mmadapters.eval.cli` — the ``mmadapters`` console script.
"""
