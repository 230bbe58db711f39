"""The LDA experiment: tail-language WER of base / full fine-tuning / LDA / LDA + noisy student / LDA + merge.

    python -m mmadapters.speech.synth --utterances 1500 --seed 0 --out data/speech     # same data as pretraining
    python scripts/run_lda.py --data data/speech --out out/lda --threads 2

A sweep over ``mmadapters train lda`` and ``mmadapters eval asr`` (run in this process), for the tail languages
of the generated data (the roles in ``DIR/synth_config.json``, or ``--languages``). Each training run is a run
folder under OUT with the YAML it was started from in ``OUT/configs/``; rerunning the script continues an
interrupted run (``--resume``) and scores again.

- **base**: the pretrained multilingual model (``--model``, default the shipped tiny model), no adaptation;
- **full FT**: ``method: full`` on one language at a time (``OUT/full_ft_<lang>/``), scored on that language;
- **LDA**: one adapter set per language (≈0.4% of the model each, exact share reported), the base frozen,
  trained together on mixed-language batches routed per sample by language ID, ``merge: per_language``
  (``OUT/lda/``); scored with the adapters after the last step (``last/``);
- **LDA + merge**: the same run's ``merged/``: each language's adapter from the validation where its dev WER
  was lowest;
- **LDA + noisy student**: ``init_adapters: OUT/lda/merged`` and ``pseudo_label:`` (``OUT/noisy_student/``): the
  teacher (the foundation's non-causal second pass with the merged adapters, or ``--teacher`` with
  ``--teacher-adapters``) labels the ``unlabeled`` split (confidence filter; the split's own text only scores the
  labels), then the adapters train on labels + transcribed data with SpecAugment and additive noise.

Every score is an ``eval asr`` results file (``OUT/scores/``; the relative WER reduction against base through
``--baseline``), on the second (final) pass and, with ``--passes second,first``, the streaming first pass.
Writes ``OUT/results.json`` and ``OUT/results.md`` (the table for docs/results.md). ``--ship DIR`` then copies one
variant's adapters (``--ship-variant``, default LDA + merge) to DIR, one folder per language as
:func:`mmadapters.save_adapters` writes them, with a ``README.md`` of the command, the base model and the table: how
speech/assets/tiny_asr_lda is made.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmadapters.eval.cli import main as mmadapters
from mmadapters.eval.results_schema import read_results
from mmadapters.io import atomic_write_bytes, checkpoint_adapter_dirs, replace_directory
from mmadapters.speech.lda import DEFAULT_POINTS, TARGET_FRACTION
from mmadapters.speech.readers import read_manifest, write_manifest
from mmadapters.speech.train import first_per_language
from mmadapters.training.config_io import dump_yaml

VARIANTS = ("base", "full_ft", "lda", "lda_noisy_student", "lda_merge")
SHIPPABLE = ("lda", "lda_merge", "lda_noisy_student")
LABELS = {"base": "base", "full_ft": "full FT", "lda": "LDA", "lda_noisy_student": "LDA + noisy student", "lda_merge": "LDA + merge"}


def tail_languages(data: Path) -> list[str]:
    path = data / "synth_config.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; name the tail languages with --languages")
    meta = json.loads(path.read_text(encoding="utf-8"))
    return [lang for lang, info in meta["languages"].items() if info.get("role") == "tail"]


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.{digits}f}"


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def markdown(results: dict) -> str:
    langs = results["languages"]
    variants = [v for v in VARIANTS if v in results["variants"]]
    main = results["main_pass"]
    head = "| language | " + " | ".join(LABELS[v] for v in variants) + " |"
    decode = results.get("decode", "greedy")  # results written before --decode: greedy
    decode = f"beam {results['beam']}" if decode == "beam" else decode
    lines = [f"Test WER (%, {main} pass, {decode}, normalized text); lower is better.", "", head, "|---" * (len(variants) + 1) + "|"]
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
    for p in [p for p in results["passes"] if p != main]:
        lines += ["", f"Average test WER on the {p} pass (%): "
                  + ", ".join(f"{LABELS[v]} {pct(results['variants'][v]['wer'][p]['average'])}" for v in variants)]
    a = results.get("adapters")
    if a:
        lines += ["", f"Adapters: bottleneck width {a['dim']} at {', '.join('@' + x for x in a['points'])}: "
                  f"{a['per_language_parameters']:,} parameters per language = {100 * a['fraction']:.3f}% of the "
                  f"{a['base_parameters']:,}-parameter model."]
    if results.get("pseudo_labels"):
        pl = results["pseudo_labels"]
        lines.append(f"Noisy student: {pl['kept']} of {pl['total']} unlabeled utterances kept (confidence ≥ {pl['min_confidence']}); "
                     f"pseudo-label WER {pct(pl['wer_kept'])}% on the kept ones.")
    if results.get("merge"):
        lines.append("Merge: best dev step per language: "
                     + ", ".join(f"{k} {v['step']}" for k, v in results["merge"].items()) + ".")
    return "\n".join(lines) + "\n"


class Sweep:
    """Runs ``mmadapters train lda`` / ``eval asr`` for the variants and collects their numbers."""

    def __init__(self, args: argparse.Namespace, languages: list[str]):
        self.args, self.languages, self.out = args, languages, args.out
        self.quiet = ["--no-progress"] if args.quiet else []

    def train(self, name: str, trainer: dict, recipe: dict) -> Path:
        """``mmadapters train lda`` into ``OUT/<name>`` (resumed when it holds a training state); returns the run folder."""
        a = self.args
        run = self.out / name
        config = self.out / "configs" / f"{name}.yaml"
        dump_yaml({"output": str(run),
                   "trainer": {"batch_size": a.batch_size, "warmup_ratio": min(1.0, a.warmup / max(1, trainer["steps"])),
                               "seed": a.seed, "device": a.device, "progress": not a.quiet, **trainer},
                   "recipe": {"data_dir": str(a.data), "dev_per_language": a.dev_per_language, "model": a.model and str(a.model),
                              "eval_pass": a.passes[0], **recipe}}, config)
        argv = ["train", "lda", "--config", str(config), *(["--resume"] if (run / "train_state.pt").is_file() else [])]
        print(f"$ mmadapters {shlex.join(argv)}", flush=True)
        if mmadapters(argv) != 0:
            raise SystemExit(f"mmadapters {shlex.join(argv)} failed (see above)")
        return run

    def score(self, name: str, manifest: Path, *weights: str, baseline: dict | None = None) -> dict[str, dict]:
        """``mmadapters eval asr`` on every pass; returns the results by pass."""
        out = {}
        for pass_ in self.args.passes:
            path = self.out / "scores" / f"{name}_{pass_}.json"
            argv = ["eval", "asr", "--manifest", str(manifest), "--allow-absolute", "--pass", pass_, "--output", str(path),
                    "--device", self.args.device, "--decode", self.args.decode, "--beam", str(self.args.beam),
                    "--overwrite", "--restart", *weights, *self.quiet]
            if baseline is not None:
                argv += ["--baseline", baseline[pass_]["output"]]
            if mmadapters(argv) != 0:
                raise SystemExit(f"mmadapters {shlex.join(argv)} failed (see above)")
            out[pass_] = {**read_results(path), "output": str(path)}
        return out


def engine_seconds(run: Path) -> float:
    """Training, validation and checkpoint seconds of a run (resumed sessions included)."""
    t = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))["timings"]
    return sum(t[k] for k in ("train_s", "validate_s", "checkpoint_s"))


def variant(scores: list[dict[str, dict]], passes: list[str], train_seconds: float, fraction: float, **extra) -> dict:
    """One table column from ``eval asr`` results (several for per-language runs): WER and the relative reduction
    against base per language and on average."""
    wer, rel = {}, {}
    for p in passes:
        per = {lang: e["wer"] for s in scores for lang, e in s[p]["per_group"].items()}
        red = {lang: e["relative_wer_reduction"] for s in scores for lang, e in s[p]["per_group"].items()
               if "relative_wer_reduction" in e}
        per = {k: math.nan if v is None else v for k, v in per.items()}
        red = {k: math.nan if v is None else v for k, v in red.items()}
        wer[p] = {"per_language": per, "average": _mean(per.values())}
        rel[p] = {"per_language": red, "average": _mean(red.values()) if red else 0.0}
    return {"wer": wer, "relative_reduction": rel, "train_seconds": train_seconds, "fraction_per_language": fraction,
            "results_files": [s[p]["output"] for s in scores for p in passes], **extra}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="generated data dir (python -m mmadapters.speech.synth --out DIR)")
    p.add_argument("--model", type=Path, default=None, help="pretrained model dir (default: the shipped tiny model)")
    p.add_argument("--out", type=Path, required=True, help="output dir (run folders, scores, results.json, results.md)")
    p.add_argument("--languages", default=None, help="comma-separated tail languages (default: the data's tail languages)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--passes", default="second,first", help="encoder passes to score on test; the first listed is the table's")
    p.add_argument("--points", default=",".join(DEFAULT_POINTS),
                   help=f"adapter points (comma-separated; default {','.join(DEFAULT_POINTS)}), e.g. block_out,attn_out")
    p.add_argument("--adapter-dim", type=int, default=None, help="bottleneck width (default: sized by --fraction)")
    p.add_argument("--fraction", type=float, default=TARGET_FRACTION, help="adapter size per language / model size")
    p.add_argument("--lda-steps", type=int, default=600)
    p.add_argument("--lda-minutes", type=float, default=None, help="wall-time cap for LDA training")
    p.add_argument("--lda-lr", type=float, default=1e-2)
    p.add_argument("--ft-steps", type=int, default=100, help="full fine-tuning steps per language")
    p.add_argument("--ft-minutes", type=float, default=None, help="wall-time cap per language for full fine-tuning")
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--ns-steps", type=int, default=300, help="noisy-student training steps")
    p.add_argument("--ns-minutes", type=float, default=None)
    p.add_argument("--teacher", type=Path, default=None,
                   help="noisy-student teacher model dir, e.g. a larger model (default: the foundation with the merged LDA adapters)")
    p.add_argument("--teacher-adapters", type=Path, default=None,
                   help="language adapters for --teacher (a save_adapters dir with one subdir per language)")
    p.add_argument("--min-confidence", type=float, default=0.5, help="pseudo-label confidence threshold (per-token probability)")
    p.add_argument("--noise-snr", type=float, default=20.0, help="additive noise SNR (dB) in noisy-student training; <0: none")
    p.add_argument("--decode", choices=("greedy", "beam"), default="greedy", help="test decoding (eval asr --decode)")
    p.add_argument("--beam", type=int, default=4, help="beam size with --decode beam")
    p.add_argument("--eval-every", type=int, default=100, help="dev evaluation (and adapter checkpoint) every N LDA steps")
    p.add_argument("--batch-size", type=int, default=8, help="utterances per training step (languages mixed)")
    p.add_argument("--warmup", type=int, default=50, help="warmup steps")
    p.add_argument("--dev-per-language", type=int, default=20)
    p.add_argument("--test-per-language", type=int, default=None)
    p.add_argument("--unlabeled-per-language", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ship", type=Path, default=None, metavar="DIR",
                   help="copy the --ship-variant adapters here with a README (e.g. speech/assets/tiny_asr_lda)")
    p.add_argument("--ship-variant", choices=SHIPPABLE, default="lda_merge", help="which adapters --ship copies")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; expected a subset of {','.join(VARIANTS)}")
    if args.ship is not None and args.ship_variant not in variants:
        raise SystemExit(f"--ship-variant {args.ship_variant}: not among --variants {args.variants}")
    args.passes = args.passes.split(",")
    if not args.passes or any(x not in ("first", "second") for x in args.passes):
        raise SystemExit(f"--passes: expected 'first' and/or 'second', got {','.join(args.passes)!r}")
    languages = args.languages.split(",") if args.languages else tail_languages(args.data)
    if not languages:
        raise SystemExit(f"no tail languages in {args.data}; pass --languages")
    test_path = args.data / "test.jsonl"
    if not test_path.is_file():
        raise SystemExit(f"{test_path}: manifest not found (generate data with `python -m mmadapters.speech.synth --out {args.data}`)")
    out = args.out
    test = first_per_language([u for u in read_manifest(test_path) if u.lang in languages], args.test_per_language)
    manifests = {"all": write_manifest(out / "manifests" / "test.jsonl", test, allow_absolute=True)}
    for lang in languages:
        manifests[lang] = write_manifest(out / "manifests" / f"test_{lang}.jsonl", [u for u in test if u.lang == lang],
                                         allow_absolute=True)
    sweep = Sweep(args, languages)
    model = ["--model", str(args.model)] if args.model else []
    results: dict = {"command": "python scripts/run_lda.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                     "languages": languages, "passes": args.passes, "main_pass": args.passes[0],
                     "model": str(args.model) if args.model else "tiny_asr", "torch_threads": torch.get_num_threads(),
                     "test_utterances": len(test), "decode": args.decode, "beam": args.beam, "variants": {}}
    started = time.perf_counter()

    def record(name: str, column: dict) -> None:
        results["variants"][name] = column
        print(f"{LABELS[name]}: average test WER ({args.passes[0]} pass) {column['wer'][args.passes[0]]['average']:.3f}", flush=True)
        write(results, out)

    # base (always scored: the other variants' relative reductions need it)
    base = sweep.score("base", manifests["all"], *model)
    record("base", variant([base], args.passes, 0.0, 0.0))

    if "full_ft" in variants:
        runs = {lang: sweep.train(f"full_ft_{lang}", {"steps": args.ft_steps, "lr": args.ft_lr, "max_minutes": args.ft_minutes,
                                                      "eval_every": 0, "checkpoint_every": 0},
                                  {"method": "full", "languages": [lang]}) for lang in languages}
        scores = [sweep.score(f"full_ft_{lang}", manifests[lang], "--model", str(run / "last"), baseline=base)
                  for lang, run in runs.items()]
        record("full_ft", variant(scores, args.passes, sum(engine_seconds(r) for r in runs.values()), 1.0))

    if any(v in variants for v in ("lda", "lda_merge", "lda_noisy_student")):
        lda_run = sweep.train("lda", {"steps": args.lda_steps, "lr": args.lda_lr, "max_minutes": args.lda_minutes,
                                      "eval_every": args.eval_every, "checkpoint_every": args.eval_every},
                              {"languages": languages, "adapter_dim": args.adapter_dim, "fraction": args.fraction,
                               "points": args.points.split(","), "merge": "per_language"})
        info = json.loads((lda_run / "last" / "lda.json").read_text(encoding="utf-8"))
        results["adapters"] = info["adapters"]
        results["merge"] = json.loads((lda_run / "merge.json").read_text(encoding="utf-8"))
        seconds, fraction = engine_seconds(lda_run), info["adapters"]["fraction"]
        summary = json.loads((lda_run / "train_summary.json").read_text(encoding="utf-8"))
        if "lda" in variants:
            record("lda", variant([sweep.score("lda", manifests["all"], *model, "--adapters", str(lda_run / "last"),
                                               baseline=base)], args.passes, seconds, fraction, steps=summary["steps"]))
        if "lda_merge" in variants:
            record("lda_merge", variant([sweep.score("lda_merge", manifests["all"], *model, "--adapters",
                                                     str(lda_run / "merged"), baseline=base)], args.passes, seconds, fraction))
        if "lda_noisy_student" in variants:
            pseudo = {"split": "unlabeled", "per_language": args.unlabeled_per_language, "min_confidence": args.min_confidence,
                      "teacher_model": args.teacher and str(args.teacher),
                      "teacher_adapters": args.teacher_adapters and str(args.teacher_adapters)}
            ns_run = sweep.train("noisy_student", {"steps": args.ns_steps, "lr": args.lda_lr, "max_minutes": args.ns_minutes,
                                                   "eval_every": args.eval_every, "checkpoint_every": args.eval_every},
                                 {"languages": languages, "adapter_dim": info["adapters"]["dim"], "points": args.points.split(","),
                                  "init_adapters": str(lda_run / "merged"), "pseudo_label": pseudo,
                                  "noise_snr_db": None if args.noise_snr < 0 else args.noise_snr})
            labels = json.loads((ns_run / "last" / "lda.json").read_text(encoding="utf-8"))["pseudo_labels"]
            results["pseudo_labels"] = labels
            # LDA, pseudo-labelling and student training
            total = seconds + labels["seconds"] + engine_seconds(ns_run)
            ns_summary = json.loads((ns_run / "train_summary.json").read_text(encoding="utf-8"))
            record("lda_noisy_student", variant([sweep.score("noisy_student", manifests["all"], *model, "--adapters",
                                                             str(ns_run / "last"), baseline=base)],
                                                args.passes, total, fraction, steps=ns_summary["steps"]))
    results["seconds"] = time.perf_counter() - started
    if args.ship is not None:
        results["shipped"] = {"variant": args.ship_variant, "to": str(args.ship),
                              "from": str(ship(results, out, args.ship_variant, args.ship))}
    write(results, out)
    print(markdown(results))
    return 0


def ship(results: dict, out: Path, name: str, target: Path) -> Path:
    """Copy variant ``name``'s adapters (one folder per language) to ``target`` with a README; returns the source."""
    source = {"lda": out / "lda" / "last", "lda_merge": out / "lda" / "merged", "lda_noisy_student": out / "noisy_student" / "last"}[name]
    dirs = checkpoint_adapter_dirs(source)
    missing = [lang for lang in results["languages"] if lang not in dirs]
    if missing:
        raise SystemExit(f"--ship: {source} has no adapters for {missing} (has {sorted(dirs)})")
    target.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        for lang in results["languages"]:
            shutil.copytree(dirs[lang], built / lang)
        a, main = results["adapters"], results["main_pass"]
        text = [f"# Language adapters for `{results['model']}` ({LABELS[name]})", "",
                f"One bottleneck adapter set per language ({', '.join(results['languages'])}), width {a['dim']} at "
                f"{', '.join('@' + x for x in a['points'])}: {a['per_language_parameters']:,} parameters per language "
                f"({100 * a['fraction']:.3f}% of the {a['base_parameters']:,}-parameter model). Use them with the model they "
                "were trained on:", "",
                "    mmadapters asr transcribe --adapters speech/assets/tiny_asr_lda --lang pl x.wav",
                "    mmadapters eval asr --dataset DIR --split test --adapters speech/assets/tiny_asr_lda", "",
                f"Made by `{results['command']}` (the `{name}` variant; test WER on the {main} pass below).", "",
                markdown(results)]
        atomic_write_bytes(built / "README.md", "\n".join(text).encode())
        replace_directory(built, target)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    print(f"shipped {source} -> {target}", flush=True)
    return source


def write(results: dict, out: Path) -> None:
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=1, default=str) + "\n").encode())
    atomic_write_bytes(out / "results.md", markdown(results).encode())


if __name__ == "__main__":
    sys.exit(main())
