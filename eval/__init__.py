"""mmadapters.eval — metrics, benchmark readers, evaluators and the ``mmadapters`` command line.

Metrics and readers are leaves (numpy/torch only); evaluators and the CLI sit on top of every other
package and import their heavy dependencies only when they run.

- :mod:`~mmadapters.eval.metrics` — top-1/top-5 accuracy (NaN with fewer classes than k), mean per-class recall;
- :mod:`~mmadapters.eval.readers` — image folder, CSV, CoOp split JSON and CLIP_benchmark wds readers;
- :mod:`~mmadapters.eval.zeroshot_eval` — the ``mmadapters zeroshot`` evaluator (CLIP_benchmark's results schema);
- :mod:`~mmadapters.eval.fewshot_compare` — ``mmadapters fewshot-compare``: zero-shot vs Tip / Tip-F / CapS on generated tasks;
- :mod:`~mmadapters.eval.cli` — the ``mmadapters`` console script.

Still to come: UAR/WAR, VQA accuracy, WER/CER, BLEU/CIDEr and their benchmark readers.
"""
