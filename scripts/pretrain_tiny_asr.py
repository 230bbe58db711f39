"""Pretrain the shipped tiny multilingual ASR model (cascaded transducer) on the head languages of generated speech.

    python -m mmadapters.speech.synth --utterances 1500 --seed 0 --out data/speech
    python scripts/pretrain_tiny_asr.py --data data/speech --output speech/assets/tiny_asr --max-minutes 60 --threads 2
    # issue 20's foundation: every language, imbalanced, the ~3 M "small" preset, about two hours
    python -m mmadapters.speech.synth --foundation --utterances 2000 --eval-utterances 100 --seed 0 --out data/speech_foundation
    python scripts/pretrain_tiny_asr.py --data data/speech_foundation --preset small --output runs/asr_foundation --max-minutes 120
    python scripts/pretrain_tiny_asr.py ... --resume        # after a crash: the same command plus --resume

Steps: read ``DIR/{train,dev,test}.jsonl`` (written by the generator); pick the languages (``--languages``; else
every language of ``--foundation`` data, whose tail is 10-15% of the head's; else the head languages of
``DIR/synth_config.json``); take the generator's character tokenizer ``DIR/tokenizer`` (every language's
characters) or build one over the training text of *all* languages in the data (the tail languages' adapters
later need their characters, as a multilingual SentencePiece model would cover them); fit the global CMVN on
the training audio; train every
parameter on the training engine (:func:`mmadapters.training.trainer.train` with
:class:`mmadapters.speech.train.TransducerTask`: transducer loss on both passes, SpecAugment, AdamW, warmup +
cosine, dev WER per language every ``--eval-every`` steps, a resumable ``train_state.pt`` every
``--checkpoint-every`` steps in ``--run-dir``); score dev and test WER per language on both passes; save the
final model with :func:`mmadapters.speech.model.save_asr` (fp16 weights) plus ``README.md`` (commands,
settings, WER) and ``training.json`` (the full record).

``--batch-seconds`` sets the batch size in utterances: the padded seconds divided by the mean duration of the
training utterances. ``--init DIR`` starts a new stage from a model this script saved (its tokenizer and CMVN
kept, a fresh optimizer); ``--resume`` continues an interrupted run from its ``--run-dir`` exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from mmadapters.io import atomic_write_bytes
from mmadapters.speech.model import CascadedTransducer, TransducerConfig, load_asr, parameter_counts, save_asr
from mmadapters.speech.readers import Utterance, read_manifest
from mmadapters.speech.tokenizer import CharTokenizer, load_tokenizer
from mmadapters.speech.train import AudioSource, TransducerTask, evaluate, first_per_language
from mmadapters.training.trainer import TrainerConfig, seed_everything, train

# Model sizes (TransducerConfig fields). "tiny": ~1.1 M parameters (~2.2 MB fp16), trains on 2 CPU cores;
# "small": the TransducerConfig defaults, ~3 M parameters (~6 MB fp16).
PRESETS: dict[str, dict] = {
    "tiny": dict(subsampling_channels=32, d_model=96, first_layers=4, first_heads=4, first_ffn_dim=192, first_kernel_size=15,
                 second_d_model=96, second_layers=2, second_heads=4, second_ffn_dim=192, second_kernel_size=15,
                 pred_embed_dim=64, pred_dim=128, joint_dim=128, dropout=0.1),
    "small": {},
}
MAX_MB = 15.0


def language_roles(data: Path) -> dict[str, str]:
    """language -> "head"/"tail" from ``data/synth_config.json`` (empty when the file is absent)."""
    path = data / "synth_config.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return {lang: info["role"] for lang, info in meta["languages"].items()}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: expected field 'languages' mapping codes to objects with a 'role' ({err})") from None


def is_foundation_data(data: Path) -> bool:
    """True for ``synth --foundation`` data (its synth_config.json records a tail_fraction): every language trains."""
    path = data / "synth_config.json"
    try:
        return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("tail_fraction") is not None
    except (json.JSONDecodeError, AttributeError) as err:
        raise SystemExit(f"{path}: not a JSON object ({err})") from None


def data_tokenizer(data: Path, texts) -> tuple[CharTokenizer, str]:
    """The generator's tokenizer (``data/tokenizer``, every language's characters) when it wrote one, else a
    character tokenizer over ``texts``; and where it came from."""
    folder = data / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder), str(folder)
    return CharTokenizer.from_texts(texts), "the training text of every language"


def read_split(data: Path, split: str, required: bool = True) -> list[Utterance]:
    path = data / f"{split}.jsonl"
    if not path.is_file():
        if required:
            raise SystemExit(f"{path}: manifest not found (generate data with `python -m mmadapters.speech.synth --out {data}`)")
        return []
    return read_manifest(path)


# TransducerConfig fields a later stage (--init) may change: they shape training, not the weights.
RESTAGE_FIELDS = ("freq_masks", "freq_mask_param", "time_masks", "time_mask_param", "time_mask_p", "freq_warp", "dropout",
                  "loss_weight_first", "loss_weight_second")


def parse_overrides(overrides: list[str]) -> dict:
    """``--set FIELD=VALUE`` items (JSON values) as a dict."""
    settings = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE (a TransducerConfig field)")
        settings[key] = json.loads(value)
    return settings


def model_config(preset: str, vocab_size: int, overrides: list[str]) -> TransducerConfig:
    settings = {**PRESETS[preset], **parse_overrides(overrides), "vocab_size": vocab_size}
    return TransducerConfig.from_dict(settings, "pretrain_tiny_asr --preset/--set")


def restage_config(config: TransducerConfig, overrides: list[str]) -> TransducerConfig:
    """``config`` with ``--set`` overrides applied for a stage started with ``--init``; only
    :data:`RESTAGE_FIELDS` may change (the model's weights must keep their shapes)."""
    changes = parse_overrides(overrides)
    for key in changes:
        if key not in RESTAGE_FIELDS:
            raise SystemExit(f"--set {key}: with --init only {', '.join(RESTAGE_FIELDS)} may change (the model's "
                             f"architecture comes from the --init model)")
    return TransducerConfig.from_dict({**config.to_dict(), **changes}, "pretrain_tiny_asr --init/--set")


def preset_of(config: TransducerConfig) -> str:
    """The name of the preset whose architecture ``config`` has (training-time fields aside), else "custom"."""
    shape = {k: v for k, v in config.to_dict().items() if k not in RESTAGE_FIELDS}
    for name in PRESETS:
        ref = model_config(name, config.vocab_size, []).to_dict()
        if shape == {k: v for k, v in ref.items() if k not in RESTAGE_FIELDS}:
            return name
    return "custom"


def fit_cmvn(model: CascadedTransducer, utts: list[Utterance], n: int) -> int:
    source = AudioSource(utts[:n])
    waves = (w for i in range(len(source.utterances)) if (w := source.load(i)) is not None)
    model.frontend.fit_cmvn(waves)
    return len(source.utterances) - len(source.bad)


def fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:.1f}"


def wer_table(scores: dict[str, dict]) -> str:
    """Markdown: language | dev and test WER, then CER, first/second pass (%); the plain average last."""
    langs = sorted(next(iter(scores.values())).per_language)
    keys = ("dev_first", "dev_second", "test_first", "test_second")
    heads = [f"{split} {metric} {p} pass" for metric in ("WER", "CER") for split in ("dev", "test") for p in ("1st", "2nd")]
    lines = ["| language | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for lang in langs:
        row = [scores[k].per_language.get(lang, {}).get(metric, math.nan) for metric in ("wer", "cer") for k in keys]
        lines.append(f"| {lang} | " + " | ".join(fmt(v) for v in row) + " |")
    avg = [math.fsum(r[metric] for r in scores[k].per_language.values()) / max(1, len(scores[k].per_language))
           for metric in ("wer", "cer") for k in keys]
    lines.append("| **average** | " + " | ".join(fmt(v) for v in avg) + " |")
    return "\n".join(lines)


def synth_command(data: Path) -> str | None:
    """The generator command that recreates ``data`` (from its synth_config.json), if known."""
    path = data / "synth_config.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    langs = list(meta.get("languages", {}))
    counts = meta.get("counts_per_language", {})
    tails = [lang for lang, info in meta["languages"].items() if info.get("role") == "tail"]
    head, tail = counts.get("head", {}), counts.get("tail", {})
    parts = ["python -m mmadapters.speech.synth", f"--languages {','.join(langs)}", f"--tail-languages {','.join(tails)}"]
    if head.get("train") is not None:
        parts.append(f"--utterances {head['train']}")
    if tail.get("train") is not None:
        parts.append(f"--tail-utterances {tail['train']}")
    if head.get("dev") is not None:
        parts.append(f"--eval-utterances {head['dev']}")
    if tail.get("unlabeled") is not None:
        parts.append(f"--unlabeled {tail['unlabeled']}")
    parts += [f"--seed {meta.get('seed', 0)}", f"--out {data}"]
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="generated data dir (python -m mmadapters.speech.synth --out DIR)")
    p.add_argument("--output", type=Path, default=Path("speech/assets/tiny_asr"), help="model directory to write")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="the engine's run folder: history, checkpoints, train_state.pt (default: runs/pretrain_asr/<output name>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --run-dir (same other flags)")
    p.add_argument("--languages", default=None, help="comma-separated training languages (default: the head languages of the data)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TransducerConfig field (JSON value), e.g. --set first_layers=6; with --init only the "
                        "training-time fields (SpecAugment, dropout, loss weights), e.g. --set time_mask_p=0.05")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps (upper bound with --max-minutes)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-time budget for training; the learning rate then decays over the budget")
    p.add_argument("--batch-seconds", type=float, default=60.0,
                   help="padded audio seconds per batch: sets the batch size to this / the mean utterance duration")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=300, help="warmup steps")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=500, help="dev evaluation every N steps (0: only at the end)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="write the resumable train_state.pt every N steps")
    p.add_argument("--dev-per-language", type=int, default=30, help="dev utterances per language scored during training")
    p.add_argument("--cmvn-utterances", type=int, default=400)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast the forward (the transducer loss stays float32); ~1.5x faster on a CPU with "
                        "AVX512-BF16 or on a GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", type=Path, default=None,
                   help="continue training a model saved by this script (its tokenizer and CMVN are kept)")
    p.add_argument("--no-fp16", action="store_true", help="store float32 weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed, 0)  # the initial weights
    roles = language_roles(args.data)
    train_all, dev_all, test_all = read_split(args.data, "train"), read_split(args.data, "dev"), read_split(args.data, "test")
    present = sorted({u.lang for u in train_all})
    foundation = is_foundation_data(args.data)
    if args.languages:
        languages = args.languages.split(",")
    elif foundation:  # the imbalanced foundation: the tail languages' few utterances train too
        languages = present
    else:
        languages = [lang for lang in present if roles.get(lang, "head") == "head"]
    unknown = [lang for lang in languages if lang not in present]
    if unknown or not languages:
        raise SystemExit(f"--languages: {unknown or 'none'} not in {args.data / 'train.jsonl'} (has {present})")
    train_utts = [u for u in train_all if u.lang in languages]
    dev_utts = [u for u in dev_all if u.lang in languages]
    test_utts = [u for u in test_all if u.lang in languages]

    if args.init is not None:  # a second stage: same model, tokenizer and CMVN, more steps
        bundle = load_asr(args.init)
        tokenizer, config = bundle.tokenizer, bundle.config
        tokenizer_source = str(args.init)
        model = bundle.model.float()
        if args.overrides:  # training-time fields only (SpecAugment, dropout, loss weights): the weights must still fit
            config = restage_config(config, args.overrides)
            state = model.state_dict()
            model = CascadedTransducer(config)
            model.load_state_dict(state)
        model = model.to(args.device).train()
        previous = json.loads((args.init / "training.json").read_text(encoding="utf-8")) if (args.init / "training.json").is_file() else {}
    else:
        tokenizer, tokenizer_source = data_tokenizer(args.data, (u.text for u in train_all))
        config = model_config(args.preset, tokenizer.vocab_size, args.overrides)
        model = CascadedTransducer(config).to(args.device)
        previous = {}
    for prm in model.parameters():
        prm.requires_grad_(True)
    counts = parameter_counts(model)
    preset = args.preset if args.init is None else preset_of(config)
    origin = preset if args.init is None else f"{preset}, from {args.init}"
    print(f"model: {counts['total']:,} parameters ({origin}); tokenizer: {tokenizer.vocab_size} ids over "
          f"{len(present)} languages; training on {len(train_utts)} utterances of {','.join(languages)}", flush=True)
    n_cmvn = previous.get("cmvn_utterances", 0) if args.init is not None else fit_cmvn(model, train_utts, args.cmvn_utterances)

    mean_seconds = sum(u.duration or 0.0 for u in train_utts) / len(train_utts)
    batch_size = min(len(train_utts), max(1, round(args.batch_seconds / mean_seconds))) if mean_seconds > 0 else 8
    trainer = TrainerConfig(steps=args.steps, batch_size=batch_size, lr=args.lr, weight_decay=args.weight_decay,
                            warmup_ratio=min(1.0, args.warmup / max(1, args.steps)), schedule=args.schedule, grad_clip=5.0,
                            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
                            log_every=10, seed=args.seed, device=args.device, precision=args.precision,
                            progress=not args.quiet)
    task = TransducerTask(model, tokenizer, train_utts, first_per_language(dev_utts, args.dev_per_language), device=args.device,
                          progress=not args.quiet, where=str(args.data / "train.jsonl"))
    run_dir = args.run_dir or Path("runs/pretrain_asr") / args.output.name
    # what must match for --resume: everything that shapes the model and its data (train() compares it)
    recipe = {"data": str(args.data.resolve()), "languages": languages, "preset": args.preset, "overrides": args.overrides,
              "init": None if args.init is None else str(args.init.resolve()), "dev_per_language": args.dev_per_language,
              "cmvn_utterances": args.cmvn_utterances}
    try:
        summary = train(task, trainer, run_dir, resume=args.resume, run_config={"recipe": recipe})
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"pretrain_tiny_asr: {err}") from None

    scores = {}
    eval_start = time.perf_counter()
    for name, utts in (("dev", dev_utts), ("test", test_utts)):
        for pass_ in ("first", "second"):
            scores[f"{name}_{pass_}"] = evaluate(model, tokenizer, utts, pass_=pass_, device=args.device,
                                                 progress=False if args.quiet else None, desc=f"{name} {pass_} pass")
    eval_seconds = time.perf_counter() - eval_start

    out = args.output
    save_asr(out, model.cpu(), tokenizer, fp16=not args.no_fp16)
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name not in ("README.md", "training.json")) / 1e6
    command = "python scripts/pretrain_tiny_asr.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    minutes = sum(summary.timings[k] for k in ("train_s", "validate_s", "checkpoint_s")) / 60  # resumed sessions included
    record = {
        "command": command, "data_command": synth_command(args.data),
        "previous_stages": [*previous.get("previous_stages", []), {k: previous[k] for k in ("command", "train") if k in previous}]
        if previous else [], "languages": languages, "foundation_data": foundation, "tokenizer_source": tokenizer_source,
        "preset": preset,
        "config": config.to_dict(), "parameters": counts, "size_mb": size_mb, "cmvn_utterances": n_cmvn,
        "train": {"steps": summary.steps, "stopped_by": summary.stopped_by, "minutes": minutes, "run_dir": str(run_dir),
                  "trainer": dataclasses.asdict(trainer), "timings": summary.timings, "evals": summary.history,
                  "utterances": len(train_utts), "hours": sum(u.duration or 0.0 for u in train_utts) / 3600,
                  "skipped": task.skipped()},
        "scores": {k: v.as_dict() for k, v in scores.items()}, "final_eval_seconds": eval_seconds,
        "torch_threads": torch.get_num_threads(), "device": args.device,
    }
    atomic_write_bytes(out / "training.json", (json.dumps(record, indent=1) + "\n").encode())
    earlier = sum(int(st.get("train", {}).get("steps", 0)) for st in record["previous_stages"])
    earlier_note = f" after {earlier} steps in earlier stages (--init)" if earlier else ""
    trained_on = "every language of imbalanced foundation data (the tail at its share)" if foundation else "the head languages"
    readme = f"""# Tiny ASR model (cascaded Conformer transducer)

Made by `scripts/pretrain_tiny_asr.py`: a multilingual cascaded transducer (causal streaming first pass +
non-causal second pass, one LSTM predictor + joiner) pretrained on {trained_on} ({', '.join(languages)})
of espeak-ng speech generated by `mmadapters.speech.synth`. The character tokenizer covers every language of
the data ({', '.join(present)}), so the tail languages can be added with adapters (the LDA recipe).
Load it with `mmadapters.speech.model.load_asr()`.

## Commands

```
{synth_command(args.data) or '(data not made by mmadapters.speech.synth)'}
{chr(10).join(st.get("command", "") for st in record["previous_stages"])}
{command}
```

## Model

- {counts['total']:,} parameters ({preset} preset), weights {'fp16' if not args.no_fp16 else 'fp32'}, {size_mb:.2f} MB on disk
- tokenizer: {tokenizer.vocab_size} ids (blank, unk, {tokenizer.vocab_size - 2} characters)
- training: {summary.steps} steps{earlier_note} in {minutes:.1f} min ({summary.stopped_by} budget), {len(train_utts)} utterances
  ({record['train']['hours']:.2f} h), batches of {batch_size} utterances (≈ {args.batch_seconds:g} padded seconds), lr {args.lr:g}
  ({args.schedule}, warmup {args.warmup}), {args.precision}, device {args.device}, {torch.get_num_threads()} threads, seed {args.seed}

## WER and CER (%, greedy decoding, normalized text)

{wer_table(scores)}

`training.json` holds the full record (settings, dev evaluations, final scores); the loss history is in the
engine's run folder (`history.jsonl`).
"""
    atomic_write_bytes(out / "README.md", readme.encode())
    print(readme)
    if size_mb > MAX_MB:
        print(f"warning: {out} is {size_mb:.1f} MB, over the {MAX_MB:g} MB budget of the shipped model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
