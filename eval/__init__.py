"""mmadapters.eval — metrics, benchmark readers, evaluators and the ``mmadapters`` command line.

Metrics and readers are leaves (numpy/torch only); evaluators and the CLI sit on top of every other
package and import their heavy dependencies only when they run.

- :mod:`~mmadapters.eval.metrics` — top-1/top-5 accuracy (NaN with fewer classes than k), mean per-class recall,
  UAR/WAR (DFER), corpus WER/CER and the ASR text normalization, the official VQA accuracy (answer
  normalization, leave-one-out), exact match (GQA, NLVR2), captioning BLEU-4 and CIDEr (pycocoevalcap's
  scorers with a Python PTB-like tokenizer);
- :mod:`~mmadapters.eval.fewshot_compare` — ``mmadapters fewshot-compare``: zero-shot vs Tip / Tip-F / CapS on generated
  tasks (a results file of the shared schema, task ``fewshot_comparison``);
- :mod:`~mmadapters.eval.asr_transcribe` — ``mmadapters asr transcribe``, language-adapter resolution and the
  streaming runner that ``mmadapters eval asr`` (``asr_tasks``) times;
- :mod:`~mmadapters.eval.results_schema` — the one results schema of ``mmadapters eval <task>`` (torch-free);
  :mod:`~mmadapters.eval.results_io` — run keys, the overwrite guard, output name templates, the cache folder;
- :mod:`~mmadapters.eval.sample_runner` — per-sample records for resumable, rank-sharded evaluation, and
  ``evaluate()``, every evaluator's shared second half (records -> metrics -> results file);
- :mod:`~mmadapters.eval.eval_cli` — ``mmadapters eval``; its tasks: ``eval_clip_args``/``clip_tasks`` (zeroshot,
  also as ``mmadapters zeroshot``; fewshot), ``eval_vl_args``/``vl_tasks`` (vqa, gqa, nlvr, caption), ``eval_video_args``/``video_tasks``
  (videoqa, dfer), ``eval_asr_args``/``asr_tasks`` (asr);
- :mod:`~mmadapters.eval.train_cli` — ``mmadapters train <recipe> --config FILE.yaml`` (the recipe registry);
- :mod:`~mmadapters.eval.report`, ``report_args`` — ``mmadapters report``: results files to markdown/CSV and PNG plots;
- :mod:`~mmadapters.eval.cli` — the ``mmadapters`` console script.
"""
