"""The speech recognition evaluator behind ``mmadapters asr eval`` and ``mmadapters asr transcribe``.

One run: load a transducer (``--model DIR``, default the shipped tiny model), optionally per-language
adapters (``--adapters DIR`` as written by :func:`mmadapters.save_adapters`: one adapter per language,
named by its language code), read a speech dataset (NeMo manifest, Common Voice or MLS), decode every
utterance — each with its own language's adapter through per-sample routing (``mma.route``), the base
model for a language without one — and score it::

    {"dataset", "model", "task": "asr",
     "metrics": {"wer", "cer",                          # averages over languages (each language counts once)
                 "wer_pooled", "cer_pooled",            # corpus-level over all utterances
                 "per_language": {lang: {"wer", "cer", "utterances", "skipped", "words", "chars", "audio_s",
                                         "adapter", ["wer_first_pass"], ["relative_wer_reduction"]}},
                 ["relative_wer_reduction": {"per_language", "average", "of_average_wer", "languages"}]},
     "counts": {"utterances", "evaluated", "skipped", "skipped_by_reason", "skipped_files": [...]},
     "timings": {"model_load_s", "audio_load_s", "decode_s", "audio_s", "rtf", ["rtf_first_pass",
                 "first_partial_latency_s": {...}], "total_s"},
     "settings": {...}, "adapters": {...} | null, "baseline": {...} | null,
     "mmadapters_version", "run_key", "created"}

Definitions.

- WER / CER are corpus-level (:func:`~mmadapters.eval.metrics.wer`: total edits / total reference words or
  characters, spaces count for CER) on :func:`~mmadapters.eval.metrics.normalize_text`'ed references and
  hypotheses, per language; ``wer`` / ``cer`` average the languages with equal weight (NaN languages —
  no reference words — are left out of the average).
- Relative WER reduction against a baseline results file (``--baseline``, an earlier ``asr eval`` output):
  ``(wer_base - wer) / wer_base`` per language present in both (NaN where the baseline WER is 0);
  ``average`` is the mean of the per-language reductions (the LDA paper's "average relative WER
  reduction"), ``of_average_wer`` the reduction of the average WER over those languages.
- Real-time factor: decoding wall time / audio seconds (audio decoding and resampling excluded, in
  ``audio_load_s``).
- Streaming (``--streaming``): each utterance is pushed to a
  :class:`~mmadapters.speech.decode.StreamingTranscriber` in ``chunk_ms`` chunks (first pass, causal), and
  redecoded by the second pass at its end (``decode``). First-partial latency of an utterance: the audio
  time at the end of the chunk after which the first non-empty partial appeared, plus the compute time of
  that chunk — the delay from the start of the audio to the first partial if audio arrives in real time.
- Files that fail :func:`~mmadapters.speech.audio.load_audio`'s checks are skipped and counted by kind
  (``missing``, ``corrupt``, ``empty``, ``silent``, ``channels``, ``too_long``, ``unsupported_format``),
  unless ``fail_fast``.

Results files are written atomically and never silently replace a different run's results (``run_key``,
see :mod:`~mmadapters.eval.results_io`).

``mmadapters eval asr`` (:mod:`~mmadapters.eval.asr_tasks`) is the same evaluation in the shared results
schema, resumable and sharded over ranks; it scores per-utterance records with :func:`utterance_scores` /
:func:`corpus_scores` and decodes with :func:`decode_texts`, which this evaluator uses too, so both commands
give the same WER/CER.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DECODES = ("greedy", "beam")
DEFAULT_BATCH_SIZE = 8
DEFAULT_CHUNK_MS = 160.0
MAX_LISTED_SKIPS = 1000
_SCORE_KEYS = ("word_edits", "ref_words", "char_edits", "ref_chars")


# -- adapters --------------------------------------------------------------------------------------------

def resolve_adapters(model, adapters: str | os.PathLike | Mapping[str, str] | Sequence[str] | None) -> tuple[dict[str, str], dict | None]:
    """Language → adapter name, and a description for the results.

    ``adapters``: a checkpoint directory written by :func:`mmadapters.save_adapters` (loaded into ``model``,
    replacing adapters of the same names; each subdirectory's name is a language code); a sequence of
    adapter names already on ``model`` (each named by its language); or a mapping language → adapter name.
    """
    import mmadapters as mma

    if adapters is None:
        return {}, None
    if isinstance(adapters, str | os.PathLike):
        directory = Path(adapters)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: adapter directory not found (expected one written by "
                                    "mmadapters.save_adapters: <dir>/<lang>/adapter_config.json)")
        names = mma.load_adapters(model, directory, replace=True)
        mapping, source = {n: n for n in names}, str(directory)
    elif isinstance(adapters, Mapping):
        mapping, source = dict(adapters), "model"
    else:
        mapping, source = {n: n for n in adapters}, "model"
    for lang, name in mapping.items():
        if not isinstance(lang, str) or not isinstance(name, str):
            raise TypeError(f"adapters: expected language code -> adapter name strings, got {lang!r} -> {name!r}")
        mma.get_config(model, name)  # KeyError naming the adapters the model has
    adapter_params = {name: sum(p.numel() for p in mma.adapter_parameters(model, name).values())
                      for name in set(mapping.values())}
    all_adapter_params = {id(p) for n in mma.adapter_names(model) for p in mma.adapter_parameters(model, n).values()}
    base = sum(p.numel() for p in model.parameters() if id(p) not in all_adapter_params)
    info = {"source": source, "languages": dict(sorted(mapping.items())), "base_parameters": base,
            "parameters": dict(sorted(adapter_params.items())),
            "fraction_of_base": {n: c / base for n, c in sorted(adapter_params.items())} if base else {}}
    return mapping, info


# -- baseline --------------------------------------------------------------------------------------------

def read_baseline(source: str | os.PathLike | Mapping) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-language WER of an earlier ``asr eval`` results file (or its dict). Errors name the file and field."""
    import json

    if isinstance(source, Mapping):
        data, where = source, "baseline"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: baseline results file not found (expected the --output of an earlier "
                                    "`mmadapters asr eval`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); expected an `mmadapters asr eval` results file") from None
    if isinstance(data, Mapping) and "schema" in data:  # `mmadapters eval asr` (the shared results schema)
        field = "per_group"
        per = data.get("per_group") if data.get("task") == "asr" else None
    else:  # `mmadapters asr eval`
        field = "metrics.per_language"
        metrics = data.get("metrics") if isinstance(data, Mapping) else None
        per = metrics.get("per_language") if isinstance(metrics, Mapping) else None
    if not isinstance(per, Mapping) or not per:
        raise ValueError(f"{where}: field '{field}' missing or empty; expected an `mmadapters asr eval` or "
                         "`mmadapters eval asr` results file")
    wers = {}
    for lang, entry in per.items():
        value = entry.get("wer") if isinstance(entry, Mapping) else None
        if value is None and field == "per_group":
            value = math.nan  # the shared schema writes NaN as null
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: field '{field}.{lang}.wer' is {value!r}; expected a number")
        wers[str(lang)] = float(value)
    info = {"source": where, "run_key": data.get("run_key"), "model": data.get("model"), "dataset": data.get("dataset")}
    return wers, info


def relative_reduction(base: float, new: float) -> float:
    """``(base - new) / base``; NaN when undefined (base 0 or either NaN)."""
    if not (math.isfinite(base) and math.isfinite(new)) or base == 0:
        return math.nan
    return (base - new) / base


def _nanmean(values) -> float:
    vals = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _latency_summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "max": math.nan, "count": 0}
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "p90": round(p90, 4), "max": round(ordered[-1], 4), "count": len(values)}


# -- scoring from per-utterance records ----------------------------------------------------------------------

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


def decode_texts(bundle, waves: Sequence, names: Sequence[str | None], *, decode: str, beam: int, routed: bool,
                 pass_: str = "second") -> list[str]:
    """Offline transcripts of 1-D waves (one batch), each through ``names[i]`` (its language's adapter, None: the
    base) when ``routed`` (with adapters, every batch is routed: None entries run the base even if an adapter is
    active); ``pass_``: the encoder pass decoded."""
    from mmadapters.speech.decode import transcribe

    return transcribe(bundle, list(waves), decode=decode, pass_=pass_, batch_size=max(1, len(waves)), beam=beam,
                      adapters=list(names) if routed else None)


# -- decoding ----------------------------------------------------------------------------------------------

class _StreamingRunner:
    """One :class:`StreamingTranscriber` per adapter (None: base), reused across utterances."""

    def __init__(self, bundle, decode: str, beam: int, chunk_ms: float, routed: bool):
        from mmadapters.speech.audio import SAMPLE_RATE

        self.bundle, self.decode, self.beam = bundle, decode, beam
        self.chunk = max(1, int(round(chunk_ms * SAMPLE_RATE / 1000)))
        self.sample_rate = SAMPLE_RATE
        self.routed = routed  # route even the base (None), so that an adapter active on the model stays off
        self.transcribers: dict[str | None, Any] = {}

    def run(self, wave, adapter: str | None) -> dict[str, Any]:
        from mmadapters.speech.decode import StreamingTranscriber

        st = self.transcribers.get(adapter)
        if st is None:
            st = StreamingTranscriber(self.bundle, 1, second_pass=self.decode, beam=self.beam,
                                      adapters=[adapter] if self.routed else None)
            self.transcribers[adapter] = st
        push_s, latency = 0.0, None
        n = wave.shape[0]
        for start in range(0, n, self.chunk):
            t0 = time.perf_counter()
            partial = st.push(wave[start:start + self.chunk])
            dt = time.perf_counter() - t0
            push_s += dt
            if latency is None and partial[0]:
                latency = min(start + self.chunk, n) / self.sample_rate + dt
        t0 = time.perf_counter()
        final = st.finish()[0]
        finish_s = time.perf_counter() - t0
        return {"text": final, "first_pass": st.first_pass_texts[0], "push_s": push_s, "finish_s": finish_s,
                "latency": latency}


# -- the evaluator -----------------------------------------------------------------------------------------

def evaluate_asr(bundle, utterances: Sequence, *, adapters: str | os.PathLike | Mapping[str, str] | Sequence[str] | None = None,
                 decode: str = "greedy", streaming: bool = False, batch_size: int = DEFAULT_BATCH_SIZE, fail_fast: bool = False,
                 baseline: str | os.PathLike | Mapping | None = None, progress: bool = True, beam: int = 4,
                 chunk_ms: float = DEFAULT_CHUNK_MS, max_seconds: float | None = 60.0, mono: str = "error",
                 dataset_name: str | None = None, model_name: str | None = None,
                 return_predictions: bool = False) -> dict[str, Any]:
    """Decode and score ``utterances`` (:class:`~mmadapters.speech.readers.Utterance`) with ``bundle``
    (:class:`~mmadapters.speech.model.AsrBundle`); returns the results dictionary (see the module docstring).

    ``adapters``: see :func:`resolve_adapters`; the utterance's ``lang`` picks its adapter per sample.
    ``decode``: greedy or beam (``beam`` hypotheses) — offline, or the second pass when ``streaming``.
    ``return_predictions``: add ``"predictions"`` (one dict per evaluated utterance) to the results.
    Raises ValueError when no utterance could be evaluated; with ``fail_fast`` the first bad file's
    :class:`~mmadapters.speech.audio.AudioError`.
    """
    import datetime as _dt

    from tqdm import tqdm

    from mmadapters import __version__
    from mmadapters.speech.audio import SAMPLE_RATE
    from mmadapters.speech.readers import Utterance, iter_audio_batches

    from .metrics import normalize_text, wer

    t_start = time.perf_counter()
    if decode not in DECODES:
        raise ValueError(f"decode={decode!r}: expected one of {', '.join(DECODES)}")
    if batch_size < 1 or beam < 1 or chunk_ms <= 0:
        raise ValueError(f"batch_size ({batch_size}) and beam ({beam}) must be >= 1 and chunk_ms ({chunk_ms}) > 0")
    utterances = list(utterances)
    if not utterances:
        raise ValueError("evaluate_asr: no utterances to evaluate")
    for i, u in enumerate(utterances):
        if not isinstance(u, Utterance):
            raise TypeError(f"evaluate_asr: utterances[{i}] is {type(u).__name__}; expected an Utterance")
    base_wer, baseline_info = read_baseline(baseline) if baseline is not None else ({}, None)
    lang_map, adapters_info = resolve_adapters(bundle.model, adapters)

    predictions: list[dict[str, Any]] = []
    skipped = []
    decode_s = audio_s = first_pass_s = 0.0
    latencies: dict[str, list[float]] = {}
    no_partial = 0
    runner = _StreamingRunner(bundle, decode, beam, chunk_ms, routed=bool(lang_map)) if streaming else None
    bar = tqdm(total=len(utterances), desc="utterances", unit="utt", disable=None if progress else True)
    t_loop = time.perf_counter()
    for batch in iter_audio_batches(utterances, batch_size, max_seconds=max_seconds, mono=mono, fail_fast=fail_fast):
        skipped.extend(batch.skipped)
        bar.update(len(batch.utterances) + len(batch.skipped))
        if not batch.utterances:
            continue
        waves = [batch.waves[i, :n] for i, n in enumerate(batch.lengths.tolist())]
        names = [lang_map.get(u.lang) for u in batch.utterances]
        audio_s += batch.seconds
        if runner is None:
            t0 = time.perf_counter()
            texts = decode_texts(bundle, waves, names, decode=decode, beam=beam, routed=bool(lang_map))
            decode_s += time.perf_counter() - t0
            firsts = [None] * len(texts)
        else:
            texts, firsts = [], []
            for u, w, name in zip(batch.utterances, waves, names, strict=True):
                r = runner.run(w, name)
                texts.append(r["text"])
                firsts.append(r["first_pass"])
                decode_s += r["push_s"] + r["finish_s"]
                first_pass_s += r["push_s"]
                if r["latency"] is None:
                    no_partial += 1
                else:
                    latencies.setdefault(u.lang, []).append(r["latency"])
        for u, w, text, first, name in zip(batch.utterances, waves, texts, firsts, names, strict=True):
            predictions.append({"id": u.id, "lang": u.lang, "adapter": name, "audio_path": u.audio_path,
                                "audio_s": w.shape[0] / SAMPLE_RATE,
                                "reference": u.text, "hypothesis": text, "first_pass": first,
                                "ref_norm": normalize_text(u.text), "hyp_norm": normalize_text(text),
                                "first_norm": None if first is None else normalize_text(first),
                                **utterance_scores(u.text, text)})
    bar.close()
    loop_s = time.perf_counter() - t_loop
    if not predictions:
        kinds = sorted({s.kind for s in skipped})
        raise ValueError(f"none of the {len(utterances)} utterances could be evaluated: every audio file was skipped "
                         f"({', '.join(kinds)}); first: {skipped[0].reason}")

    langs = sorted({u.lang for u in utterances})
    per_language: dict[str, dict[str, Any]] = {}
    for lang in langs:
        preds = [p for p in predictions if p["lang"] == lang]
        refs = [p["ref_norm"] for p in preds]
        scores = corpus_scores(preds)
        entry = {"wer": scores["wer"], "cer": scores["cer"],
                 "utterances": len(preds), "skipped": sum(1 for s in skipped if s.utterance.lang == lang),
                 "words": scores["words"], "chars": scores["chars"],
                 "audio_s": round(sum(p["audio_s"] for p in preds), 3), "adapter": lang_map.get(lang)}
        if streaming and preds:
            entry["wer_first_pass"] = wer(refs, [p["first_norm"] for p in preds])
            entry["first_partial_latency_s"] = _latency_summary(latencies.get(lang, []))
        if lang in base_wer:
            entry["relative_wer_reduction"] = relative_reduction(base_wer[lang], entry["wer"])
        per_language[lang] = entry
    pooled = corpus_scores(predictions)
    metrics: dict[str, Any] = {
        "wer": _nanmean(e["wer"] for e in per_language.values()),
        "cer": _nanmean(e["cer"] for e in per_language.values()),
        "wer_pooled": pooled["wer"], "cer_pooled": pooled["cer"],
        "languages": len(langs), "per_language": per_language,
    }
    if baseline_info is not None:
        common = [lang for lang in langs if lang in base_wer and per_language[lang]["utterances"]]
        rel = {lang: per_language[lang]["relative_wer_reduction"] for lang in common}
        metrics["relative_wer_reduction"] = {
            "per_language": rel, "average": _nanmean(rel.values()),
            "of_average_wer": relative_reduction(_nanmean(base_wer[lang] for lang in common),
                                                 _nanmean(per_language[lang]["wer"] for lang in common)),
            "languages": common,
        }
        baseline_info["missing_languages"] = [lang for lang in langs if lang not in base_wer]

    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s.kind] = reasons.get(s.kind, 0) + 1
    timings: dict[str, Any] = {
        "model_load_s": None, "audio_load_s": round(max(0.0, loop_s - decode_s), 4), "decode_s": round(decode_s, 4),
        "audio_s": round(audio_s, 3), "rtf": decode_s / audio_s if audio_s else math.nan,
    }
    if streaming:
        all_lat = [x for v in latencies.values() for x in v]
        timings["rtf_first_pass"] = first_pass_s / audio_s if audio_s else math.nan
        timings["first_partial_latency_s"] = {**_latency_summary(all_lat), "no_partial": no_partial}
    timings["total_s"] = round(time.perf_counter() - t_start, 4)
    settings = {"decode": decode, "beam": beam if decode == "beam" else None, "streaming": streaming,
                "chunk_ms": chunk_ms if streaming else None, "batch_size": batch_size, "fail_fast": fail_fast,
                "max_seconds": max_seconds, "mono": mono, "normalization": "mmadapters.eval.metrics.normalize_text",
                "adapters": None if adapters is None else (str(adapters) if isinstance(adapters, str | os.PathLike)
                                                           else adapters_info["source"]),
                "baseline": None if baseline_info is None else baseline_info["source"],
                "active_adapter": None if lang_map else _active(bundle.model),
                "device": str(next(bundle.model.parameters()).device),
                "torch_threads": _torch_threads()}
    results: dict[str, Any] = {
        "dataset": dataset_name, "model": model_name, "task": "asr", "metrics": metrics,
        "counts": {"utterances": len(utterances), "evaluated": len(predictions), "skipped": len(skipped),
                   "skipped_by_reason": dict(sorted(reasons.items())),
                   "skipped_files": [{"id": s.utterance.id, "path": s.utterance.audio_path, "kind": s.kind,
                                      "reason": s.reason} for s in skipped[:MAX_LISTED_SKIPS]]},
        "timings": timings, "settings": settings, "adapters": adapters_info, "baseline": baseline_info,
        "mmadapters_version": __version__, "run_key": None,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    if return_predictions:
        results["predictions"] = [{k: v for k, v in p.items() if not k.endswith("_norm") and k not in _SCORE_KEYS}
                                  for p in predictions]
    return results


def _active(model) -> str | None:
    """The composition active on the model (what runs when no adapters are routed), as text."""
    import mmadapters as mma

    active = mma.get_active(model)
    return None if active is None else str(active)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# -- command line ----------------------------------------------------------------------------------------

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


def run_asr_eval(args: argparse.Namespace) -> dict[str, Any]:
    """``mmadapters asr eval``: read the dataset, load the model, evaluate, write ``--output`` (and predictions)."""
    import json

    from mmadapters.io import atomic_write_bytes
    from mmadapters.speech.model import load_asr
    from mmadapters.speech.readers import read_speech_dataset

    from .results_io import check_overwrite, results_key, write_results

    out_path = Path(args.output)
    if out_path.is_dir():
        raise IsADirectoryError(f"--output {out_path}: is a directory; expected a results file path")
    utterances = read_speech_dataset(args.manifest, split=args.split, lang=args.lang, allow_absolute=args.allow_absolute)
    t0 = time.perf_counter()
    bundle = load_asr(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    identity = _dir_identity(bundle.path)
    run_key = results_key({"model": identity, "adapters": _dir_identity(args.adapters), "manifest": str(Path(args.manifest).resolve()),
                           "split": args.split, "lang": args.lang, "decode": args.decode, "beam": args.beam,
                           "streaming": args.streaming, "chunk_ms": args.chunk_ms, "max_seconds": args.max_seconds,
                           "mono": args.mono, "baseline": args.baseline and str(Path(args.baseline).resolve())})
    check_overwrite(out_path, run_key, args.overwrite)
    dataset_name = Path(args.manifest).stem if Path(args.manifest).is_file() else Path(args.manifest).name
    results = evaluate_asr(bundle, utterances, adapters=args.adapters, decode=args.decode, streaming=args.streaming,
                           batch_size=args.batch_size, fail_fast=args.fail_fast, baseline=args.baseline,
                           progress=not args.no_progress, beam=args.beam, chunk_ms=args.chunk_ms,
                           max_seconds=args.max_seconds or None, mono=args.mono, dataset_name=dataset_name,
                           model_name=args.model or "tiny_asr", return_predictions=bool(args.predictions))
    results["timings"]["model_load_s"] = round(load_s, 4)
    results["settings"].update({"manifest": str(args.manifest), "split": args.split, "lang": args.lang,
                                "model_path": identity and identity["path"], "allow_absolute": args.allow_absolute})
    results["run_key"] = run_key
    predictions = results.pop("predictions", None)
    if args.predictions:
        pred_path = Path(args.predictions)
        pred_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(pred_path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions).encode())
        results["settings"]["predictions"] = str(pred_path)
    write_results(out_path, results)
    return results


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def format_summary(results: dict[str, Any]) -> str:
    """A short table: per-language WER / CER (%) and the relative WER reduction when a baseline was given."""
    m, c, t = results["metrics"], results["counts"], results["timings"]
    rel = m.get("relative_wer_reduction")
    lines = [f"{'lang':<8} {'utts':>5} {'skip':>5} {'WER %':>7} {'CER %':>7}" + (f" {'rel. WER red. %':>16}" if rel else "")]
    for lang, e in m["per_language"].items():
        line = f"{lang:<8} {e['utterances']:>5} {e['skipped']:>5} {_fmt(e['wer']):>7} {_fmt(e['cer']):>7}"
        if rel:
            line += f" {_fmt(e.get('relative_wer_reduction', math.nan)):>16}"
        lines.append(line)
    avg = f"{'average':<8} {c['evaluated']:>5} {c['skipped']:>5} {_fmt(m['wer']):>7} {_fmt(m['cer']):>7}"
    if rel:
        avg += f" {_fmt(rel['average']):>16}"
    lines.append(avg)
    if c["skipped"]:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in c["skipped_by_reason"].items()))
    timing = f"decode {t['decode_s']:.2f}s for {t['audio_s']:.1f}s of audio: RTF {t['rtf']:.3f}"
    if "first_partial_latency_s" in t:
        lat = t["first_partial_latency_s"]
        timing += f"; first partial after {lat['mean']:.3f}s on average (p90 {lat['p90']:.3f}s)"
    lines.append(timing)
    return "\n".join(lines)


def _eval_command(args: argparse.Namespace) -> int:
    from mmadapters.speech.audio import AudioError

    try:
        results = run_asr_eval(args)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, ValueError, KeyError, AudioError) as e:
        print(f"mmadapters asr eval: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(results))
    print(f"results written to {results['output']}")
    return 0


def transcribe_files(files: Sequence[str | os.PathLike], *, model: str | None = None, adapters: str | None = None,
                     lang: str | None = None, decode: str = "greedy", beam: int = 4, device: str = "cpu",
                     max_seconds: float | None = 60.0, mono: str = "error") -> list[tuple[str, str | None, str | None]]:
    """``(path, transcript or None, error or None)`` per file; with ``adapters``, ``lang`` picks the adapter
    (a language without one runs the base model)."""
    from mmadapters.speech.audio import AudioError, load_audio
    from mmadapters.speech.decode import transcribe
    from mmadapters.speech.model import load_asr

    if adapters is not None and lang is None:
        raise ValueError("--adapters needs --lang to choose the adapter for these files")
    bundle = load_asr(model, device=device)
    lang_map, _ = resolve_adapters(bundle.model, adapters)
    name = lang_map.get(lang) if lang is not None else None
    out: list[tuple[str, str | None, str | None]] = []
    waves, where = [], []
    for f in files:
        try:
            waves.append(load_audio(f, max_seconds=max_seconds, mono=mono))
            where.append(len(out))
            out.append((str(f), None, None))
        except AudioError as e:
            out.append((str(f), None, str(e)))
    if waves:
        texts = transcribe(bundle, waves, decode=decode, beam=beam, adapters=None if name is None else [name] * len(waves))
        for i, text in zip(where, texts, strict=True):
            out[i] = (out[i][0], text, None)
    return out


def _transcribe_command(args: argparse.Namespace) -> int:
    try:
        rows = transcribe_files(args.files, model=args.model, adapters=args.adapters, lang=args.lang, decode=args.decode,
                                beam=args.beam, device=args.device, max_seconds=args.max_seconds or None, mono=args.mono)
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as e:
        print(f"mmadapters asr transcribe: error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for path, text, error in rows:
        if error is not None:
            failed += 1
            print(f"mmadapters asr transcribe: skipped {error}", file=sys.stderr)
        else:
            print(f"{path}\t{text}")
    return 1 if failed else 0


def add_asr_parser(subparsers) -> None:
    """Add ``asr eval`` and ``asr transcribe`` to the ``mmadapters`` command line."""
    asr = subparsers.add_parser("asr", help="speech recognition: WER/CER evaluation and transcription",
                                description="Speech recognition with the cascaded transducer and per-language adapters.")
    sub = asr.add_subparsers(dest="asr_command", metavar="{eval,transcribe}")
    asr.set_defaults(func=lambda _args: (asr.print_help(), 0)[1])

    def common(p, *, decode_help: str) -> None:
        p.add_argument("--model", default=None, help="model directory written by save_asr (default: the shipped tiny model)")
        p.add_argument("--adapters", default=None,
                       help="adapter checkpoint directory (mmadapters.save_adapters: <dir>/<lang>/), one adapter per language")
        p.add_argument("--decode", default="greedy", choices=DECODES, help=decode_help)
        p.add_argument("--beam", type=int, default=4, help="beam size for --decode beam (default: 4)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument("--max-seconds", type=float, default=60.0, help="longer audio files are skipped; 0: no limit (default: 60)")
        p.add_argument("--mono", default="error", choices=["error", "mix"],
                       help="multi-channel audio: skip it (error) or average the channels (mix) (default: error)")

    ev = sub.add_parser("eval", help="per-language WER/CER of a speech dataset, written as a results JSON",
                        description="Evaluate on a NeMo JSONL manifest (or a Common Voice / MLS folder): per-language "
                        "WER and CER on normalized text, their average, relative WER reduction against --baseline, "
                        "skipped files by reason, real-time factor, first-partial latency with --streaming.")
    ev.add_argument("--manifest", required=True,
                    help="NeMo JSONL manifest, or a Common Voice / MLS folder (with --split, and --lang for MLS)")
    ev.add_argument("--output", required=True, help="results JSON path (written atomically)")
    common(ev, decode_help="greedy or beam; with --streaming, the second pass's decoding (default: greedy)")
    ev.add_argument("--streaming", action="store_true", help="stream the first pass chunk by chunk, redecode with the "
                    "second pass at the end of each utterance; reports first-partial latency")
    ev.add_argument("--chunk-ms", type=float, default=DEFAULT_CHUNK_MS,
                    help=f"audio per streaming push in milliseconds (default: {DEFAULT_CHUNK_MS:g})")
    ev.add_argument("--baseline", default=None, help="an earlier `asr eval` results file to compute relative WER reductions against")
    ev.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"utterances per batch (default: {DEFAULT_BATCH_SIZE})")
    ev.add_argument("--split", default="test", help="split of a Common Voice / MLS / manifest folder (default: test)")
    ev.add_argument("--lang", default=None, help="language code for data without one (MLS, manifests without 'lang')")
    ev.add_argument("--allow-absolute", action="store_true", help="let manifest audio paths point outside its folder")
    ev.add_argument("--fail-fast", action="store_true", help="stop at the first unusable audio file instead of skipping it")
    ev.add_argument("--predictions", default=None, help="also write one JSON line per utterance (reference, hypothesis) here")
    ev.add_argument("--overwrite", action="store_true", help="replace an output file that holds a different run's results")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=_eval_command)

    tr = sub.add_parser("transcribe", help="print the transcript of audio files",
                        description="Transcribe audio files (WAV/FLAC/OGG/MP3, resampled to 16 kHz); prints "
                        "<path><TAB><text> per file; unusable files are reported on stderr (exit status 1).")
    tr.add_argument("files", nargs="+", help="audio files")
    tr.add_argument("--lang", default=None, help="language of the files: picks its adapter from --adapters")
    common(tr, decode_help="greedy or beam (default: greedy)")
    tr.set_defaults(func=_transcribe_command)
