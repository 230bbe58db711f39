"""Zero-shot classification speed: ``mmadapters zeroshot`` vs ``clip_benchmark eval`` on the same inputs.

Both command lines run as subprocesses on the same machine, one after the other, with the same model file,
the same images (written once in CLIP_benchmark's webdataset layout, which both tools read), the same class
names, the same 80 ImageNet templates (taken from clip_benchmark's own template file), the same batch size,
DataLoader workers and thread count (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``), both in float32
(clip_benchmark's ``--no_amp``; on CPU its default autocast would run the towers in bfloat16).

Measured, per model (a randomly initialized open_clip ViT-B-32 saved to a safetensors file and passed to
both tools as ``--pretrained FILE``; the tiny CLIP as ``--model local-dir:DIR``):

- end-to-end wall time of each process (``time.perf_counter`` around ``subprocess.run``: interpreter start,
  imports, model load, classifier, images, metrics, output), medians over ``--repeats``, as a ratio;
- the zero-shot classifier build: ours from our results JSON (``timings.classifier_s``, a cache miss);
  clip_benchmark's by running its CLI's ``main()`` in a child process with ``zero_shot_classifier`` and
  ``run_classification`` wrapped by timers (the wrapper also keeps the classifier and the logits);
- identical predictions: our ``--predictions`` JSON lines against the argmax of clip_benchmark's logits from
  that instrumented run, matched by webdataset key (top-1 and ordered top-5 agreement, and the max |difference|
  between the two classifiers);
- a second run of ours that loads the cached classifier.

    .venv/bin/python bench/zeroshot.py --quick        # smoke run (tiny sizes, 8 templates), about a minute
    .venv/bin/python bench/zeroshot.py                # 2,000 images, 100 classes, 80 templates, both models
    .venv/bin/python bench/zeroshot.py --models tiny --repeats 3 --append-results docs/results.md

Writes ``--out``.json and ``--out``.md (default bench/out/zeroshot) and prints the table;
``--append-results FILE`` appends it with the exact command and the machine. Scratch files (images, shards,
the 600 MB random ViT-B-32 file, logs) go to ``--work-dir`` (default out/bench_zeroshot, gitignored).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TASK = "combos-100"
WDS_NAME = "combos-100"
INSTRUMENTED = "_clip_benchmark_instrumented"  # hidden mode: run clip_benchmark's CLI with timers
# The shape of the tiny CLIP that scripts/pretrain_tiny_clip.py trains; used (randomly initialized) when the
# shipped weights are not there yet. Speed depends on the shape, not on the values of the weights.
TINY_FALLBACK_CFG = {
    "embed_dim": 96,
    "vision_cfg": {"image_size": 64, "layers": 3, "width": 96, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}


# ----------------------------------------------------------------------------------------------- inputs


def imagenet_templates() -> list[str]:
    """The 80 ImageNet prompt templates (with ``{c}``) that clip_benchmark ships and uses for imagenet1k."""
    import clip_benchmark.datasets as cbd

    path = Path(cbd.__file__).parent / "en_zeroshot_classification_templates.json"
    templates = json.loads(path.read_text(encoding="utf-8")).get("imagenet1k")
    if not isinstance(templates, list) or not all(isinstance(t, str) and "{c}" in t for t in templates):
        raise ValueError(f"{path}: field 'imagenet1k': expected a list of templates with '{{c}}'")
    return templates


@dataclass(frozen=True)
class WdsSample:
    """One written sample: its shard file, its webdataset key and its label."""

    shard: str
    key: str
    label: int


def _atomic_write(path: Path, data: bytes) -> None:
    from mmadapters.io import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def write_wds(root: str | os.PathLike, samples: Sequence[tuple[bytes, str, int]], classnames: Sequence[str],
              templates: Sequence[str], *, split: str = "test", shard_size: int = 1000) -> list[WdsSample]:
    """Write ``samples`` ``(encoded image bytes, extension, label)`` in CLIP_benchmark's wds layout.

    Layout (what ``clip_benchmark.datasets.builder.build_wds_dataset`` reads): ``root/<split>/nshards.txt``,
    ``root/<split>/{0..n-1}.tar`` with members ``<key>.<ext>`` + ``<key>.cls`` (the label as text),
    ``root/classnames.txt`` and ``root/zeroshot_classification_templates.txt``. Keys are ``s<index:07d>``
    in sample order. Each file is written atomically. Returns the samples in the order they were written
    (= the order clip_benchmark iterates them).
    """
    root = Path(root)
    if not samples:
        raise ValueError("write_wds: no samples")
    if shard_size < 1:
        raise ValueError(f"write_wds: shard_size={shard_size} must be >= 1")
    for i, (_, ext, label) in enumerate(samples):
        if ext not in ("png", "jpg", "jpeg", "webp"):
            raise ValueError(f"write_wds: sample {i} field 'ext': expected png, jpg, jpeg or webp, got {ext!r}")
        if not 0 <= label < len(classnames):
            raise ValueError(f"write_wds: sample {i} field 'label': expected a class index in [0, {len(classnames)}), "
                             f"got {label}")
    split_dir = root / split
    if split_dir.exists():
        for old in split_dir.glob("*.tar"):
            old.unlink()
    written: list[WdsSample] = []
    n_shards = (len(samples) + shard_size - 1) // shard_size
    for s in range(n_shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * shard_size, min(len(samples), (s + 1) * shard_size)):
                data, ext, label = samples[i]
                key = f"s{i:07d}"
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
                written.append(WdsSample(f"{s}.tar", key, label))
        _atomic_write(split_dir / f"{s}.tar", buf.getvalue())
    _atomic_write(split_dir / "nshards.txt", f"{n_shards}\n".encode())
    _atomic_write(root / "classnames.txt", ("\n".join(classnames) + "\n").encode())
    _atomic_write(root / "zeroshot_classification_templates.txt", ("\n".join(templates) + "\n").encode())
    return written


def generated_samples(work: Path, n_classes: int, per_class: int) -> tuple[list[tuple[bytes, str, int]], list[str]]:
    """``per_class`` test images of each of the first ``n_classes`` classes of the generated task combos-100.

    Returns ``([(png bytes, "png", label)], class names in label order)``; labels follow the sorted class folders.
    """
    from mmadapters.vision.synth import generate_task

    root = generate_task(TASK, work / "synth", train_per_class=0, val_per_class=0, test_per_class=per_class,
                         progress=False)
    names = [line.strip() for line in (root / "classnames.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    folders = sorted(d.name for d in (root / "test").iterdir() if d.is_dir())
    if len(folders) != len(names) or n_classes > len(folders):
        raise ValueError(f"{root}: {len(folders)} class folders, {len(names)} class names; asked for {n_classes} classes")
    samples = []
    for label, folder in enumerate(folders[:n_classes]):
        files = sorted((root / "test" / folder).glob("*.png"))[:per_class]
        samples.extend((f.read_bytes(), "png", label) for f in files)
    return samples, names[:n_classes]


# ----------------------------------------------------------------------------------------------- models


@dataclass
class ModelSpec:
    """A model as both command lines name it."""

    label: str
    ours: list[str]  # --model/--pretrained arguments of mmadapters zeroshot
    cb: list[str]  # --model/--pretrained arguments of clip_benchmark eval
    note: str
    extra: dict[str, Any] = field(default_factory=dict)


def random_vit_b32(path: Path, seed: int = 0) -> Path:
    """A randomly initialized open_clip ViT-B-32 (``torch.manual_seed(seed)``) saved as safetensors (reused if there)."""
    if path.is_file():
        return path
    import open_clip
    import torch
    from safetensors.torch import save

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(path, save(state))
    return path


def tiny_clip_dir(work: Path, seed: int = 0) -> tuple[Path, str]:
    """(local-dir of the shipped tiny CLIP, or a random one of the same shape when it is not there yet; a note)."""
    from mmadapters.vision.clip import CONFIG_NAME, TINY_CLIP_DIR, write_clip_dir

    if (TINY_CLIP_DIR / CONFIG_NAME).is_file() and any(TINY_CLIP_DIR.glob("*.safetensors")):
        return TINY_CLIP_DIR, "shipped tiny CLIP (vision/assets/tiny_clip)"
    directory = work / "models" / "tiny_clip_random"
    if not (directory / CONFIG_NAME).is_file():
        write_clip_dir(directory, TINY_FALLBACK_CFG, seed=seed)
    return directory, "tiny CLIP shape, random init (the shipped weights were not there)"


def model_specs(names: Sequence[str], work: Path, seed: int) -> list[ModelSpec]:
    specs = []
    for name in names:
        if name == "vit-b-32":
            path = random_vit_b32(work / "models" / f"vit-b-32-random-seed{seed}.safetensors", seed)
            specs.append(ModelSpec("ViT-B-32 (random init)", ["--model", "ViT-B-32", "--pretrained", str(path)],
                                   ["--model", "ViT-B-32", "--pretrained", str(path)],
                                   f"open_clip ViT-B-32, torch.manual_seed({seed}), one safetensors file for both",
                                   {"open_clip": ("ViT-B-32", str(path))}))
        elif name == "tiny":
            directory, note = tiny_clip_dir(work, seed)
            specs.append(ModelSpec("tiny CLIP", ["--model", f"local-dir:{directory}"],
                                   ["--model", f"local-dir:{directory}", "--pretrained", ""], note,
                                   {"open_clip": (f"local-dir:{directory}", None)}))
        else:
            raise ValueError(f"--models: unknown model {name!r}; expected vit-b-32 and/or tiny")
    return specs


# ----------------------------------------------------------------------------------------------- running


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.is_file() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"command {name!r} not found next to {sys.executable} or on PATH")
    return found


def child_env(threads: int, device: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # clip_benchmark picks CUDA by itself whenever it sees a GPU
    return env


def run_timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``cmd``, stdout+stderr to ``log``; its wall time in seconds. Raises with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        f.write((shlex.join(cmd) + "\n\n").encode())
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"command failed with exit status {proc.returncode} (log {log}):\n{shlex.join(cmd)}\n...{tail}")
    return seconds


def ours_cmd(spec: ModelSpec, wds: Path, run_dir: Path, cache: Path, a: argparse.Namespace) -> list[str]:
    return [_bin("mmadapters"), "zeroshot", *spec.ours, "--dataset", "wds", "--dataset-root", str(wds),
            "--split", "test", "--batch-size", str(a.batch_size), "--num-workers", str(a.num_workers),
            "--templates", str(wds / "zeroshot_classification_templates.txt"),
            "--classnames", str(wds / "classnames.txt"), "--output", str(run_dir / "ours.json"),
            "--predictions", str(run_dir / "ours.jsonl"), "--device", a.device, "--cache-dir", str(cache),
            "--seed", str(a.seed), "--overwrite"]


def cb_args(spec: ModelSpec, wds: Path, run_dir: Path, a: argparse.Namespace, output_name: str) -> list[str]:
    return ["eval", "--dataset", f"wds/{WDS_NAME}", "--dataset_root", str(wds), "--split", "test",
            "--task", "zeroshot_classification", *spec.cb, "--batch_size", str(a.batch_size),
            "--num_workers", str(a.num_workers), "--no_amp", "--seed", str(a.seed),
            "--output", str(run_dir / output_name)]


def clip_benchmark_compat() -> list[str]:
    """Make clip-benchmark 1.6.2 run in this environment; returns what was changed (empty when nothing was needed).

    - It imports ``requests`` at module level in download helpers (imagenetv2, xtd10, ...) without declaring it;
      when it is not installed a stand-in module that fails on any use is registered (a local webdataset
      evaluation never calls it).
    - Its ``accuracy`` calls ``float()`` on a 1-element array, an error since NumPy 2.4; when that errors, it
      is replaced by the same top-k accuracy computed with ``Tensor.item()``.
    """
    import importlib.util
    import types

    import numpy as np

    changes = []
    if "requests" not in sys.modules and importlib.util.find_spec("requests") is None:
        standin = types.ModuleType("requests", "stand-in: requests is not installed (bench/zeroshot.py)")

        def _missing(name: str):
            if name.startswith("__"):  # introspection (hasattr(module, "__file__")) must see a plain missing attribute
                raise AttributeError(name)
            raise RuntimeError(f"requests.{name}: the requests package is not installed (bench/zeroshot.py stand-in)")

        standin.__getattr__ = _missing  # type: ignore[attr-defined]
        sys.modules["requests"] = standin
        changes.append("requests stand-in (package not installed; clip-benchmark imports it without declaring it)")
    try:
        float(np.zeros(1))
    except TypeError:
        from clip_benchmark.metrics import zeroshot_classification as zc

        def accuracy(output, target, topk=(1,)):
            """Top-k accuracies: the fraction of rows whose target is among the ``k`` largest logits (N, C)."""
            top = output.topk(max(topk), dim=1).indices  # (N, K)
            hit = top.eq(target.view(-1, 1))  # (N, K)
            return [hit[:, :k].any(dim=1).float().sum().item() / len(target) for k in topk]

        zc.accuracy = accuracy
        changes.append(f"zeroshot_classification.accuracy without float(ndarray) (an error in NumPy {np.__version__})")
    return changes


def _cb_instrumented(dump: str, argv: list[str]) -> int:
    """Child-process mode: clip_benchmark's own ``cli.main()`` with its classifier build and classification timed.

    This is what the ``clip_benchmark`` console script runs (``from clip_benchmark.cli import main;
    sys.exit(main())``) plus :func:`clip_benchmark_compat` and two timers: ``cli.run`` calls
    ``zeroshot_classification.evaluate``, which looks ``zero_shot_classifier`` and ``run_classification`` up in
    its module at call time, so wrapping the module attributes times exactly those calls. The record (seconds,
    the classifier (D, C), the logits (N, C), the targets (N,), the compatibility changes) is saved with
    ``torch.save`` (plain types and tensors only: readable with ``weights_only=True``).
    """
    changes = clip_benchmark_compat()
    import torch
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification as zc

    record: dict[str, Any] = {"compat": changes}
    build, classify = zc.zero_shot_classifier, zc.run_classification

    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed_build(*args, **kwargs):
        _sync()
        t0 = time.perf_counter()
        out = build(*args, **kwargs)
        _sync()
        record["classifier_s"] = time.perf_counter() - t0
        record["classifier"] = out.detach().float().cpu()
        return out

    def timed_classify(*args, **kwargs):
        t0 = time.perf_counter()
        logits, target = classify(*args, **kwargs)
        _sync()
        record["classification_s"] = time.perf_counter() - t0
        record["logits"], record["targets"] = logits.detach().float().cpu(), target.detach().cpu()
        return logits, target

    zc.zero_shot_classifier, zc.run_classification = timed_build, timed_classify
    sys.argv = ["clip_benchmark", *argv]
    t0 = time.perf_counter()
    cli.main()
    record["main_s"] = time.perf_counter() - t0
    if "logits" not in record:
        raise RuntimeError("clip_benchmark ran no zero-shot classification (check the arguments)")
    torch.save(record, dump)
    return 0


# ----------------------------------------------------------------------------------------------- comparing


def read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """Our ``--predictions`` JSON lines, keyed by webdataset key (the member name up to its first dot)."""
    out = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        for name in ("id", "label", "prediction", "top5"):
            if name not in record:
                raise ValueError(f"{path}: line {i}: missing field {name!r}")
        key = Path(record["id"]).name.partition(".")[0]
        out[key] = record
    return out


def compare_predictions(ours: dict[str, dict[str, Any]], order: Sequence[WdsSample], logits, targets) -> dict[str, Any]:
    """Agreement of our predictions with clip_benchmark's logits (N, C) over the samples in ``order``.

    ``logits``/``targets`` rows follow ``order`` (clip_benchmark reads the shards sequentially); the targets
    are checked against the written labels so that a misalignment cannot pass as disagreement.
    """
    import torch

    logits, targets = torch.as_tensor(logits), torch.as_tensor(targets)
    if logits.shape[0] != len(order) or targets.shape[0] != len(order):
        raise ValueError(f"clip_benchmark returned {logits.shape[0]} logits rows and {targets.shape[0]} targets for "
                         f"{len(order)} written samples")
    if targets.tolist() != [s.label for s in order]:
        raise ValueError("clip_benchmark's targets are not in the order the shards were written")
    missing = [s.key for s in order if s.key not in ours]
    if missing:
        raise ValueError(f"our predictions lack {len(missing)} samples, e.g. {missing[:3]}")
    k = min(5, logits.shape[1])
    cb_top = logits.topk(k, dim=1).indices.tolist()
    top1 = sum(ours[s.key]["prediction"] == t[0] for s, t in zip(order, cb_top, strict=True))
    topk = sum(list(ours[s.key]["top5"]) == t for s, t in zip(order, cb_top, strict=True))
    labels_ok = all(ours[s.key]["label"] == s.label for s in order)
    sorted_logits = logits.sort(dim=1, descending=True).values
    margin = (sorted_logits[:, 0] - sorted_logits[:, 1]).min().item() if logits.shape[1] > 1 else float("inf")
    n = len(order)
    return {"images": n, "top1_agree": top1, "top1_agreement": top1 / n, f"top{k}_agree": topk,
            f"top{k}_agreement": topk / n, "labels_match": labels_ok, "cb_min_top1_margin": margin}


def classifier_difference(cache: Path, cb_classifier) -> float | None:
    """max |W_ours - W_cb| between our cached classifier and clip_benchmark's (both (D, C)); None if not found."""
    from safetensors.torch import load_file

    files = sorted((cache / "classifiers").glob("*.safetensors"))
    if len(files) != 1:
        return None
    ours = load_file(str(files[0]))["classifier"].float()
    if tuple(ours.shape) != tuple(cb_classifier.shape):
        return None
    return (ours - cb_classifier.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------- one model


def cb_cmd(spec: ModelSpec, wds: Path, run_dir: Path, a: argparse.Namespace) -> list[str]:
    """clip_benchmark's CLI through :func:`_cb_instrumented` (this file's hidden mode)."""
    return [sys.executable, str(Path(__file__).resolve()), INSTRUMENTED, str(run_dir / "cb.pt"), "--",
            *cb_args(spec, wds, run_dir, a, "cb.json")]


def bench_model(spec: ModelSpec, wds: Path, order: Sequence[WdsSample], work: Path, a: argparse.Namespace) -> dict[str, Any]:
    """Cold runs of both tools (alternating who goes first), then ours with the cached classifier; compare."""
    import torch

    slug = "".join(ch if ch.isalnum() else "-" for ch in spec.label.lower()).strip("-")
    base = work / "runs" / slug
    if base.exists():
        shutil.rmtree(base)
    env = child_env(a.threads, a.device)
    ours_s, cb_s, warm_s, ours_cls, cb_cls, records = [], [], [], [], [], []
    ours_json: dict[str, Any] = {}
    warm_json: dict[str, Any] = {}
    for rep in range(a.repeats):
        run_dir = base / f"rep{rep}"
        warm_dir = run_dir / "warm"  # ours again: the classifier comes from the cache the cold run wrote
        pair = [("ours", ours_cmd(spec, wds, run_dir, run_dir / "cache", a)), ("cb", cb_cmd(spec, wds, run_dir, a))]
        steps = (pair if rep % 2 == 0 else pair[::-1]) + [("warm", ours_cmd(spec, wds, warm_dir, run_dir / "cache", a))]
        for who, cmd in steps:  # the cold runs alternate who goes first; the cached run follows our cold run
            seconds = run_timed(cmd, env, (warm_dir if who == "warm" else run_dir) / f"{who}.log")
            {"ours": ours_s, "cb": cb_s, "warm": warm_s}[who].append(seconds)
            label = {"ours": "mmadapters zeroshot", "cb": "clip_benchmark eval",
                     "warm": "mmadapters zeroshot (cached classifier)"}[who]
            print(f"  [{spec.label}] rep {rep} {label}: {seconds:.2f}s", flush=True)
        ours_json = json.loads((run_dir / "ours.json").read_text(encoding="utf-8"))
        if ours_json["classifier_cache_hit"]:  # a fresh cache dir: the classifier must be built
            raise RuntimeError(f"{run_dir / 'ours.json'}: the cold run hit a classifier cache; expected a build")
        warm_json = json.loads((warm_dir / "ours.json").read_text(encoding="utf-8"))
        if not warm_json["classifier_cache_hit"]:
            raise RuntimeError(f"{warm_dir / 'ours.json'}: the second run did not load the cached classifier")
        ours_cls.append(ours_json["timings"]["classifier_s"])
        records.append(torch.load(run_dir / "cb.pt", weights_only=True))
        cb_cls.append(records[-1]["classifier_s"])
    last = base / f"rep{a.repeats - 1}"
    warm_dir = last / "warm"
    record = records[-1]

    agreement = compare_predictions(read_predictions(last / "ours.jsonl"), order, record["logits"], record["targets"])
    warm_agreement = compare_predictions(read_predictions(warm_dir / "ours.jsonl"), order, record["logits"],
                                         record["targets"])
    cb_json = json.loads((last / "cb.json").read_text(encoding="utf-8"))
    ours_med, cb_med, warm_med = statistics.median(ours_s), statistics.median(cb_s), statistics.median(warm_s)
    ours_cls_med, cb_cls_med = statistics.median(ours_cls), statistics.median(cb_cls)
    t = ours_json["timings"]
    return {
        "model": spec.label, "model_note": spec.note, "ours_args": spec.ours, "cb_args": spec.cb,
        "wall_s": {"ours": ours_s, "clip_benchmark": cb_s, "ours_cached_classifier": warm_s, "ours_median": ours_med,
                   "clip_benchmark_median": cb_med, "ours_cached_classifier_median": warm_med},
        "speedup_end_to_end": cb_med / ours_med,
        "speedup_end_to_end_cached": cb_med / warm_med,
        "classifier_s": {"ours": ours_cls, "clip_benchmark": cb_cls, "ours_median": ours_cls_med,
                         "clip_benchmark_median": cb_cls_med, "ours_cached_load": warm_json["timings"]["classifier_s"]},
        "speedup_classifier": cb_cls_med / max(ours_cls_med, 1e-9),
        "clip_benchmark_classification_s": record["classification_s"],
        "clip_benchmark_main_s": record["main_s"],
        "clip_benchmark_compat": record["compat"],
        "ours_timings": t, "ours_cached_timings": warm_json["timings"],
        "ours_process_overhead_s": ours_s[-1] - t["total_s"],  # interpreter start + imports + arg parsing + exit
        "clip_benchmark_process_overhead_s": cb_s[-1] - record["main_s"],
        "metrics": {"ours": ours_json["metrics"], "clip_benchmark": cb_json["metrics"]},
        "agreement": agreement, "agreement_cached": warm_agreement,
        "classifier_max_abs_diff": classifier_difference(last / "cache", record["classifier"]),
        "commands": {"ours": shlex.join(ours_cmd(spec, wds, last, last / "cache", a)),
                     "clip_benchmark": shlex.join(cb_cmd(spec, wds, last, a))},
    }


def truncated_encode_text(model, tokens):
    """``model.encode_text(tokens)`` for an open_clip ``CLIP`` run on the first ``L`` token positions only.

    ``L`` is the longest prompt (SOT ... EOT) in ``tokens`` (N, context). The text tower's attention mask is
    causal and the pooled feature is the EOT position's, so the positions after a prompt's EOT cannot change
    it: the result equals the full-context one up to float rounding, at L/context of the work (less, for the
    attention). Returns (N, D).
    """
    import torch

    length = int((tokens != 0).sum(dim=1).max())  # the tokenizer pads with 0 after EOT
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # EOT has the largest token id
    return model.text_projection(x) if hasattr(model.text_projection, "weight") else x @ model.text_projection


def text_context_probe(spec: ModelSpec, classnames: Sequence[str], templates: Sequence[str], threads: int,
                       batch_size: int = 256) -> dict[str, Any]:
    """Time the zero-shot classifier's text encoding with the full context vs truncated to the longest prompt.

    A diagnostic for a change to ``mmadapters.vision.zeroshot.encode_texts`` (see :func:`truncated_encode_text`):
    both variants encode the same texts in batches of ``batch_size``; returns seconds, speed-up and the max
    |difference| of the L2-normalized features.
    """
    import open_clip
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    name, pretrained = spec.extra["open_clip"]
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    model.eval()
    if type(model) is not open_clip.CLIP or getattr(model, "attn_mask", None) is None or \
            getattr(model, "text_pool_type", "argmax") != "argmax":
        return {"skipped": f"{type(model).__name__}: not an open_clip CLIP with a causal text tower and EOT pooling"}
    tokens = open_clip.get_tokenizer(name)([t.replace("{c}", c) for c in classnames for t in templates])
    out = {}
    with torch.inference_mode():
        for label, encode in (("full", model.encode_text), ("truncated", lambda x: truncated_encode_text(model, x))):
            encode(tokens[:2])  # warm-up: first-call allocations are not the variant's cost
            t0 = time.perf_counter()
            feats = torch.cat([F.normalize(encode(tokens[i:i + batch_size]).float(), dim=-1)
                               for i in range(0, len(tokens), batch_size)])
            out[label] = (time.perf_counter() - t0, feats)
    return {"texts": len(tokens), "context": tokens.shape[1], "longest": int((tokens != 0).sum(dim=1).max()),
            "full_s": out["full"][0], "truncated_s": out["truncated"][0],
            "speedup": out["full"][0] / max(out["truncated"][0], 1e-9),
            "max_abs_diff": (out["full"][1] - out["truncated"][1]).abs().max().item()}


# ----------------------------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "load_average": list(os.getloadavg())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import clip_benchmark
        import open_clip

        info["open_clip"] = open_clip.__version__
        info["clip_benchmark"] = _dist_version("clip-benchmark") or getattr(clip_benchmark, "__version__", None)
    except ImportError:
        pass
    return info


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"Zero-shot classification, `mmadapters zeroshot` vs `clip_benchmark eval` ({s['images']:,} generated images "
        f"of `{TASK}`, {s['classes']} classes × {s['templates']} templates, batch {s['batch_size']}, "
        f"{s['num_workers']} DataLoader workers, {s['threads']} threads, device {s['device']}, float32; "
        f"wall times are medians of {s['repeats']} run(s)).",
        "",
        "| model | mmadapters (s) | clip_benchmark (s) | speed-up | classifier: ours (s) | classifier: clip_benchmark (s) "
        "| classifier speed-up | mmadapters, cached classifier (s) | speed-up, cached | identical top-1 | identical top-5 "
        "| acc1 ours / clip_benchmark |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        w, c, ag = r["wall_s"], r["classifier_s"], r["agreement"]
        k5 = next((v for k, v in ag.items() if k.startswith("top") and k.endswith("_agreement") and k != "top1_agreement"), 0)
        lines.append(
            f"| {r['model']} | {w['ours_median']:.2f} | {w['clip_benchmark_median']:.2f} | "
            f"**{r['speedup_end_to_end']:.2f}×** | {c['ours_median']:.2f} | {c['clip_benchmark_median']:.2f} | "
            f"{r['speedup_classifier']:.2f}× | {w['ours_cached_classifier_median']:.2f} | {r['speedup_end_to_end_cached']:.2f}× | "
            f"{100 * ag['top1_agreement']:.2f}% ({ag['top1_agree']}/{ag['images']}) | {100 * k5:.2f}% | "
            f"{r['metrics']['ours']['acc1']:.4f} / {r['metrics']['clip_benchmark']['acc1']:.4f} |")
    lines += ["", "Where the time goes (last cold run of each, seconds; clip_benchmark's from its instrumented main):", "",
              "| model | tool | process start, imports, exit | model load, setup, metrics | classifier | image pass | total |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["models"]:
        t, w = r["ours_timings"], r["wall_s"]
        setup = t["total_s"] - t["classifier_s"] - t["evaluate_s"]
        lines.append(f"| {r['model']} | mmadapters | {r['ours_process_overhead_s']:.2f} | {setup:.2f} | "
                     f"{t['classifier_s']:.2f} | {t['evaluate_s']:.2f} | {w['ours'][-1]:.2f} |")
        tc = r["ours_cached_timings"]
        setup = tc["total_s"] - tc["classifier_s"] - tc["evaluate_s"]
        lines.append(f"| {r['model']} | mmadapters, cached classifier | {w['ours_cached_classifier'][-1] - tc['total_s']:.2f} | "
                     f"{setup:.2f} | {tc['classifier_s']:.2f} | {tc['evaluate_s']:.2f} | {w['ours_cached_classifier'][-1]:.2f} |")
        cls_s, img_s = r["classifier_s"]["clip_benchmark"][-1], r["clip_benchmark_classification_s"]
        lines.append(f"| {r['model']} | clip_benchmark | {r['clip_benchmark_process_overhead_s']:.2f} | "
                     f"{r['clip_benchmark_main_s'] - cls_s - img_s:.2f} | {cls_s:.2f} | {img_s:.2f} | "
                     f"{w['clip_benchmark'][-1]:.2f} |")
    lines += ["", "Notes:"]
    for r in result["models"]:
        diff = r["classifier_max_abs_diff"]
        lines.append(f"- {r['model']}: {r['model_note']}; max |W_ours − W_clip_benchmark| = "
                     f"{'n/a' if diff is None else f'{diff:.2e}'}.")
    lines += [
        "- Wall time: `time.perf_counter()` around each command as a subprocess (interpreter start to exit). The two "
        "tools alternate who runs first; both read the same webdataset shards, class names and templates files.",
        "- clip_benchmark runs as `python bench/zeroshot.py _clip_benchmark_instrumented DUMP -- eval ...`: its own "
        "`clip_benchmark.cli.main()` (what the `clip_benchmark` console script calls) with timers around "
        "`zero_shot_classifier` and `run_classification`, which also keep its classifier and logits.",
        "- Classifier time: ours is `timings.classifier_s` of our results JSON (tokenize + encode + average, a "
        "cache miss); clip_benchmark's is its `zero_shot_classifier` call (tokenize + encode + average).",
        "- Identical predictions: our `--predictions` lines against the top-k of clip_benchmark's logits, matched "
        "by webdataset key.",
    ]
    for r in result["models"]:
        pr = r.get("text_context_probe")
        if pr and "skipped" not in pr:
            lines.append(f"- {r['model']}, text-context probe ({pr['texts']} texts): full context {pr['context']} tokens "
                         f"{pr['full_s']:.2f}s vs truncated to the longest prompt ({pr['longest']}) {pr['truncated_s']:.2f}s "
                         f"= {pr['speedup']:.2f}× (max |Δ feature| {pr['max_abs_diff']:.1e}).")
    compat = sorted({c for r in result["models"] for c in r["clip_benchmark_compat"]})
    if compat:
        lines.append("- clip-benchmark 1.6.2 does not run unchanged in this environment; in its process: "
                     + "; ".join(compat) + ".")
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cpu_count']} CPUs{', ' + m['gpu'] if 'gpu' in m else ''}; torch "
              f"{m['torch']}, open_clip {m.get('open_clip')}, clip-benchmark {m.get('clip_benchmark')}; load average "
              f"at start {', '.join(f'{x:.2f}' for x in m['load_average'])}."]
    return "\n".join(lines) + "\n"


def append_results(path: Path, md: str, command: str, date: str) -> None:
    section = (f"\n## Zero-shot speed: mmadapters zeroshot vs clip_benchmark\n\nCommand: `{command}` ({date})\n\n{md}")
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Measured results\n"
    _atomic_write(path, (old.rstrip("\n") + "\n" + section).encode())


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 5 classes × 2 images, the first 8 of the 80 templates (about a minute)")
    p.add_argument("--models", default="vit-b-32,tiny", help="comma-separated: vit-b-32, tiny (default: both)")
    p.add_argument("--classes", type=int, default=None, help="classes of combos-100 to use (default 100; quick 5)")
    p.add_argument("--per-class", type=int, default=None, help="images per class (default 20; quick 2)")
    p.add_argument("--templates", type=int, default=None, help="use the first N ImageNet templates (default 80; quick 8)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, the same for both (default 0)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OMP/MKL threads of both (default: all CPUs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=1, help="cold runs of each tool; wall times are medians (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ViT-B-32 (default 0)")
    p.add_argument("--work-dir", default=str(REPO / "out" / "bench_zeroshot"))
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "zeroshot"), help="writes OUT.json and OUT.md")
    p.add_argument("--probe-text-context", type=int, default=0, metavar="N",
                   help="also time, in-process, the text encoding of the first N classes x templates with the full "
                   "context vs truncated to the longest prompt (a diagnostic; default 0: off)")
    p.add_argument("--append-results", default=None, metavar="FILE", help="append the table, command and machine to FILE")
    a = p.parse_args(argv)
    a.classes = a.classes or (5 if a.quick else 100)
    a.per_class = a.per_class or (2 if a.quick else 20)
    a.templates = a.templates or (8 if a.quick else 80)
    if not 1 <= a.classes <= 100 or a.per_class < 1 or not 1 <= a.templates <= 80 or a.repeats < 1 or a.threads < 1:
        p.error("--classes in 1..100, --templates in 1..80, --per-class, --repeats and --threads >= 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [INSTRUMENTED]:
        if len(argv) < 3 or argv[2] != "--":
            raise SystemExit(f"usage: zeroshot.py {INSTRUMENTED} DUMP -- <clip_benchmark arguments>")
        return _cb_instrumented(argv[1], argv[3:])
    a = parse_args(argv)
    work = Path(a.work_dir)
    started = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    info = machine()
    t0 = time.perf_counter()
    samples, classnames = generated_samples(work, a.classes, a.per_class)
    templates = imagenet_templates()[: a.templates]
    wds = work / "wds"
    order = write_wds(wds, samples, classnames, templates, shard_size=1000)
    print(f"{len(order)} images, {len(classnames)} classes, {len(templates)} templates in {wds} "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    specs = model_specs([m.strip() for m in a.models.split(",") if m.strip()], work, a.seed)
    models = []
    for spec in specs:
        print(f"{spec.label}: {spec.note}", flush=True)
        models.append(bench_model(spec, wds, order, work, a))
        if a.probe_text_context:
            probe = text_context_probe(spec, classnames[: a.probe_text_context], templates, a.threads)
            models[-1]["text_context_probe"] = probe
            print(f"  [{spec.label}] text context probe: {probe}", flush=True)
    command = shlex.join([".venv/bin/python", "bench/zeroshot.py", *argv])
    result = {
        "benchmark": "zeroshot", "command": command, "created": started, "machine": info,
        "settings": {"task": TASK, "images": len(order), "classes": len(classnames), "templates": len(templates),
                     "batch_size": a.batch_size, "num_workers": a.num_workers, "threads": a.threads, "device": a.device,
                     "repeats": a.repeats, "seed": a.seed, "quick": a.quick, "amp": False, "wds_root": str(wds)},
        "models": models,
    }
    md = markdown(result)
    out = Path(a.out)
    _atomic_write(out.with_suffix(".json"), (json.dumps(result, indent=2) + "\n").encode())
    _atomic_write(out.with_suffix(".md"), md.encode())
    print()
    print(md)
    print(f"written: {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    if a.append_results:
        append_results(Path(a.append_results), md, command, started)
        print(f"appended to {a.append_results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
