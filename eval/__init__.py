"""mmadapters.eval — metrics, benchmark readers, evaluators and the ``mmadapters`` command line.

Metrics and readers are leaves (numpy/torch only); evaluators and the CLI sit on top of every other
package. Will hold: top-1/top-5 and mean per-class recall, UAR/WAR, VQA accuracy, WER/CER,
BLEU/CIDEr, readers for each benchmark's on-disk format, and one results-JSON schema.
"""
