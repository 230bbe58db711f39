"""The LDA experiment: tail-language WER of base / full fine-tuning / LDA / LDA + noisy student / LDA + merge.

    python -m mmadapters.speech.synth --utterances 1500 --seed 0 --out data/speech     # same data as pretraining
    python scripts/run_lda.py --data data/speech --out out/lda --threads 2

For every tail language of the generated data (the roles in ``DIR/synth_config.json``, or ``--languages``):

- **base**: the pretrained multilingual model (``--model``, default the shipped tiny model), no adaptation;
- **full FT**: a copy of the whole model fine-tuned on that language alone (one model per language);
- **LDA**: one bottleneck adapter set per language (≈0.4% of the model each, exact share reported) at
  ``@block_out`` of both passes, the base frozen, trained together on mixed-language batches routed per sample
  by language ID; dev WER and adapters saved at every evaluation;
- **LDA + merge**: each language's adapter taken from the evaluation where its dev WER was lowest;
- **LDA + noisy student**: a teacher pseudo-labels the ``unlabeled`` split (confidence filter; the split's own
  text is used only to score the pseudo-labels), then the adapters continue training from the merged LDA
  adapters on pseudo-labels + transcribed data with SpecAugment and additive noise. The default teacher is the
  non-causal second pass of the frozen foundation *with the merged language adapters* (the bare foundation
  never heard the tail languages, so its own transcripts would be noise); ``--teacher DIR`` (and
  ``--teacher-adapters``) substitutes a larger model (labels pass as text, so its tokenizer may differ).

Test WER is scored on the second (final) pass and, with ``--passes first,second``, on the streaming first pass.
Writes ``OUT/results.json`` and ``OUT/results.md`` (table for docs/results.md); adapters and checkpoints under OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import mmadapters as mma
from mmadapters.io import atomic_write_bytes
from mmadapters.speech import lda
from mmadapters.speech.model import AsrBundle, load_asr
from mmadapters.speech.readers import Utterance, read_manifest
from mmadapters.speech.train import TrainConfig, evaluate

VARIANTS = ("base", "full_ft", "lda", "lda_noisy_student", "lda_merge")
LABELS = {"base": "base", "full_ft": "full FT", "lda": "LDA", "lda_noisy_student": "LDA + noisy student", "lda_merge": "LDA + merge"}


def read_split(data: Path, split: str, languages: list[str], cap: int | None = None) -> list[Utterance]:
    path = data / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: manifest not found (generate data with `python -m mmadapters.speech.synth --out {data}`)")
    out, seen = [], {}
    for u in read_manifest(path):
        if u.lang in languages and (cap is None or seen.get(u.lang, 0) < cap):
            seen[u.lang] = seen.get(u.lang, 0) + 1
            out.append(u)
    return out


def tail_languages(data: Path) -> list[str]:
    path = data / "synth_config.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; name the tail languages with --languages")
    meta = json.loads(path.read_text(encoding="utf-8"))
    return [lang for lang, info in meta["languages"].items() if info.get("role") == "tail"]


def score(model, tokenizer, test, passes, adapter_for=None, device="cpu", progress=None) -> dict:
    out = {}
    for pass_ in passes:
        r = evaluate(model, tokenizer, test, adapter_for=adapter_for, pass_=pass_, device=device, progress=progress,
                     desc=f"test {pass_} pass")
        out[pass_] = r
    return out


def relative(base: float, x: float) -> float:
    return (base - x) / base if base and not math.isnan(base) and not math.isnan(x) else math.nan


def pct(x: float, digits: int = 1) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}"


def markdown(results: dict) -> str:
    langs = results["languages"]
    variants = [v for v in VARIANTS if v in results["variants"]]
    main = results["main_pass"]
    head = "| language | " + " | ".join(LABELS[v] for v in variants) + " |"
    lines = [f"Test WER (%, {main} pass, greedy, normalized text); lower is better.", "", head, "|---" * (len(variants) + 1) + "|"]
    for lang in langs:
        cells = [pct(results["variants"][v]["wer"][main]["per_language"].get(lang, math.nan)) for v in variants]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    lines.append("| **average** | " + " | ".join(pct(results["variants"][v]["wer"][main]["average"]) for v in variants) + " |")
    lines.append("| avg. relative WER reduction vs base | "
                 + " | ".join(pct(results["variants"][v]["relative_reduction"][main]["average"]) for v in variants) + " |")
    lines.append("| trainable parameters per language (% of model) | "
                 + " | ".join(pct(results["variants"][v]["fraction_per_language"], 3) for v in variants) + " |")
    lines.append("| training time (s, all languages) | "
                 + " | ".join(f"{results['variants'][v]['train_seconds']:.0f}" for v in variants) + " |")
    others = [p for p in results["passes"] if p != main]
    for p in others:
        lines += ["", f"Average test WER on the {p} pass (%): "
                  + ", ".join(f"{LABELS[v]} {pct(results['variants'][v]['wer'][p]['average'])}" for v in variants)]
    a = results.get("adapters")
    if a:
        lines += ["", f"Adapters: bottleneck width {a['dim']} at {', '.join('@' + x for x in a['points'])} (both passes): "
                  f"{a['per_language_parameters']:,} parameters per language = {100 * a['fraction']:.3f}% of the "
                  f"{a['base_parameters']:,}-parameter model."]
    if "pseudo_labels" in results:
        pl = results["pseudo_labels"]
        lines.append(f"Noisy student: {pl['kept']} of {pl['total']} unlabeled utterances kept (confidence ≥ {pl['min_confidence']}); "
                     f"pseudo-label WER {pct(pl['wer_kept'])}% on the kept ones.")
    if "merge" in results:
        lines.append("Merge: best dev step per language: " + ", ".join(f"{k} {v}" for k, v in results["merge"]["best_step"].items()) + ".")
    return "\n".join(lines) + "\n"


def summarize(wer_by_pass: dict, base: dict | None, passes) -> tuple[dict, dict]:
    wer = {p: {"per_language": wer_by_pass[p], "average": _mean(wer_by_pass[p].values())} for p in passes}
    rel = {}
    for p in passes:
        per = {lang: relative(base[p]["per_language"][lang], w) for lang, w in wer_by_pass[p].items()} if base else {}
        rel[p] = {"per_language": per, "average": _mean(per.values()) if base else 0.0}
    return wer, rel


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="generated data dir (python -m mmadapters.speech.synth --out DIR)")
    p.add_argument("--model", type=Path, default=None, help="pretrained model dir (default: the shipped tiny model)")
    p.add_argument("--out", type=Path, required=True, help="output dir (results.json, results.md, adapters)")
    p.add_argument("--languages", default=None, help="comma-separated tail languages (default: the data's tail languages)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--passes", default="second,first", help="encoder passes to score on test; the first listed is the table's")
    p.add_argument("--points", default="block_out", help="adapter points (comma-separated), e.g. block_out,attn_out")
    p.add_argument("--adapter-dim", type=int, default=None, help="bottleneck width (default: sized by --fraction)")
    p.add_argument("--fraction", type=float, default=lda.TARGET_FRACTION, help="adapter size per language / model size")
    p.add_argument("--lda-steps", type=int, default=600)
    p.add_argument("--lda-minutes", type=float, default=None, help="wall-time cap for LDA training")
    p.add_argument("--lda-lr", type=float, default=3e-3)
    p.add_argument("--ft-steps", type=int, default=100, help="full fine-tuning steps per language")
    p.add_argument("--ft-minutes", type=float, default=None, help="wall-time cap per language for full fine-tuning")
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--ns-steps", type=int, default=300, help="noisy-student training steps")
    p.add_argument("--ns-minutes", type=float, default=None)
    p.add_argument("--teacher", type=Path, default=None,
                   help="noisy-student teacher model dir, e.g. a larger model (default: the merged LDA model itself)")
    p.add_argument("--teacher-adapters", type=Path, default=None,
                   help="language adapters for --teacher (a save_adapters dir with one subdir per language)")
    p.add_argument("--min-confidence", type=float, default=0.5, help="pseudo-label confidence threshold (per-token probability)")
    p.add_argument("--noise-snr", type=float, default=20.0, help="additive noise SNR (dB) in noisy-student training; <0: none")
    p.add_argument("--eval-every", type=int, default=100, help="dev evaluation (and adapter checkpoint) every N LDA steps")
    p.add_argument("--batch-seconds", type=float, default=40.0)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--dev-per-language", type=int, default=20)
    p.add_argument("--test-per-language", type=int, default=None)
    p.add_argument("--unlabeled-per-language", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = False if args.quiet else None
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; expected a subset of {','.join(VARIANTS)}")
    passes = args.passes.split(",")
    if any(x not in ("first", "second") for x in passes):
        raise SystemExit(f"--passes: expected 'first' and/or 'second', got {args.passes!r}")
    languages = args.languages.split(",") if args.languages else tail_languages(args.data)
    if not languages:
        raise SystemExit(f"no tail languages in {args.data}; pass --languages")
    bundle = load_asr(args.model, device=args.device)
    base, tokenizer = bundle.model, bundle.tokenizer
    for prm in base.parameters():
        prm.requires_grad_(False)
    train_utts = read_split(args.data, "train", languages)
    dev_utts = read_split(args.data, "dev", languages, args.dev_per_language)
    test_utts = read_split(args.data, "test", languages, args.test_per_language)
    present = sorted({u.lang for u in train_utts})
    if present != sorted(languages):
        raise SystemExit(f"{args.data / 'train.jsonl'}: no training data for {sorted(set(languages) - set(present))}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    total_params = sum(prm.numel() for prm in base.parameters())
    print(f"{len(languages)} tail languages {','.join(languages)}: {len(train_utts)} train / {len(dev_utts)} dev / "
          f"{len(test_utts)} test utterances; model {total_params:,} parameters", flush=True)

    common = dict(batch_seconds=args.batch_seconds, warmup_steps=args.warmup, seed=args.seed, device=args.device,
                  progress=progress, eval_pass=passes[0])
    results: dict = {"command": "python scripts/run_lda.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
                     "languages": languages, "passes": passes, "main_pass": passes[0], "model": str(bundle.path),
                     "model_parameters": total_params, "torch_threads": torch.get_num_threads(), "variants": {},
                     "data": {"train": len(train_utts), "dev": len(dev_utts), "test": len(test_utts)}}

    def record(name: str, scores: dict, train_seconds: float, fraction: float, extra: dict | None = None) -> None:
        wer_by_pass = {pp: {lang: v["wer"] for lang, v in scores[pp].per_language.items()} for pp in passes}
        base_wer = results["variants"].get("base", {}).get("wer")
        wer, rel = summarize(wer_by_pass, base_wer, passes)
        results["variants"][name] = {"wer": wer, "relative_reduction": rel, "train_seconds": train_seconds,
                                     "eval_seconds": sum(s.seconds for s in scores.values()), "fraction_per_language": fraction,
                                     **(extra or {})}
        print(f"{LABELS[name]}: average test WER ({passes[0]} pass) {wer[passes[0]]['average']:.3f}; "
              f"training {train_seconds:.0f} s", flush=True)
        write(results, out)

    # base (always scored: the other variants' relative reductions need it)
    record("base", score(base, tokenizer, test_utts, passes, device=args.device, progress=progress), 0.0, 0.0)

    # full fine-tuning, one model per language
    if "full_ft" in variants:
        per_lang: dict[str, dict] = {pp: {} for pp in passes}
        seconds = 0.0
        ft_config = TrainConfig(steps=args.ft_steps, lr=args.ft_lr, eval_every=0,
                                max_seconds=None if args.ft_minutes is None else 60 * args.ft_minutes, **common)
        for lang in languages:
            tuned, res = lda.full_finetune(base, tokenizer, train_utts, [], language=lang, config=ft_config)
            seconds += res.seconds
            s = score(tuned, tokenizer, [u for u in test_utts if u.lang == lang], passes, device=args.device, progress=progress)
            for pp in passes:
                per_lang[pp][lang] = s[pp]
            del tuned
        merged_scores = {pp: _merge_evals(per_lang[pp]) for pp in passes}
        record("full_ft", merged_scores, seconds, 1.0)

    need_lda = any(v in variants for v in ("lda", "lda_merge", "lda_noisy_student"))
    if need_lda:
        model = copy.deepcopy(base)
        info = lda.add_language_adapters(model, languages, dim=args.adapter_dim, fraction=args.fraction,
                                         points=args.points.split(","))
        results["adapters"] = info.as_dict()
        print(f"LDA adapters: width {info.dim}, {info.per_language_parameters:,} parameters per language "
              f"({100 * info.fraction:.3f}% of the model)", flush=True)
        router = lda.language_router(languages)
        lda_config = TrainConfig(steps=args.lda_steps, lr=args.lda_lr, eval_every=args.eval_every,
                                 max_seconds=None if args.lda_minutes is None else 60 * args.lda_minutes, **common)
        run = lda.train_lda(model, tokenizer, train_utts, dev_utts, languages=languages, config=lda_config,
                            checkpoint_dir=out / "lda_checkpoints")
        lda_seconds = run.result.seconds
        mma.save_adapters(model, out / "lda_adapters", names=languages)
        if "lda" in variants:
            record("lda", score(model, tokenizer, test_utts, passes, router, args.device, progress), lda_seconds, info.fraction,
                   {"steps": run.result.steps, "dev": [{"step": s, **e.wers()} for s, e in run.result.evals]})
        merged = lda.merge_best(run.checkpoints, run.dev_wers, model=model, output_dir=out / "lda_merged_adapters", overwrite=True)
        results["merge"] = {**merged.as_dict(), "best_step": {k: int(v.name.split("-")[1]) for k, v in merged.chosen.items()}}
        if "lda_merge" in variants:
            record("lda_merge", score(model, tokenizer, test_utts, passes, router, args.device, progress), lda_seconds, info.fraction)

        if "lda_noisy_student" in variants:
            start = time.perf_counter()
            unlabeled = read_split(args.data, "unlabeled", languages, args.unlabeled_per_language)
            hidden = [replace(u, text="") for u in unlabeled]  # the teacher never sees the generator's text
            teacher, teacher_router = AsrBundle(model, tokenizer, bundle.config), router
            if args.teacher is not None:
                teacher = load_asr(args.teacher, device=args.device)
                teacher_router = None
                if args.teacher_adapters is not None:
                    lda.load_language_adapters(teacher.model, args.teacher_adapters)
                    teacher_router = lda.language_router(mma.adapter_names(teacher.model))
            labels = lda.pseudo_label(teacher, hidden, adapter_for=teacher_router, pass_="second", min_confidence=args.min_confidence,
                                      device=args.device, progress=progress)
            truth = {u.id: u.text for u in unlabeled}
            results["pseudo_labels"] = {**labels.as_dict(), "total": len(unlabeled), "min_confidence": args.min_confidence,
                                        "wer_kept": _pseudo_wer(labels.kept, truth),
                                        "seconds": time.perf_counter() - start}
            student = model  # starts from the merged LDA adapters
            ns_config = TrainConfig(steps=args.ns_steps, lr=args.lda_lr, eval_every=args.eval_every,
                                    max_seconds=None if args.ns_minutes is None else 60 * args.ns_minutes, **common)
            ns = lda.noisy_student(student, tokenizer, labels.kept, train_utts, dev_utts, languages=languages, config=ns_config,
                                   noise_snr_db=None if args.noise_snr < 0 else args.noise_snr,
                                   checkpoint_dir=out / "noisy_student_checkpoints")
            seconds = lda_seconds + (time.perf_counter() - start)  # LDA, pseudo-labelling and student training
            mma.save_adapters(student, out / "noisy_student_adapters", names=languages)
            record("lda_noisy_student", score(student, tokenizer, test_utts, passes, router, args.device, progress), seconds,
                   info.fraction, {"steps": ns.result.steps, "dev": [{"step": s, **e.wers()} for s, e in ns.result.evals]})
    write(results, out)
    print(markdown(results))
    return 0


def _merge_evals(per_lang: dict):
    """One EvalResult-like view over per-language results (full FT scores each language with its own model)."""
    from mmadapters.speech.train import EvalResult

    merged = EvalResult({}, {})
    for r in per_lang.values():
        merged.per_language.update(r.per_language)
        merged.seconds += r.seconds
        for k, v in r.skipped.items():
            merged.skipped[k] = merged.skipped.get(k, 0) + v
    return merged


def _pseudo_wer(kept: list[Utterance], truth: dict[str, str]) -> float:
    from mmadapters.eval.metrics import normalize_text, wer

    if not kept:
        return math.nan
    return wer([normalize_text(truth[u.id]) for u in kept], [normalize_text(u.text) for u in kept])


def write(results: dict, out: Path) -> None:
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=1, default=str) + "\n").encode())
    if "base" in results["variants"]:
        atomic_write_bytes(out / "results.md", markdown(results).encode())


if __name__ == "__main__":
    sys.exit(main())
