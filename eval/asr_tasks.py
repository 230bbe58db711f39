"""``mmadapters eval asr``: speech recognition in the shared results schema, resumable and rank-sharded.

One run loads a transducer (``--model DIR``, default the shipped tiny model), optionally per-language
adapters (``--adapters DIR``, :func:`~mmadapters.eval.asr_transcribe.resolve_adapters`), reads a speech dataset
(NeMo manifest, Common Voice, MLS or generated speech), decodes every utterance through its own language's
adapter (per-sample routing; the base for a language without one) and scores it. Every utterance becomes a
record in the samples log (:mod:`mmadapters.eval.sample_runner`) as soon as its batch is decoded, and every
metric is computed from the records, so an interrupted run resumes and gives the numbers an uninterrupted
one gives. A record::

    {"id", "lang", "speaker", "adapter", "audio_path", "audio_s", "ref", "hyp",
     "word_edits", "ref_words", "char_edits", "ref_chars",     # on normalize_text'ed ref/hyp
     "decode_s",                                               # this utterance's share of its batch's decoding
     ["first_pass", "first_word_edits", "first_pass_s", "latency_s"]}  # --streaming

Results (:func:`~mmadapters.eval.results_schema.build_results`, task ``"asr"``):

- ``metrics``: ``wer`` (the mean of the languages' corpus WERs, each language once: the LDA paper's average),
  ``cer``, ``wer_pooled`` / ``cer_pooled`` (all utterances as one corpus), ``languages``; with ``--baseline``
  (an earlier ``eval asr`` results file) ``relative_wer_reduction`` (the mean of the per-language
  reductions ``(wer_base - wer) / wer_base``: the paper's "average relative WER reduction") and
  ``relative_wer_reduction_of_average`` (the reduction of the average WER, over the languages both runs
  have); with ``--streaming`` ``wer_first_pass``.
- ``per_group``: per language ``wer``, ``cer``, ``utterances``, ``skipped``, ``words``, ``chars``,
  ``word_edits``, ``char_edits``, ``audio_s`` (+ ``relative_wer_reduction``, ``wer_first_pass``). With
  ``--group-by speaker`` the groups are the data's speakers instead (``"unknown"`` where it names none), the
  averages run over speakers and ``metrics`` counts ``speakers``: training voices against held-out ones.
- ``skipped``: one ``{"id", "reason"}`` per audio file that fails
  :func:`~mmadapters.speech.audio.load_audio`'s checks (``AudioError: <path>: <problem>``: missing, corrupt,
  empty, silent, channels, too long, unsupported format), unless ``--fail-fast``; ``counts``: ``total``,
  ``evaluated``, ``skipped``, ``resumed``.
- ``timings``: ``model_load_s``; ``decode_s`` and ``audio_s`` over every record (resumed ones included);
  ``rtf`` = decoding seconds / audio seconds (reading and resampling audio excluded); ``total_s``; with
  ``--streaming`` ``rtf_first_pass`` (the chunk pushes alone) and first-partial latency statistics
  (``first_partial_latency_{mean,median,p90,max}_s``, ``first_partial_missing``: utterances without one),
  see :class:`~mmadapters.eval.asr_transcribe.StreamingRunner`.

WER / CER are corpus-level (:func:`~mmadapters.eval.metrics.edit_distance` totals over reference words or
characters, spaces count for CER) on :func:`~mmadapters.eval.metrics.normalize_text`'ed text; a language
without reference words has NaN WER (null in the file) and stays out of the averages.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .asr_transcribe import DECODES, StreamingRunner, resolve_adapters

TASK = "asr"


def dataset_name(path: str, split: str) -> str:
    """A manifest's stem, or ``<folder>/<split>`` for a dataset folder."""
    p = Path(path)
    if p.is_file():
        return p.stem
    return f"{p.resolve().name or p.name}/{split}"


# -- scoring ---------------------------------------------------------------------------------------------------

def utterance_scores(reference: str, hypothesis: str) -> dict[str, int]:
    """Edit counts of one utterance on :func:`~mmadapters.eval.metrics.normalize_text`'ed text: ``word_edits``,
    ``ref_words``, ``char_edits``, ``ref_chars`` (spaces count). Summed over utterances they give corpus WER/CER."""
    from .metrics import edit_distance, normalize_text

    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    ref_words, hyp_words = ref.split(), hyp.split()
    return {"word_edits": edit_distance(ref_words, hyp_words), "ref_words": len(ref_words),
            "char_edits": edit_distance(ref, hyp), "ref_chars": len(ref)}


def corpus_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Corpus WER/CER of utterance records carrying :func:`utterance_scores`' counts: total edits / total
    reference words (characters); NaN without reference words. Also the totals and ``utterances``."""
    word_edits = sum(int(r["word_edits"]) for r in records)
    words = sum(int(r["ref_words"]) for r in records)
    char_edits = sum(int(r["char_edits"]) for r in records)
    chars = sum(int(r["ref_chars"]) for r in records)
    return {"wer": word_edits / words if words else math.nan, "cer": char_edits / chars if chars else math.nan,
            "utterances": len(records), "words": words, "chars": chars, "word_edits": word_edits, "char_edits": char_edits}


def relative_reduction(base: float, new: float) -> float:
    """``(base - new) / base``; NaN when undefined (base 0 or either NaN)."""
    if not (math.isfinite(base) and math.isfinite(new)) or base == 0:
        return math.nan
    return (base - new) / base


def _nanmean(values) -> float:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def read_baseline(path: str | os.PathLike) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-language WER of an earlier ``mmadapters eval asr`` results file, and where it came from. Errors name the
    file and the field."""
    from .results_schema import read_results

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: baseline results file not found (expected the --output of an earlier "
                                "`mmadapters eval asr`)")
    data = read_results(path)
    per = data.get("per_group")
    if data["task"] != TASK or not per:
        raise ValueError(f"{path}: field 'per_group' missing or empty (task {data['task']!r}); expected the results of "
                         "`mmadapters eval asr`")
    wers = {str(lang): math.nan if entry.get("wer") is None else float(entry["wer"]) for lang, entry in per.items()}
    return wers, {"source": str(path), "run_key": data.get("run_key"), "model": data.get("model"), "dataset": data.get("dataset")}


def group_of(record: Mapping[str, Any], group_by: str = "lang") -> str:
    """The group a record counts in: its language, or its speaker ("unknown" when the data named none)."""
    value = record.get(group_by)
    return "unknown" if value is None else str(value)


def asr_scores(records: Sequence[Mapping[str, Any]], groups: Sequence[str], skipped_groups: Sequence[str], *,
               baseline_wer: Mapping[str, float] | None = None, streaming: bool = False,
               group_by: str = "lang") -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(metrics, per-group metrics) from utterance records; ``groups``: every group of the data (its languages, or
    its speakers with ``group_by="speaker"``; one without evaluated utterances has NaN WER and stays out of the
    averages); ``skipped_groups``: the group of each skipped sample; ``baseline_wer``: group -> WER to reduce."""
    per_group: dict[str, dict[str, float]] = {}
    for group in groups:
        recs = [r for r in records if group_of(r, group_by) == group]
        scores = corpus_scores(recs)
        entry: dict[str, float] = {**scores, "skipped": sum(1 for s in skipped_groups if s == group),
                                   "audio_s": round(sum(float(r["audio_s"]) for r in recs), 3)}
        if streaming:
            words = scores["words"]
            entry["wer_first_pass"] = sum(int(r["first_word_edits"]) for r in recs) / words if words else math.nan
        if baseline_wer is not None and group in baseline_wer:
            entry["relative_wer_reduction"] = relative_reduction(baseline_wer[group], entry["wer"])
        per_group[group] = entry
    pooled = corpus_scores(records)
    metrics: dict[str, float] = {
        "wer": _nanmean(e["wer"] for e in per_group.values()), "cer": _nanmean(e["cer"] for e in per_group.values()),
        "wer_pooled": pooled["wer"], "cer_pooled": pooled["cer"],
        "languages" if group_by == "lang" else "speakers": len(groups),
    }
    if streaming:
        metrics["wer_first_pass"] = _nanmean(e["wer_first_pass"] for e in per_group.values())
    if baseline_wer is not None:
        common = [g for g in groups if g in baseline_wer and per_group[g]["utterances"]]
        metrics["relative_wer_reduction"] = _nanmean(per_group[g]["relative_wer_reduction"] for g in common)
        metrics["relative_wer_reduction_of_average"] = relative_reduction(
            _nanmean(baseline_wer[g] for g in common), _nanmean(per_group[g]["wer"] for g in common))
    return metrics, per_group


def _latency_summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "max": math.nan}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "p90": round(p90, 4), "max": round(ordered[-1], 4)}


def _record_timings(records: Sequence[Mapping[str, Any]], *, streaming: bool) -> dict[str, float]:
    """Timings summed over the utterance records: decoding and audio seconds, real-time factor (and, streaming,
    the first pass's and the first-partial latencies)."""
    decode_s = sum(float(r["decode_s"]) for r in records)
    audio_s = sum(float(r["audio_s"]) for r in records)
    timings = {"decode_s": round(decode_s, 4), "audio_s": round(audio_s, 3), "rtf": decode_s / audio_s if audio_s else math.nan}
    if streaming:
        timings["rtf_first_pass"] = sum(float(r["first_pass_s"]) for r in records) / audio_s if audio_s else math.nan
        latencies = [float(r["latency_s"]) for r in records if r.get("latency_s") is not None]
        timings.update({f"first_partial_latency_{k}_s": v for k, v in _latency_summary(latencies).items()})
        timings["first_partial_missing"] = len(records) - len(latencies)
    return timings


# -- decoding ----------------------------------------------------------------------------------------------------

class AsrPredictor:
    """``predict`` for :func:`~mmadapters.eval.sample_runner.run_samples`: loads a batch's audio (an unusable file
    becomes that sample's :class:`~mmadapters.speech.audio.AudioError`), decodes the rest in one batch, each
    utterance through its language's adapter, and returns one record per utterance."""

    def __init__(self, bundle, lang_map: Mapping[str, str], *, decode: str = "greedy", beam: int = 4, pass_: str = "second",
                 streaming: bool = False, chunk_ms: float = 160.0, max_seconds: float | None = 60.0, mono: str = "error"):
        self.bundle, self.lang_map = bundle, dict(lang_map)
        self.decode, self.beam, self.pass_ = decode, beam, pass_
        self.max_seconds, self.mono = max_seconds, mono
        self.runner = StreamingRunner(bundle, decode, beam, chunk_ms, routed=bool(lang_map)) if streaming else None

    def __call__(self, batch: Sequence) -> list[dict[str, Any] | BaseException]:
        from mmadapters.speech.audio import SAMPLE_RATE, AudioError, load_audio
        from mmadapters.speech.decode import transcribe

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
            # with adapters every batch is routed: None entries then run the base even if an adapter is active
            texts = transcribe(self.bundle, [w for _, _, w in loaded], decode=self.decode, pass_=self.pass_,
                               batch_size=len(loaded), beam=self.beam, adapters=names if self.lang_map else None)
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
                               "first_pass_s": r["push_s"], "latency_s": r["latency"]})
        for (k, u, _), name, a, text, extra in zip(loaded, names, audio, texts, extras, strict=True):
            out[k] = {"lang": u.lang, "speaker": u.speaker, "adapter": name, "audio_path": u.audio_path, "audio_s": a,
                      "ref": u.text, "hyp": text, **utterance_scores(u.text, text), **extra}
        return out  # type: ignore[return-value]


# -- the command -----------------------------------------------------------------------------------------------------

def _dir_identity(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """What identifies weights on disk: the resolved directory and its files' sizes and modification times."""
    if path is None:
        return None
    path = Path(path)
    files = {}
    if path.is_dir():
        for f in sorted(path.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                st = f.stat()
                files[f.relative_to(path).as_posix()] = [st.st_size, st.st_mtime_ns]
    return {"path": str(path.resolve()), "files": files}


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

    from .sample_runner import Summary, evaluate

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
    group_by = getattr(args, "group_by", "lang")
    if group_by != "lang":  # the default leaves the settings (and so the run key) of earlier runs as they were
        if args.baseline is not None:
            raise ValueError(f"--group-by {group_by}: --baseline compares languages; drop one of them")
        settings["group_by"] = group_by
    parameters = None
    if adapters_info is not None:
        adapter_total = sum(adapters_info["parameters"].values())
        parameters = {"trainable": adapter_total, "total": adapters_info["base_parameters"] + adapter_total,
                      "base": adapters_info["base_parameters"], "per_adapter": adapters_info["parameters"]}
    lang_of = {u.id: group_of({"lang": u.lang, "speaker": u.speaker}, group_by) for u in utterances}
    if baseline_info is not None:
        baseline_info["missing_languages"] = sorted(set(lang_of.values()) - set(baseline_wer))

    def summarize(outcome) -> Summary:
        records = list(outcome.records.values())
        metrics, per_group = asr_scores(records, sorted(set(lang_of.values())), [lang_of[s["id"]] for s in outcome.skipped],
                                        baseline_wer=baseline_wer, streaming=args.streaming, group_by=group_by)
        return Summary(metrics, per_group, _record_timings(records, streaming=args.streaming))

    predictor = AsrPredictor(bundle, lang_map, decode=args.decode, beam=args.beam, pass_=args.pass_, streaming=args.streaming,
                             chunk_ms=args.chunk_ms, max_seconds=max_seconds, mono=args.mono)
    return evaluate(
        args, identity={"dataset": dataset, "model": model_name, "pretrained": None, "task": TASK},
        output_fields={"dataset": dataset, "model": Path(model_name).name, "pretrained": "", "task": TASK},
        settings=settings, samples=utterances, sample_id=lambda u: u.id, predict=predictor, summarize=summarize,
        source=args.manifest, what="utterances", desc="asr", t_start=t_start, timings={"model_load_s": load_s},
        loop_timing=None, parameters=parameters, extra={"adapters": adapters_info, "baseline": baseline_info})


def _pct(x: float | None) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def format_table(results: Mapping[str, Any]) -> str:
    """Per-language WER / CER (%) with the relative WER reduction when there was a baseline, then RTF and, when
    streaming, first-partial latency."""
    m, per, t = results["metrics"], results["per_group"], results["timings"]
    rel = "relative_wer_reduction" in m
    what = results.get("settings", {}).get("group_by", "lang")
    lines = [f"{what:<8} {'utts':>5} {'skip':>5} {'WER %':>7} {'CER %':>7}" + (f" {'rel. WER red. %':>16}" if rel else "")]
    for lang, e in per.items():
        line = f"{lang:<8} {int(e['utterances']):>5} {int(e['skipped']):>5} {_pct(e['wer']):>7} {_pct(e['cer']):>7}"
        lines.append(line + (f" {_pct(e.get('relative_wer_reduction')):>16}" if rel else ""))
    c = results["counts"]
    avg = f"{'average':<8} {c['evaluated']:>5} {c['skipped']:>5} {_pct(m['wer']):>7} {_pct(m['cer']):>7}"
    lines.append(avg + (f" {_pct(m['relative_wer_reduction']):>16}" if rel else ""))
    timing = f"decode {t['decode_s']:.2f}s for {t['audio_s']:.1f}s of audio: RTF {t['rtf']:.3f}"
    if "first_partial_latency_mean_s" in t:
        timing += (f"; first partial after {t['first_partial_latency_mean_s']:.3f}s on average "
                   f"(p90 {t['first_partial_latency_p90_s']:.3f}s)")
    return "\n".join([*lines, timing])


__all__ = ["AsrPredictor", "asr_scores", "corpus_scores", "dataset_name", "format_table", "read_baseline",
           "relative_reduction", "run_eval_asr", "utterance_scores"]
