"""Transcription with per-language adapters: ``mmadapters asr transcribe`` and the decoding pieces of
``mmadapters eval asr`` (:mod:`~mmadapters.eval.asr_tasks`).

- :func:`resolve_adapters`: load language adapters (a :func:`mmadapters.save_adapters` directory, one adapter per
  language named by its code) and map each language to its adapter; a language without one runs the base.
- :class:`StreamingRunner`: push an utterance chunk by chunk through a streaming transcriber (first pass),
  redecode at its end (second pass), and time it (first-partial latency, compute seconds).
- :func:`transcribe_files`: the ``asr transcribe`` command's work: load files, skip unusable ones with their
  reason, decode the rest through the chosen language's adapter.

Torch-free at import (the command line builds this parser).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DECODES = ("greedy", "beam")


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


class StreamingRunner:
    """Streams single utterances through one :class:`~mmadapters.speech.decode.StreamingTranscriber` per adapter
    (None: the base), reused across utterances, ``chunk_ms`` of audio per push, and times them.

    :meth:`run` returns the final (second-pass) text, the first-pass text, the push and finish seconds and the
    first-partial latency: the audio time at the end of the chunk after which the first non-empty partial
    appeared plus that chunk's compute time (the delay from the start of the audio to the first partial if
    audio arrives in real time; None when no partial appeared)."""

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
    from mmadapters.training.trainer import check_device

    try:
        check_device(args.device, f"--device {args.device}")  # before the model is loaded
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
    """Add ``asr transcribe`` to the ``mmadapters`` command line (evaluation is ``mmadapters eval asr``)."""
    asr = subparsers.add_parser("asr", help="speech recognition: transcribe audio files (evaluation: mmadapters eval asr)",
                                description="Speech recognition with the cascaded transducer and per-language adapters. "
                                "WER/CER evaluation is `mmadapters eval asr`.")
    sub = asr.add_subparsers(dest="asr_command", metavar="{transcribe}")
    asr.set_defaults(func=lambda _args: (asr.print_help(), 0)[1])

    tr = sub.add_parser("transcribe", help="print the transcript of audio files",
                        description="Transcribe audio files (WAV/FLAC/OGG/MP3, resampled to 16 kHz); prints "
                        "<path><TAB><text> per file; unusable files are reported on stderr (exit status 1).")
    add = tr.add_argument
    add("files", nargs="+", help="audio files")
    add("--lang", default=None, help="language of the files: picks its adapter from --adapters")
    add("--model", default=None, help="ASR model: a save_asr directory, a transformers Parakeet folder or a NeMo .nemo file "
        "(default: the shipped tiny model)")
    add("--adapters", default=None,
        help="adapter checkpoint directory (mmadapters.save_adapters: <dir>/<lang>/), one adapter per language")
    add("--decode", default="greedy", choices=DECODES, help="greedy or beam (default: greedy)")
    add("--beam", type=int, default=4, help="beam size for --decode beam (default: 4)")
    add("--device", default="cpu", help="cpu or cuda (default: cpu)")
    add("--max-seconds", type=float, default=60.0, help="longer audio files are skipped; 0: no limit (default: 60)")
    add("--mono", default="error", choices=["error", "mix"],
        help="multi-channel audio: skip it (error) or average the channels (mix) (default: error)")
    tr.set_defaults(func=_transcribe_command)
