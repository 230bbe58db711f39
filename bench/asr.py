"""Streaming ASR speed: real-time factor, language adapters' overhead, mixed-language batches — ratios in one run.

Model: the shipped tiny cascaded transducer (``mmadapters.speech.model.load_asr()``) when it is there, else a
randomly initialized model of the default :class:`~mmadapters.speech.model.TransducerConfig` (the output says
which; ``--random-init`` forces it). Speed depends on the shape, and on how many symbols the decoder emits: a
random joiner tends to emit at every step, the worst case for greedy search. Audio: ``--manifest FILE`` (a NeMo
JSONL manifest, e.g. from ``python -m mmadapters.speech.synth``), else generated speech-like signals
(harmonics with a syllable-rate envelope and noise), 16 kHz.

Language adapters are the LDA recipe's (:func:`mmadapters.speech.lda.add_language_adapters`: one bottleneck
adapter set per language, ≈0.4% of the model each), with random weights so that they change the output.

Measured, with configurations interleaved round-robin (medians over ``--reps``) so that drift in machine load
hits all alike:

- streaming: ``StreamingTranscriber`` (first pass, greedy, chunks of ``--chunk-ms``) on single utterances —
  RTF = compute seconds / audio seconds, without adapters and with one language's adapters active
  (ratio, target ≤ 1.05), first-partial latency (audio seconds pushed and wall seconds until the first
  non-empty partial), and the RTF including the second pass at the end of each utterance;
- mixed batch: ``--batch`` utterances of ``--languages`` languages, offline (``transcribe``, second pass,
  greedy) and streaming (``--batch`` synchronous streams): routed per sample (``mma.route``) vs the same
  batch in one language (``set_active``; target ≤ 1.1) vs grouped by language (each language's sub-batch
  with its adapter active, one after the other).

    .venv/bin/python bench/asr.py --quick --tiny   # smoke run (a random tiny model), seconds
    .venv/bin/python bench/asr.py --threads 2      # the issue's setting: 2 cores
    .venv/bin/python bench/asr.py --threads 2 --append-results docs/results.md

Writes ``--out``.json and ``--out``.md (default bench/out/asr) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import mmadapters as mma
from mmadapters.eval.results_io import write_bench_report
from mmadapters.speech.decode import SAMPLE_RATE, StreamingStats, StreamingTranscriber, transcribe

LANGS = ["de", "es", "fr", "it", "nl", "pl", "pt", "sv"]
RANDOM_VOCAB = 64  # characters of a random-init model (the shipped one's tokenizer has about this many)


# -- setup ------------------------------------------------------------------------------------------------
def load_bundle(random_init: bool, seed: int = 0, tiny: bool = False, model: str | None = None):
    """(bundle, description): ``model`` (a folder :func:`~mmadapters.speech.model.load_asr` reads), else the shipped
    tiny model, or a random default-config model (``tiny``: a random ``tiny_asr_config`` model, for smoke runs)."""
    from mmadapters.speech.model import AsrBundle, CascadedTransducer, TransducerConfig, load_asr, tiny_asr_config
    from mmadapters.speech.tokenizer import CharTokenizer

    if model is not None:
        bundle = load_asr(model)
        if not isinstance(bundle, AsrBundle):
            raise SystemExit(f"--model {model}: a {type(bundle).__name__}; the bench streams the cascaded transducer "
                             f"(a folder written by save_asr)")
        n = sum(p.numel() for p in bundle.model.parameters())
        return bundle, f"{model} ({n:,} parameters)"
    if not random_init and not tiny:
        try:
            bundle = load_asr()
            n = sum(p.numel() for p in bundle.model.parameters())
            return bundle, f"shipped tiny model ({bundle.path}, {n:,} parameters)"
        except FileNotFoundError:
            pass
    torch.manual_seed(seed)
    tokenizer = CharTokenizer([chr(c) for c in range(ord("!"), ord("!") + RANDOM_VOCAB - 2)])
    config = tiny_asr_config(tokenizer.vocab_size) if tiny else TransducerConfig(vocab_size=tokenizer.vocab_size)
    model = CascadedTransducer(config).eval()
    n = sum(p.numel() for p in model.parameters())
    if tiny:
        return AsrBundle(model, tokenizer, config), f"random init, tiny_asr_config ({n:,} parameters; --tiny smoke run)"
    why = "forced by --random-init" if random_init else "the shipped model is not there yet"
    return AsrBundle(model, tokenizer, config), f"random init, default TransducerConfig ({n:,} parameters; {why})"


def with_language_adapters(bundle, languages: Sequence[str], seed: int = 0, scale: float = 1e-3,
                           points: Sequence[str] | None = None):
    """A copy of ``bundle`` whose model has one LDA adapter set per language, with small random weights: every
    adapter computes, yet the transcripts (and so the decoder's work, which depends on how many symbols it
    emits) stay those of the base, so the timings compare adapter and routing costs alone."""
    from mmadapters.speech.lda import DEFAULT_POINTS, add_language_adapters

    model = copy.deepcopy(bundle.model)
    info = add_language_adapters(model, list(languages), freeze=False, points=points or DEFAULT_POINTS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lang in languages:
            for p in mma.adapter_parameters(model, lang).values():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.eval()
    return type(bundle)(model, bundle.tokenizer, bundle.config, bundle.path), info


def speechlike(seconds: float, seed: int) -> torch.Tensor:
    """Harmonics of a gliding pitch with a ~4 Hz syllable envelope, plus noise: (S,) at 16 kHz."""
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * SAMPLE_RATE)
    t = torch.arange(n) / SAMPLE_RATE
    f0 = 100 + 60 * torch.rand(1, generator=g) + 20 * torch.sin(2 * math.pi * 0.5 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SAMPLE_RATE
    voiced = sum(torch.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 + torch.sin(2 * math.pi * (3.5 + torch.rand(1, generator=g)) * t)) ** 2
    return (0.2 * voiced * envelope + 0.01 * torch.randn(n, generator=g)).float()


def load_waves(args) -> tuple[list[torch.Tensor], str]:
    """Utterances for the streaming section; all cut (or generated) to ``--seconds``."""
    if args.manifest:
        from mmadapters.speech.audio import load_audio
        from mmadapters.speech.readers import read_manifest

        utts = read_manifest(args.manifest)
        waves = []
        for u in utts:
            w = load_audio(u.audio_path)
            if w.shape[0] >= args.seconds * SAMPLE_RATE * 0.5:
                waves.append(w[: int(args.seconds * SAMPLE_RATE)])
            if len(waves) == args.utterances:
                break
        if not waves:
            raise SystemExit(f"bench/asr.py: {args.manifest}: no utterance of at least {args.seconds / 2:.1f} s")
        return waves, f"{len(waves)} utterances from {args.manifest} (up to {args.seconds} s each)"
    waves = [speechlike(args.seconds, seed) for seed in range(args.utterances)]
    return waves, f"{len(waves)} generated speech-like signals of {args.seconds} s"


# -- timing -----------------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def stream(bundle, waves: torch.Tensor, chunk: int, *, adapters=None, second_pass=None) -> tuple[StreamingStats, list[str]]:
    """Stream ``waves (B,S)`` through a new transcriber in chunks of ``chunk`` samples -> (stats, final texts)."""
    st = StreamingTranscriber(bundle, batch_size=waves.shape[0], second_pass=second_pass, adapters=adapters)
    for s in range(0, waves.shape[1], chunk):
        st.push(waves[:, s : s + chunk])
    return st.stats, st.finish()


# -- sections ---------------------------------------------------------------------------------------------
def bench_streaming(base, adapted, waves: list[torch.Tensor], args) -> dict:
    chunk = int(args.chunk_ms * SAMPLE_RATE / 1000)
    audio = sum(w.shape[0] for w in waves) / SAMPLE_RATE
    last: dict[str, list[tuple[StreamingStats, list[str]]]] = {}

    def run(name, bundle, second_pass=None, active=None):
        def fn():
            if active is not None:
                mma.set_active(bundle.model, active)
            last[name] = [stream(bundle, w[None], chunk, second_pass=second_pass) for w in waves]
        return fn

    lang = args.langs[0]
    # "adapters": one active adapter, the wrapper's cached plan and the bottleneck's fused forward; the same adapter as
    # a one-child Stack runs the general composition path (what every single adapter ran before the fast path)
    fns = {"base": run("base", base), "adapters": run("adapters", adapted, active=lang),
           "adapters_general_path": run("adapters_general_path", adapted, active=mma.Stack(lang)),
           "base_with_second_pass": run("base_with_second_pass", base, "greedy")}
    t = interleaved(fns, args.reps, args.warmup)
    mma.set_active(adapted.model, None)
    rtf = {k: v / audio for k, v in t.items()}

    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    latency = {k: {"audio_seconds": med(s.first_partial_audio_seconds[0] for s, _ in last[k]),
                   "wall_seconds": med(s.first_partial_wall_seconds[0] for s, _ in last[k])} for k in ("base", "adapters")}
    same = ([texts for _, texts in last["base"]] == [texts for _, texts in last["adapters"]]
            == [texts for _, texts in last["adapters_general_path"]])
    row = {"section": "streaming", "chunk_ms": args.chunk_ms, "audio_seconds": audio, "seconds": t, "rtf": rtf,
           "first_partial": latency, "same_transcripts": same,
           "ratios": {"adapters / base (streaming RTF)": t["adapters"] / t["base"],
                      "adapters, general composition path / base": t["adapters_general_path"] / t["base"]}}
    print(f"streaming: RTF base {rtf['base']:.4f}, with adapters {rtf['adapters']:.4f} "
          f"(x{t['adapters'] / t['base']:.3f}; general path x{t['adapters_general_path'] / t['base']:.3f}), "
          f"with second pass {rtf['base_with_second_pass']:.4f}; "
          f"first partial {latency['base']}", flush=True)
    return row


def bench_mixed(adapted, waves: list[torch.Tensor], args) -> list[dict]:
    model = adapted.model
    b = args.batch
    langs = args.langs
    batch = [waves[i % len(waves)] for i in range(b)]
    n = min(w.shape[0] for w in batch)
    batch = [w[:n] for w in batch]  # equal lengths: grouping changes no padding
    names = [langs[i % len(langs)] for i in range(b)]
    groups = {lang: [i for i, m in enumerate(names) if m == lang] for lang in langs}
    chunk = int(args.chunk_ms * SAMPLE_RATE / 1000)
    rows = []
    for mode in ("offline", "streaming"):
        outputs: dict[str, list[str]] = {}
        if mode == "offline":
            def run(ws, adapters=None):
                return transcribe(adapted, ws, adapters=adapters, batch_size=b)
        else:
            def run(ws, adapters=None):
                return stream(adapted, torch.stack(ws), chunk, adapters=adapters)[1]

        def single(run=run, outputs=outputs):
            mma.set_active(model, langs[0])
            try:
                outputs["one_language"] = run(batch)
            finally:
                mma.set_active(model, None)

        def grouped(run=run, outputs=outputs):
            texts = [""] * b
            try:
                for lang, idx in groups.items():
                    mma.set_active(model, lang)
                    for i, text in zip(idx, run([batch[i] for i in idx]), strict=True):
                        texts[i] = text
            finally:
                mma.set_active(model, None)
            outputs["grouped_by_language"] = texts

        def routed(adapters, key, run=run, outputs=outputs):
            outputs[key] = run(batch, adapters)

        fns = {"one_language": single, "routed_mixed": lambda: routed(names, "routed_mixed"),
               "routed_one_language": lambda: routed([langs[0]] * b, "routed_one_language"), "grouped_by_language": grouped}
        t = interleaved(fns, args.reps, args.warmup)
        row = {"section": f"mixed batch ({mode})", "B": b, "K": len(langs), "seconds": t,
               "audio_seconds": b * n / SAMPLE_RATE,
               "same_transcripts": all(v == outputs["one_language"] for v in outputs.values()),
               "routed_equals_grouped": outputs["routed_mixed"] == outputs["grouped_by_language"], "ratios": {
                   "routed mixed / one language": t["routed_mixed"] / t["one_language"],
                   "routed mixed / grouped by language": t["routed_mixed"] / t["grouped_by_language"],
                   "routed one language / one language": t["routed_one_language"] / t["one_language"]}}
        print(f"mixed {mode} B={b} K={len(langs)}: " + ", ".join(f"{k} {v:.3f}" for k, v in row["ratios"].items()), flush=True)
        rows.append(row)
    return rows


# -- report -----------------------------------------------------------------------------------------------
TARGETS = {
    "adapters / base (streaming RTF)": ("≤ 1.05", lambda r: r <= 1.05),
    "routed mixed / one language": ("≤ 1.10", lambda r: r <= 1.10),
}


def markdown(result: dict) -> str:
    s = result["streaming"]
    lines = [f"Model: {result['model']}. Audio: {result['audio']}. Language adapters: {result['adapters']['per_language_percent']:.2f}% "
             f"of the model per language (bottleneck {result['adapters']['dim']} at {', '.join(result['adapters']['points'])}).",
             f"Machine: {result['machine']}; torch {result['torch']}, {result['threads']} threads; {result['reps']} interleaved "
             "repetitions, medians.", "",
             "| section | setting | measure | value | target | met |", "|---|---|---|---|---|---|"]
    setting = f"chunks of {s['chunk_ms']} ms, B=1"
    lines.append(f"| streaming | {setting} | RTF, first pass (no adapters) | {s['rtf']['base']:.4f} | ≤ 0.1 | "
                 f"{'yes' if s['rtf']['base'] <= 0.1 else '**no**'} |")
    lines.append(f"| streaming | {setting} | RTF, first pass, one language's adapters | {s['rtf']['adapters']:.4f} |  |  |")
    lines.append(f"| streaming | {setting} | RTF, first pass + second pass at the end | {s['rtf']['base_with_second_pass']:.4f} |  |  |")
    lat = s["first_partial"]["base"]
    if lat["audio_seconds"] is not None:
        lines.append(f"| streaming | {setting} | first non-empty partial: audio pushed (s) | {lat['audio_seconds']:.3f} |  |  |")
        lines.append(f"| streaming | {setting} | first non-empty partial: wall time since first push (s) | "
                     f"{lat['wall_seconds']:.4f} |  |  |")
    for row in [s, *result["mixed"]]:
        where = setting if row is s else f"B={row['B']}, K={row['K']} languages"
        for name, value in row["ratios"].items():
            target, ok = TARGETS.get(name, ("", None))
            met = "" if ok is None else ("yes" if ok(value) else "**no**")
            lines.append(f"| {row['section']} | {where} | {name} | {value:.3f} | {target} | {met} |")
    lines.append("")
    same = [f"streaming {'yes' if s['same_transcripts'] else 'no'}"] + [
        f"{row['section']} {'yes' if row['same_transcripts'] else 'no'} (routed mixed = grouped: "
        f"{'yes' if row['routed_equals_grouped'] else '**no**'})" for row in result["mixed"]]
    lines.append("Same transcripts in every variant (equal decoder work): " + "; ".join(same) + ".")
    lines.append("Absolute medians (s): " + "; ".join(
        f"{row['section']}: " + ", ".join(f"{k} {v:.4f}" for k, v in row["seconds"].items()) for row in [s, *result["mixed"]])
        + f". Streaming audio per repetition: {s['audio_seconds']:.1f} s.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short audio, small batch, one repetition: a smoke run")
    ap.add_argument("--random-init", action="store_true", help="use a random default-config model even if the shipped one exists")
    ap.add_argument("--tiny", action="store_true", help="use a random tiny_asr_config model (smoke runs, tests)")
    ap.add_argument("--model", default=None, metavar="DIR",
                    help="a model folder written by save_asr (default: the shipped speech/assets/tiny_asr)")
    ap.add_argument("--points", default=None, metavar="P1,P2",
                    help="the language adapters' points (default: the LDA recipe's, block_out,predictor_out), e.g. block_out")
    ap.add_argument("--manifest", default=None, help="NeMo JSONL manifest to take audio from (default: generated signals)")
    ap.add_argument("--utterances", type=int, default=4, help="utterances streamed one at a time")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each utterance")
    ap.add_argument("--chunk-ms", type=float, default=160.0, help="streaming chunk (160 ms = one attention chunk of the default config)")
    ap.add_argument("--batch", type=int, default=8, help="utterances in the mixed-language batch")
    ap.add_argument("--languages", type=int, default=4, help="distinct languages in the mixed batch")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", default="bench/out/asr")
    ap.add_argument("--append-results", default=None, help="append the markdown table to this file (docs/results.md)")
    args = ap.parse_args(argv)
    if args.quick:
        args.utterances, args.seconds, args.batch, args.languages, args.reps, args.warmup = 1, 0.5, 4, 2, 1, 0
    if not 1 <= args.languages <= len(LANGS):
        ap.error(f"--languages must be between 1 and {len(LANGS)}")
    args.langs = LANGS[: args.languages]
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    if args.model is not None and (args.random_init or args.tiny):
        ap.error("--model cannot be combined with --random-init or --tiny")
    base, model_text = load_bundle(args.random_init, tiny=args.tiny, model=args.model)
    adapted, info = with_language_adapters(base, args.langs, points=args.points.split(",") if args.points else None)
    waves, audio_text = load_waves(args)
    print(f"model: {model_text}; audio: {audio_text}", flush=True)
    streaming = bench_streaming(base, adapted, waves, args)
    mixed = bench_mixed(adapted, waves, args)
    result = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/asr.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps,
        "model": model_text, "audio": audio_text,
        "adapters": {"languages": args.langs, "dim": info.dim, "points": info.points,
                     "per_language_parameters": info.per_language_parameters, "per_language_percent": 100 * info.fraction},
        "streaming": streaming, "mixed": mixed, "wall_seconds": round(time.time() - start, 1),
    }
    write_bench_report(args.out, result, markdown(result), title="ASR speed benchmark", append_to=args.append_results)
    return result


if __name__ == "__main__":
    main()
