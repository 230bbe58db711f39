"""``mmadapters eval asr``: speech recognition in the shared results schema, resumable and rank-sharded.

The pieces are :mod:`mmadapters.eval.asr_eval`'s (adapter loading and per-language routing, decoding, the
streaming runner, baselines); what this module adds is the shared machinery: every utterance becomes a
record in the samples log (:mod:`mmadapters.eval.sample_runner`) as soon as its batch is decoded, and every
metric is computed from the records, so an interrupted run resumes and gives the numbers an uninterrupted
one gives. A record::

    {"id", "lang", "adapter", "audio_path", "audio_s", "ref", "hyp",
     "word_edits", "ref_words", "char_edits", "ref_chars",     # on normalize_text'ed ref/hyp
     "decode_s",                                               # this utterance's share of its batch's decoding
     ["first_pass", "first_word_edits", "latency_s"]}          # --streaming

Results (:func:`~mmadapters.eval.results_schema.build_results`, task ``"asr"``):

- ``metrics``: ``wer`` (the mean of the languages' corpus WERs, each language once: the LDA paper's average),
  ``cer``, ``wer_pooled`` / ``cer_pooled`` (all utterances as one corpus), ``languages``; with ``--baseline``
  ``relative_wer_reduction`` (mean of the per-language reductions) and ``relative_wer_reduction_of_average``;
  with ``--streaming`` ``wer_first_pass``.
- ``per_group``: per language ``wer``, ``cer``, ``utterances``, ``skipped``, ``words``, ``chars``,
  ``word_edits``, ``char_edits``, ``audio_s`` (+ ``relative_wer_reduction``, ``wer_first_pass``).
- ``skipped``: one ``{"id", "reason"}`` per unusable audio file (``AudioError: <path>: <problem>``);
  ``counts``: ``total``, ``evaluated``, ``skipped``, ``resumed``.
- ``timings``: ``model_load_s``, ``decode_s`` and ``audio_s`` (over every record, resumed ones included), ``rtf``,
  ``total_s``; with ``--streaming`` first-partial latency statistics.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .asr_eval import (
    DECODES,
    _dir_identity,
    _latency_summary,
    _nanmean,
    _StreamingRunner,
    corpus_scores,
    decode_texts,
    read_baseline,
    relative_reduction,
    resolve_adapters,
    utterance_scores,
)

TASK = "asr"


def dataset_name(path: str, split: str) -> str:
    """A manifest's stem, or ``<folder>/<split>`` for a dataset folder."""
    p = Path(path)
    if p.is_file():
        return p.stem
    return f"{p.resolve().name or p.name}/{split}"


class AsrPredictor:
    """``predict`` for :func:`~mmadapters.eval.sample_runner.run_samples`: loads a batch's audio (an unusable file
    becomes that sample's :class:`~mmadapters.speech.audio.AudioError`), decodes the rest in one batch, each
    utterance through its language's adapter, and returns one record per utterance."""

    def __init__(self, bundle, lang_map: Mapping[str, str], *, decode: str = "greedy", beam: int = 4, pass_: str = "second",
                 streaming: bool = False, chunk_ms: float = 160.0, max_seconds: float | None = 60.0, mono: str = "error"):
        self.bundle, self.lang_map = bundle, dict(lang_map)
        self.decode, self.beam, self.pass_ = decode, beam, pass_
        self.max_seconds, self.mono = max_seconds, mono
        self.runner = _StreamingRunner(bundle, decode, beam, chunk_ms, routed=bool(lang_map)) if streaming else None

    def __call__(self, batch: Sequence) -> list[dict[str, Any] | BaseException]:
        from mmadapters.speech.audio import SAMPLE_RATE, AudioError, load_audio

        out: list[dict[str, Any] | BaseException | None] = [None] * len(batch)
        loaded = []
        for k, u in enumerate(batch):
            try:
                loaded.append((k, u, load_audio(u.audio_path, max_seconds=self.max_seconds, mono=self.mono)))
            except AudioError as err:
                out[k] = err
        if not loaded:
            return out  # type: ignore[return-value]
        names = [self.lang_map.get(u.lang) for _, u, _ in loaded]
        audio = [w.shape[0] / SAMPLE_RATE for _, _, w in loaded]
        extras: list[dict[str, Any]] = []
        if self.runner is None:
            t0 = time.perf_counter()
            texts = decode_texts(self.bundle, [w for _, _, w in loaded], names, decode=self.decode, beam=self.beam,
                                 routed=bool(self.lang_map), pass_=self.pass_)
            seconds = time.perf_counter() - t0
            total = sum(audio)
            extras = [{"decode_s": seconds * a / total} for a in audio]
        else:
            texts = []
            for (_, u, w), name in zip(loaded, names, strict=True):
                r = self.runner.run(w, name)
                texts.append(r["text"])
                extras.append({"decode_s": r["push_s"] + r["finish_s"], "first_pass": r["first_pass"],
                               "first_word_edits": utterance_scores(u.text, r["first_pass"])["word_edits"],
                               "latency_s": r["latency"]})
        for (k, u, _), name, a, text, extra in zip(loaded, names, audio, texts, extras, strict=True):
            out[k] = {"lang": u.lang, "adapter": name, "audio_path": u.audio_path, "audio_s": a, "ref": u.text, "hyp": text,
                      **utterance_scores(u.text, text), **extra}
        return out  # type: ignore[return-value]


def asr_scores(records: Sequence[Mapping[str, Any]], languages: Sequence[str], skipped_langs: Sequence[str], *,
               baseline_wer: Mapping[str, float] | None = None,
               streaming: bool = False) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(metrics, per-language metrics) from utterance records; ``languages``: every language of the data (one
    without evaluated utterances has NaN WER and stays out of the averages); ``skipped_langs``: the language of
    each skipped sample."""
    per_group: dict[str, dict[str, float]] = {}
    for lang in languages:
        recs = [r for r in records if r["lang"] == lang]
        scores = corpus_scores(recs)
        entry: dict[str, float] = {**scores, "skipped": sum(1 for s in skipped_langs if s == lang),
                                   "audio_s": round(sum(float(r["audio_s"]) for r in recs), 3)}
        if streaming:
            words = scores["words"]
            entry["wer_first_pass"] = sum(int(r["first_word_edits"]) for r in recs) / words if words else math.nan
        if baseline_wer is not None and lang in baseline_wer:
            entry["relative_wer_reduction"] = relative_reduction(baseline_wer[lang], entry["wer"])
        per_group[lang] = entry
    pooled = corpus_scores(records)
    metrics: dict[str, float] = {
        "wer": _nanmean(e["wer"] for e in per_group.values()), "cer": _nanmean(e["cer"] for e in per_group.values()),
        "wer_pooled": pooled["wer"], "cer_pooled": pooled["cer"], "languages": len(languages),
    }
    if streaming:
        metrics["wer_first_pass"] = _nanmean(e["wer_first_pass"] for e in per_group.values())
    if baseline_wer is not None:
        common = [lang for lang in languages if lang in baseline_wer and per_group[lang]["utterances"]]
        metrics["relative_wer_reduction"] = _nanmean(per_group[lang]["relative_wer_reduction"] for lang in common)
        metrics["relative_wer_reduction_of_average"] = relative_reduction(
            _nanmean(baseline_wer[lang] for lang in common), _nanmean(per_group[lang]["wer"] for lang in common))
    return metrics, per_group


def _timings(records: Sequence[Mapping[str, Any]], *, load_s: float, total_s: float, streaming: bool) -> dict[str, float]:
    decode_s = sum(float(r["decode_s"]) for r in records)
    audio_s = sum(float(r["audio_s"]) for r in records)
    timings = {"model_load_s": round(load_s, 4), "decode_s": round(decode_s, 4), "audio_s": round(audio_s, 3),
               "rtf": decode_s / audio_s if audio_s else math.nan}
    if streaming:
        lat = _latency_summary([float(r["latency_s"]) for r in records if r.get("latency_s") is not None])
        timings.update({f"first_partial_latency_{k}_s": float(v) for k, v in lat.items() if k != "count"})
    timings["total_s"] = round(total_s, 4)
    return timings


def run_eval_asr(args: argparse.Namespace) -> dict[str, Any] | None:
    """Run ``mmadapters eval asr`` (flags: :mod:`mmadapters.eval.eval_asr_args`). Returns the results on rank 0 (the
    one that writes ``--output``), None on the other ranks under torchrun."""
    from mmadapters import distributed

    t_start = time.perf_counter()
    if args.decode not in DECODES:
        raise ValueError(f"--decode {args.decode!r}: expected one of {', '.join(DECODES)}")
    if args.beam < 1 or args.batch_size < 1 or not args.chunk_ms > 0:
        raise ValueError(f"--beam ({args.beam}) and --batch-size ({args.batch_size}) must be >= 1 and --chunk-ms "
                         f"({args.chunk_ms}) > 0")
    if args.streaming and args.pass_ != "second":
        raise ValueError("--streaming decodes the first pass as it streams and the second pass at the end; drop --pass")
    joined = not distributed.is_distributed() and distributed.init_from_env(args.device)  # this call started the group
    try:
        return _evaluate(args, t_start)
    finally:
        if joined:
            distributed.cleanup()


def _evaluate(args: argparse.Namespace, t_start: float) -> dict[str, Any] | None:
    import torch

    from mmadapters import distributed
    from mmadapters.speech.model import load_asr
    from mmadapters.speech.readers import read_speech_dataset

    from .results_io import check_overwrite
    from .results_schema import build_results, run_key, write_results
    from .sample_runner import SampleLog, run_samples

    device = distributed.device_for_rank(args.device)
    torch.manual_seed(args.seed)

    utterances = read_speech_dataset(args.manifest, split=args.split, lang=args.lang, allow_absolute=args.allow_absolute)
    if not utterances:
        raise ValueError(f"{args.manifest}: no utterances (split {args.split!r})")
    dataset = dataset_name(args.manifest, args.split)
    model_name = args.model or "tiny_asr"
    t0 = time.perf_counter()
    bundle = load_asr(args.model, device=device)
    load_s = time.perf_counter() - t0
    lang_map, adapters_info = resolve_adapters(bundle.model, args.adapters)
    baseline_wer, baseline_info = read_baseline(args.baseline) if args.baseline is not None else (None, None)
    max_seconds = args.max_seconds or None
    settings = {
        "manifest": str(Path(args.manifest).resolve()), "split": args.split, "lang": args.lang,
        "allow_absolute": args.allow_absolute, "model": _dir_identity(bundle.path), "adapters": _dir_identity(args.adapters),
        "languages_adapted": dict(sorted(lang_map.items())), "decode": args.decode,
        "beam": args.beam if args.decode == "beam" else None, "pass": args.pass_, "streaming": args.streaming,
        "chunk_ms": args.chunk_ms if args.streaming else None, "max_seconds": max_seconds, "mono": args.mono,
        "baseline": None if args.baseline is None else str(Path(args.baseline).resolve()),
        "normalization": "mmadapters.eval.metrics.normalize_text", "device": str(torch.device(args.device)),
    }
    key = run_key(dataset=dataset, model=model_name, pretrained=None, task=TASK, settings=settings)
    output = Path(str(args.output).format(dataset=dataset.replace("/", "_"), model=Path(model_name).name, pretrained="",
                                          task=TASK))
    if output.is_dir():
        raise IsADirectoryError(f"--output {output}: is a directory; expected a results file path")
    check_overwrite(output, key, args.overwrite)
    log = SampleLog.open(output, key, restart=args.restart)
    predictor = AsrPredictor(bundle, lang_map, decode=args.decode, beam=args.beam, pass_=args.pass_, streaming=args.streaming,
                             chunk_ms=args.chunk_ms, max_seconds=max_seconds, mono=args.mono)
    outcome = run_samples(utterances, sample_id=lambda u: u.id, predict=predictor, batch_size=args.batch_size, log=log,
                          fail_fast=args.fail_fast, progress=args.progress, desc="asr")
    if not outcome.records:
        raise ValueError(f"none of the {len(utterances)} utterances of {args.manifest} could be evaluated; first skipped: "
                         f"{outcome.skipped[0]['id']}: {outcome.skipped[0]['reason']}")
    lang_of = {u.id: u.lang for u in utterances}
    records = list(outcome.records.values())
    metrics, per_group = asr_scores(records, sorted(set(lang_of.values())), [lang_of[s["id"]] for s in outcome.skipped],
                                    baseline_wer=baseline_wer, streaming=args.streaming)
    parameters = None
    if adapters_info is not None:
        adapter_total = sum(adapters_info["parameters"].values())
        parameters = {"trainable": adapter_total, "total": adapters_info["base_parameters"] + adapter_total,
                      "base": adapters_info["base_parameters"], "per_adapter": adapters_info["parameters"]}
    results = build_results(
        dataset=dataset, model=model_name, pretrained=None, task=TASK, metrics=metrics,
        counts={"total": outcome.total, "evaluated": len(outcome.records), "skipped": len(outcome.skipped),
                "resumed": outcome.resumed},
        skipped=outcome.skipped, settings=settings, per_group=per_group, parameters=parameters,
        timings=_timings(records, load_s=load_s, total_s=time.perf_counter() - t_start, streaming=args.streaming),
        extra={"adapters": adapters_info, "baseline": baseline_info})
    if results["run_key"] != key:  # the samples log was opened under `key`
        raise RuntimeError(f"run key changed while evaluating ({key} -> {results['run_key']})")
    if distributed.is_main():
        write_results(output, results, overwrite=args.overwrite)
        results["output"] = str(output)
    log.remove()
    return results if distributed.is_main() else None


__all__ = ["AsrPredictor", "asr_scores", "dataset_name", "run_eval_asr"]
