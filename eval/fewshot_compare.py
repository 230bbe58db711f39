"""Zero-shot vs few-shot adapters on generated tasks: the evaluator behind ``mmadapters fewshot-compare``.

For each task of :data:`mmadapters.vision.synth.TASKS` named on the command line:

1. generate its image folders (once; later runs reuse them),
2. encode every image of the train, val and test splits with the CLIP image tower **once**, build (or load the
   cached) zero-shot classifier **once**, and for CapS caption every train image with the ``captioner``
   (:mod:`mmadapters.vision.captioners`: ``truth``, ``noisy`` or ``vlt5``), encode its prompt
   ``caps_prompt(class, caption)`` and one image rendered from that prompt by the generator (the paper's generated
   support image) **once**; for SuS-X render max(shots) images per class from ``"a photo of a {class}."`` **once**,
3. for each K in ``shots`` and each seed: sample K train images per class (``sample_shots``), fit each
   method on those shots with its hyperparameters searched on the **val** split only
   (``fit_fewshot``), and score the test split (acc1, acc5, mean per-class recall).

Because features are computed once, the few-shot fits and the searches are all that the shots × seeds ×
methods loop costs. The results JSON is a file of the shared schema (:mod:`mmadapters.eval.results_schema`,
task ``fewshot_comparison``; ``mmadapters report`` tables one row per summary row) with three more fields::

    {"dataset": "<task>,<task>", "model", "pretrained", "task": "fewshot_comparison",
     "metrics": {"<method>_acc1": mean test acc1 over the summary rows of that method},
     "counts": {"total", "evaluated", "skipped": test images over the tasks, "runs"}, "skipped": [{id, reason}],
     "settings", "timings": {"model_load_s", "fits_s", "total_s"}, "library", "run_key", ...,
     "tasks": {task: {"root", "classes", "templates", "counts", "classifier_cache_hit", "timings"}},
     "runs": [{"task", "method", "shots", "seed", "metrics", "hyperparams", "timings"}],
     "summary": [{"task", "shots", "method", "n", "acc1_mean", "acc1_std", "mean_per_class_recall_mean", ...}]}

Zero-shot does not depend on shots or seed: it is one run per task (``shots`` 0, ``seed`` null), shown in
every row of the table. Standard deviations are over seeds (sample std, ``ddof=1``; 0 with one seed).
Files are written atomically; an existing output holding a *different* comparison is kept unless
``overwrite`` is set (the same rule as ``mmadapters eval``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmadapters.vision.readers import SIZE_OPTIONS, generated_root, generator_sizes

from .metrics import classification_metrics
from .results_io import default_cache_dir

TASK = "fewshot_comparison"

METHODS: tuple[str, ...] = ("zeroshot", "tip", "tip-f", "caps", "susx")
# The default captioner of CapS's support captions: the shipped VL-T5, the only real captioner here (the paper
# captions with a multimodal LM); "truth" is the generator's own caption, an oracle, and "noisy" a simulation.
DEFAULT_CAPTIONER = "vlt5"
DEFAULT_TASKS: tuple[str, ...] = ("shapes-sketch", "colours-noisy", "combos-heldout")
DEFAULT_SHOTS: tuple[int, ...] = (1, 4, 16)
DEFAULT_OUTPUT = "fewshot_compare.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass
class CompareConfig:
    """Everything a comparison depends on; field names follow the command-line flags."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    shots: list[int] = field(default_factory=lambda: list(DEFAULT_SHOTS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    model: str | None = None  # None: the shipped tiny CLIP
    pretrained: str | None = None
    device: str = "cpu"
    batch_size: int = 64
    num_workers: int = 0
    output: str | None = DEFAULT_OUTPUT
    markdown: str | None = None
    cache_dir: str | None = None
    data_dir: str | None = None  # where tasks are generated (default: <cache dir>/datasets, shared with zeroshot)
    train_per_class: int | None = None
    val_per_class: int | None = None
    test_per_class: int | None = None
    image_size: int | None = None
    data_seed: int | None = None  # generated tasks drawn afresh from this seed (None: the canonical seed 0)
    views: int = 10  # augmented passes over the train split: cache keys = their mean, Tip-F trains on them
    captioner: str = DEFAULT_CAPTIONER  # who captions CapS's support images (vision.captioners.CAPTIONERS)
    generated: int = 1  # CapS: images rendered from each support prompt, added to the real shots (0: none)
    overwrite: bool = False
    progress: bool = True


@dataclass
class TaskData:
    """One task, encoded: features of every split, caption features of the train split, the classifier."""

    name: str
    root: Path
    classnames: list[str]
    templates: list[str]
    weights: torch.Tensor  # (D, C) zero-shot classifier
    splits: dict[str, Any]  # split -> vision.zeroshot.ImageFeatures (features (N, D) on CPU, labels (N,))
    caption_feats: torch.Tensor | None  # (N_train, D): caps_prompt(class, caption) of each train image, or None
    views: torch.Tensor | None  # (V, N_train, D): augmented views of each train image, or None
    info: dict[str, Any]  # JSON-ready: root, counts, timings, classifier cache hit
    # (G, N_train, D): G images rendered from each train image's CapS prompt (CapS's generated support), or None
    generated_feats: torch.Tensor | None = None
    # SuS-X support: (C·G, D) images rendered from "a photo of a {class}.", (C·G,) labels, (C·G, D) prompt features
    susx: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _sizes(config: CompareConfig) -> dict[str, int | None]:
    """The generate_task sizes given on the command line (None: the task's own)."""
    return {k: getattr(config, k) for k in SIZE_OPTIONS}


def task_root(config: CompareConfig, cache_dir: Path, task: str) -> Path:
    """Where ``task`` is generated: ``vision.readers.generated_root`` under ``--data-dir`` (default
    ``<cache dir>/datasets``, the folder ``mmadapters zeroshot`` uses for the canonical sizes and seed)."""
    base = Path(config.data_dir) if config.data_dir else cache_dir / "datasets"
    return generated_root(base, task, config.data_seed, _sizes(config))


def validate(config: CompareConfig) -> None:
    """Reject unknown tasks/methods and impossible sizes before anything heavy runs (errors name the flag)."""
    from mmadapters.vision.synth import TASKS

    if not config.tasks:
        raise ValueError("--task: give at least one task")
    for task in config.tasks:
        if task not in TASKS:
            raise ValueError(f"--task {task!r}: expected a generated task, one of {', '.join(sorted(TASKS))}")
    if not config.methods:
        raise ValueError("--methods: give at least one method")
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"--methods {method!r}: expected a comma-separated subset of {','.join(METHODS)}")
    if not config.seeds:
        raise ValueError("--seeds: give at least one seed")
    few = [m for m in config.methods if m != "zeroshot"]
    if few and not config.shots:
        raise ValueError(f"--shots: methods {','.join(few)} need at least one shot count")
    sizes = generator_sizes(_sizes(config))
    for k, v in sizes.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"--{k.replace('_', '-')} {v!r}: expected an integer >= 1")
    for k in config.shots:
        if k < 1 or k > sizes["train_per_class"]:
            raise ValueError(f"--shots {k}: expected 1 <= K <= {sizes['train_per_class']} (train images per class; "
                             "raise --train-per-class for more)")
    from mmadapters.vision.captioners import CAPTIONERS

    if isinstance(config.generated, bool) or not isinstance(config.generated, int) or config.generated < 0:
        raise ValueError(f"--generated {config.generated!r}: expected an integer >= 0 (images rendered per CapS prompt)")
    if config.captioner not in CAPTIONERS:
        raise ValueError(f"--captioner {config.captioner!r}: expected one of {', '.join(CAPTIONERS)}")
    if config.data_seed is not None and (isinstance(config.data_seed, bool) or config.data_seed < 0):
        raise ValueError(f"--data-seed {config.data_seed!r}: expected an integer >= 0")
    if isinstance(config.views, bool) or not isinstance(config.views, int) or config.views < 1:
        raise ValueError(f"--views {config.views!r}: expected an integer >= 1 (augmented passes over the support images)")
    if config.batch_size < 1 or config.num_workers < 0:
        raise ValueError("--batch-size must be >= 1 and --num-workers >= 0")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: CUDA is not available on this machine")


def prepare_task(task: str, clip, config: CompareConfig, cache_dir: Path) -> TaskData:
    """Generate ``task`` if needed and encode it: each split's images once, the train captions once, the classifier."""
    from mmadapters.vision.caps_adapter import support_prompts
    from mmadapters.vision.captioners import SynthImageGenerator, encode_images, support_captions, susx_prompt
    from mmadapters.vision.readers import (
        image_loader,
        open_split,
        prepare_dataset_root,
        resolve_classnames,
        resolve_templates,
    )
    from mmadapters.vision.zeroshot import cached_classifier, encode_texts, extract_image_features

    timings: dict[str, Any] = {}
    t0 = time.perf_counter()
    _, root = prepare_dataset_root(task, None, cache_dir, progress=config.progress, data_seed=config.data_seed,
                                   sizes=_sizes(config), data_dir=config.data_dir)
    timings["generate_s"] = round(time.perf_counter() - t0, 4)

    classnames, _ = resolve_classnames(None, root)
    templates, _ = resolve_templates(None, root)
    classifier = cached_classifier(clip.model, clip.tokenizer, classnames, templates, model_name=clip.info.model,
                                   weights_identity=clip.info.identity(), cache_dir=cache_dir / "classifiers",
                                   device=config.device, batch_size=max(config.batch_size, 256), progress=config.progress)
    timings["classifier_s"] = round(classifier.seconds, 4)

    splits, counts, features_s, skipped = {}, {}, {}, []
    for split in SPLITS:
        t0 = time.perf_counter()
        dataset = open_split("imagefolder", root, split, clip.preprocess, classnames)
        loader = image_loader(dataset, batch_size=config.batch_size, num_workers=config.num_workers, device=config.device)
        feats = extract_image_features(clip.model, loader, device=config.device, progress=config.progress,
                                       desc=f"{task} {split} images")
        if not feats.paths:
            raise ValueError(f"{root / split}: none of its {len(dataset)} images could be read")
        splits[split] = feats
        counts[split] = {"images": len(dataset), "evaluated": len(feats.paths), "skipped": len(feats.skipped)}
        skipped += [{"id": item.path, "split": split, "reason": item.reason} for item in feats.skipped]
        features_s[split] = round(time.perf_counter() - t0, 4)
    timings["features_s"] = features_s

    views = None
    if any(m not in ("zeroshot", "susx") for m in config.methods):  # SuS-X uses no real shots
        from mmadapters.vision.fewshot import augmented_transform, encode_views

        t0 = time.perf_counter()
        augmented = open_split("imagefolder", root, "train", augmented_transform(clip.preprocess), classnames)
        views, _, view_paths = encode_views(clip.model, augmented, config.views, seed=0, batch_size=config.batch_size,
                                            device=config.device, progress=config.progress)
        if view_paths != splits["train"].paths:
            raise ValueError(f"{root / 'train'}: an image could not be read; augmented views need every train image")
        timings["views_s"] = round(time.perf_counter() - t0, 4)

    caption_feats = generated_feats = susx = None
    generator = SynthImageGenerator(generator_sizes(_sizes(config))["image_size"])
    captions_info: dict[str, Any] = {}
    if "caps" in config.methods:
        t0 = time.perf_counter()
        paths = splits["train"].paths
        captions = support_captions(config.captioner, root, paths, seed=config.data_seed or 0, device=config.device,
                                    batch_size=config.batch_size)
        texts = support_prompts(paths, splits["train"].labels, classnames, captions,
                                source=f"--captioner {config.captioner} ({root / 'train'})")
        caption_feats = encode_texts(clip.model, clip.tokenizer, texts, device=config.device,
                                     batch_size=max(config.batch_size, 256), progress=config.progress,
                                     desc=f"{task} captions")
        timings["captions_s"] = round(time.perf_counter() - t0, 4)
        t0 = time.perf_counter()
        if config.generated:
            images = generator.generate([t for _ in range(config.generated) for t in texts], seed=config.data_seed or 0)
            generated_feats = encode_images(clip, images, device=config.device, batch_size=config.batch_size)
            generated_feats = generated_feats.view(config.generated, len(texts), -1)
        timings["caps_generated_s"] = round(time.perf_counter() - t0, 4)
        captions_info = {"captioner": config.captioner, "examples": texts[:: max(1, len(texts) // 5)][:5]}
    if "susx" in config.methods:
        t0 = time.perf_counter()
        per_class = max(config.shots)
        prompts = [susx_prompt(c) for c in classnames for _ in range(per_class)]
        labels = torch.arange(len(classnames)).repeat_interleave(per_class)
        prompt_feats = encode_texts(clip.model, clip.tokenizer, prompts, device=config.device,
                                    batch_size=max(config.batch_size, 256), progress=False, desc=f"{task} susx prompts")
        images = encode_images(clip, generator.generate(prompts, seed=config.data_seed or 0), device=config.device,
                               batch_size=config.batch_size)
        susx = (images, labels, prompt_feats.float().cpu())
        timings["susx_generated_s"] = round(time.perf_counter() - t0, 4)

    t0 = time.perf_counter()
    gate = task_gate(root, splits, classifier.weights, shipped=config.model is None)
    timings["gate_s"] = round(time.perf_counter() - t0, 4)
    info = {"root": str(root), "classes": len(classnames), "templates": len(templates), "counts": counts,
            "skipped": skipped, "classifier_cache_hit": classifier.cache_hit, "gate": gate, "timings": timings,
            **({"captions": captions_info} if captions_info else {})}
    return TaskData(task, root, classnames, templates, classifier.weights, splits, caption_feats, views, info,
                    generated_feats, susx)


def task_gate(root: Path, splits: dict[str, Any], weights: torch.Tensor, *, shipped: bool) -> dict[str, Any]:
    """The task's gate (:mod:`mmadapters.vision.gate`) for this CLIP, from the features already encoded.

    For the shipped CLIP the gate is also the one ``task.json`` records: written there the first time (atomically)
    and rewritten if the recorded one differs (e.g. after the CLIP was re-shipped)."""
    from mmadapters.vision import gate as gates

    train, val, test = (splits[s] for s in SPLITS)
    gate = gates.compute_gate(train.features, train.labels, val.features, val.labels, test.features, test.labels,
                              weights.float().cpu())
    if shipped and gates.read_gate(root) != gate:
        gates.write_gate(root, gate)
    return gate


def fit_and_score(data: TaskData, method: str, shots: int, seed: int, device: str) -> dict[str, Any]:
    """One run: K shots per class from train (seeded), fit ``method`` tuned on val, score test.

    Only the val split's features and labels reach ``fit_fewshot``; test labels are used for scoring only.
    """
    from mmadapters.vision import fewshot

    t0 = time.perf_counter()
    weights = data.weights.to(device)
    test = data.splits["test"]
    hyper: dict[str, Any] = {}
    if method == "zeroshot":
        from mmadapters.vision.zeroshot import zeroshot_logits

        logits = zeroshot_logits(test.features.to(device), weights).cpu()
        fit_s = 0.0
    else:
        train, val = data.splits["train"], data.splits["val"]
        options: dict[str, Any] = {}
        if method == "susx":
            # SuS-X: no real shots; K images per class generated from the class name, scored by TIP-X (CapS's
            # formula with δ = 0: image affinity and the KL term, α β γ searched on val)
            images, labels, prompts = data.susx
            index = fewshot.sample_shots(labels, shots, seed, num_classes=len(data.classnames))
            support = fewshot.support_set(images.to(device), labels.to(device), index=index,
                                          caption_feats=prompts.to(device))
            options["deltas"] = (0.0,)
        else:
            index = fewshot.sample_shots(train.labels, shots, seed, num_classes=len(data.classnames))
            # the official cache: keys are the mean of the augmented views (Tip-F trains on the views themselves)
            support = fewshot.support_set(train.features.to(device), train.labels.to(device), index=index,
                                          views=data.views.to(device))
        if method == "caps":
            # the K real shots with their captions, and G images generated from each shot's prompt (same caption)
            caps = data.caption_feats[index].to(device)
            if data.generated_feats is None:
                support = fewshot.SupportSet(support.image_feats, support.labels, caps, support.views)
            else:
                generated = data.generated_feats[:, index].to(device).flatten(0, 1)  # (G·K·C, D), prompt order repeated
                g = data.generated_feats.shape[0]
                support = fewshot.SupportSet(torch.cat([support.image_feats, generated]), support.labels.repeat(g + 1),
                                             caps.repeat(g + 1, 1))
        clf = fewshot.fit_fewshot("caps" if method == "susx" else method, weights, support, val.features.to(device),
                                  val.labels.to(device), seed=seed, progress=False, **options)
        fit_s = time.perf_counter() - t0
        with torch.inference_mode():
            logits = clf.logits(test.features.to(device)).float().cpu()
        hyper = {**clf.hyperparams, "kind": method}
    metrics = classification_metrics(logits, test.labels)
    return {"task": data.name, "method": method, "shots": shots if method != "zeroshot" else 0,
            "seed": seed if method != "zeroshot" else None, "metrics": metrics, "hyperparams": hyper,
            "timings": {"fit_s": round(fit_s, 4), "total_s": round(time.perf_counter() - t0, 4)}}


def _mean_std(values: list[float]) -> tuple[float, float]:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan
    return statistics.fmean(clean), statistics.stdev(clean) if len(clean) > 1 else 0.0


def summarize(runs: list[dict[str, Any]], tasks: list[str], shots: list[int], methods: list[str],
              gates: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per (task, shots, method): mean and std over seeds of acc1 and mean per-class recall, and
    ``gate_passed`` (whether an adapter gain may be claimed on the task; None without a gate)."""
    rows = []
    for task in tasks:
        for k in shots:
            for method in methods:
                group = [r for r in runs if r["task"] == task and r["method"] == method
                         and (method == "zeroshot" or r["shots"] == k)]
                if not group:
                    continue
                gate = (gates or {}).get(task)
                row: dict[str, Any] = {"task": task, "shots": k, "method": method, "n": len(group),
                                       "gate_passed": None if gate is None else bool(gate["passed"])}
                for metric in ("acc1", "mean_per_class_recall"):
                    row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std([r["metrics"][metric] for r in group])
                rows.append(row)
    return rows


def _cell(row: dict[str, Any] | None, metric: str = "acc1") -> str:
    if row is None:
        return "-"
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if math.isnan(mean):
        return "nan"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if row["n"] > 1 else f"{100 * mean:.1f}"


def _grid(summary: list[dict[str, Any]], methods: list[str], metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (task, shots, one cell per method) of the comparison table."""
    from mmadapters.vision.gate import NOT_PASSED

    index = {(r["task"], r["shots"], r["method"]): r for r in summary}
    keys = list(dict.fromkeys((r["task"], r["shots"]) for r in summary))
    passed = {r["task"]: r.get("gate_passed") for r in summary}
    gate = {True: "passed", False: NOT_PASSED, None: "-"}
    body = [[task, str(k), *(_cell(index.get((task, k, m)), metric) for m in methods), gate[passed[task]]]
            for task, k in keys]
    return ["task", "shots", *methods, "gate"], body


def format_table(summary: list[dict[str, Any]], methods: list[str], metric: str = "acc1") -> str:
    """A plain-text table for the terminal: rows task × shots, columns methods, percent (mean ± std over seeds)."""
    header, body = _grid(summary, methods, metric)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    last = len(header) - 1
    lines = ["  ".join(cell.ljust(w) if i < 2 or i == last else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths, strict=True))).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_gates(results: dict[str, Any]) -> list[str]:
    """One line per task: its gate and, where it passed, each method's gain over zero-shot (points, mean over seeds);
    where it did not, the table's rows are marked "gate not passed: no adapter gain claimed"."""
    from mmadapters.vision.gate import NOT_PASSED

    index = {(r["task"], r["shots"], r["method"]): r for r in results["summary"]}
    lines = []
    for task, info in results["tasks"].items():
        g = info.get("gate")
        if not g:
            continue
        head = (f"{task}: gate linear probe {100 * g['linear_probe_acc']:.1f} − zero-shot {100 * g['zeroshot_acc']:.1f} "
                f"= {100 * g['gap']:+.1f} points")
        if not g["passed"]:
            lines.append(f"{head}: {NOT_PASSED}")
            continue
        gains = []
        for k in results["settings"]["shots"]:
            zs = index.get((task, k, "zeroshot"))
            cells = [f"{m} {100 * (r['acc1_mean'] - zs['acc1_mean']):+.1f}" for m in results["settings"]["methods"]
                     if m != "zeroshot" and zs is not None and (r := index.get((task, k, m))) is not None]
            if cells:
                gains.append(f"{k}-shot " + ", ".join(cells))
        lines.append(f"{head} (passed); gain over zero-shot: " + ("; ".join(gains) if gains else "-"))
    return lines


_SYMBOLS = {"alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "best_epoch": "epoch"}


def _hyper_cell(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    """Searched values per seed, e.g. ``α 3.36 β 5.17 (val 62) / α 1 β 2.1 (val 58)``."""
    parts = []
    for r in runs:
        h = r["hyperparams"]
        vals = " ".join(f"{_SYMBOLS.get(k, k)} {h[k]:.3g}" for k in keys if isinstance(h.get(k), int | float))
        if isinstance(h.get("val_acc1"), int | float):
            vals += f" (val {100 * h['val_acc1']:.0f})"
        parts.append(vals)
    return " / ".join(parts) if parts else "-"


HYPER_KEYS: dict[str, tuple[str, ...]] = {"tip": ("alpha", "beta"), "tip-f": ("alpha", "beta", "best_epoch"),
                                           "caps": ("alpha", "beta", "gamma", "delta"), "susx": ("alpha", "beta", "gamma")}


def format_markdown(results: dict[str, Any]) -> str:
    """Markdown: the acc1 table, the mean per-class recall table, and the searched hyperparameters."""
    s = results["settings"]
    methods = s["methods"]
    seeds = ", ".join(str(x) for x in s["seeds"])
    out = [f"Model `{results['model']}`; generated tasks (train/val/test images per class: "
           f"{s['sizes']['train_per_class']}/{s['sizes']['val_per_class']}/{s['sizes']['test_per_class']}, "
           f"{s['sizes']['image_size']} px); K shots per class sampled from train; hyperparameters searched on val "
           f"only; test top-1 accuracy in %, mean ± std over seeds {seeds}.", ""]
    for metric, title in (("acc1", "Top-1 accuracy (%)"), ("mean_per_class_recall", "Mean per-class recall (%)")):
        header, body = _grid(results["summary"], methods, metric)
        rule = "|" + "|".join(["---", "---:", *["---:"] * len(methods), "---"]) + "|"
        out += [f"**{title}**", "", "| " + " | ".join(header) + " |", rule]
        out += ["| " + " | ".join(line) + " |" for line in body] + [""]
    gate_lines = format_gates(results)
    if gate_lines:
        out += ["**Gates** (16-shot linear probe minus zero-shot on test, shipped CLIP; a gain is claimed only "
                "where the gap is at least 10 points)", "", *(f"- {line}" for line in gate_lines), ""]
    fewshot = [m for m in methods if m in HYPER_KEYS]
    if fewshot:
        out += ["**Searched hyperparameters** (per seed; val acc1 in %)", "",
                "| task | shots | " + " | ".join(fewshot) + " |", "|---|---:|" + "---|" * len(fewshot)]
        keys = list(dict.fromkeys((r["task"], r["shots"]) for r in results["runs"] if r["method"] != "zeroshot"))
        for task, k in keys:
            cells = [_hyper_cell([r for r in results["runs"] if (r["task"], r["shots"], r["method"]) == (task, k, m)],
                                 HYPER_KEYS[m]) for m in fewshot]
            out.append(f"| {task} | {k} | " + " | ".join(cells) + " |")
        out.append("")
    t = results["timings"]
    out.append(f"Wall time {t['total_s']:.1f} s (model load {t['model_load_s']:.1f} s, fits {t['fits_s']:.1f} s); "
               f"mmadapters {results['library']['version']}.")
    return "\n".join(out) + "\n"


def compare_fewshot(config: CompareConfig) -> dict[str, Any]:
    """Run the comparison, print nothing, write the results JSON (and markdown). Returns the results dictionary."""
    from tqdm import tqdm

    from mmadapters.atomic import atomic_write_bytes
    from mmadapters.vision.clip import load_clip

    from .results_io import check_overwrite
    from .results_schema import build_results, run_key, write_results

    t_start = time.perf_counter()
    validate(config)
    cache_dir = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    t0 = time.perf_counter()
    clip = load_clip(config.model, config.pretrained, device=config.device, cache_dir=str(cache_dir / "weights"),
                     seed=0, declare_points=False)
    load_s = time.perf_counter() - t0
    settings = {k: v for k, v in asdict(config).items()
                if k not in ("progress", "output", "markdown", "overwrite", "device", "num_workers", "cache_dir",
                             *SIZE_OPTIONS)}
    settings.update({"sizes": generator_sizes(_sizes(config)), "model_resolved": clip.info.model,
                     "weights": clip.info.identity(), "splits": {"support": "train", "search": "val", "score": "test"}})
    identity = {"dataset": ",".join(config.tasks), "model": clip.info.short_name, "pretrained": config.pretrained,
                "task": TASK}
    out_path = Path(config.output) if config.output else None
    if out_path is not None:
        check_overwrite(out_path, run_key(settings=settings, **identity), config.overwrite)

    fewshot_methods = [m for m in config.methods if m != "zeroshot"]
    per_task = len(fewshot_methods) * len(config.shots) * len(config.seeds) + ("zeroshot" in config.methods)
    bar = tqdm(total=per_task * len(config.tasks), desc="fits", unit="fit", disable=None if config.progress else True)
    runs: list[dict[str, Any]] = []
    tasks_info: dict[str, Any] = {}
    fits_s = 0.0
    for task in config.tasks:
        data = prepare_task(task, clip, config, cache_dir)
        tasks_info[task] = data.info
        plan = [("zeroshot", 0, 0)] if "zeroshot" in config.methods else []
        plan += [(m, k, s) for k in config.shots for s in config.seeds for m in fewshot_methods]
        for method, k, seed in plan:
            bar.set_postfix_str(f"{task} {method} {k}-shot seed {seed}" if method != "zeroshot" else f"{task} zeroshot")
            run = fit_and_score(data, method, k, seed, config.device)
            fits_s += run["timings"]["total_s"]
            runs.append(run)
            bar.update(1)
    bar.close()

    summary = summarize(runs, config.tasks, config.shots or [0], config.methods,
                        {t: info["gate"] for t, info in tasks_info.items()})
    metrics = {f"{m}_acc1": _mean_std([r["acc1_mean"] for r in summary if r["method"] == m])[0] for m in config.methods}
    test = [info["counts"]["test"] for info in tasks_info.values()]
    skipped = [s for info in tasks_info.values() for s in info["skipped"] if s["split"] == "test"]
    results = build_results(
        **identity, metrics=metrics, settings=settings, skipped=skipped,
        counts={"total": sum(c["images"] for c in test), "evaluated": sum(c["evaluated"] for c in test),
                "skipped": len(skipped), "runs": len(runs)},
        timings={"model_load_s": round(load_s, 4), "fits_s": round(fits_s, 4),
                 "total_s": round(time.perf_counter() - t_start, 4)},
        extra={"tasks": tasks_info, "runs": runs, "summary": summary})
    if out_path is not None:
        write_results(out_path, results, overwrite=True)  # checked above, before the work
        results["output"] = str(out_path)
    if config.markdown:
        md_path = Path(config.markdown)
        if md_path.parent != Path(""):
            md_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(md_path, format_markdown(results).encode())
        results["markdown"] = str(md_path)
    return results
