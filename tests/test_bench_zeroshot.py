"""bench/zeroshot.py smoke test: the wds writer read back by both tools, clip_benchmark's instrumented run and the
prediction comparison, on a tiny random CLIP (local-dir in tmp) and a handful of images. Offline, a few seconds."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmadapters.eval.cli import main as mmadapters_main
from mmadapters.vision.clip import tiny_clip_config, write_clip_dir
from mmadapters.vision.readers import WdsDataset

pytest.importorskip("clip_benchmark")
pytest.importorskip("webdataset")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "zeroshot.py"
CLASSNAMES = ["red circle", "blue square", "green star"]
COLOURS = [(230, 30, 30), (30, 30, 230), (30, 200, 30)]
TEMPLATES = ["a photo of a {c}.", "a {c}.", "a drawing of the {c}."]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_zeroshot", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture
def cb(bench, monkeypatch):
    """clip_benchmark made importable here (bench's compatibility fixes), everything restored afterwards."""
    had_requests = "requests" in sys.modules
    from clip_benchmark.metrics import zeroshot_classification as zc

    for name in ("accuracy", "zero_shot_classifier", "run_classification"):
        monkeypatch.setattr(zc, name, getattr(zc, name))  # restored at teardown, whatever the bench patches
    changes = bench.clip_benchmark_compat()
    yield changes
    if not had_requests and "stand-in" in (getattr(sys.modules.get("requests"), "__doc__", "") or ""):
        del sys.modules["requests"]


def _samples(per_class=2):
    out = []
    for label, colour in enumerate(COLOURS):
        for i in range(per_class):
            buf = io.BytesIO()
            Image.new("RGB", (20, 20), tuple(max(0, c - 40 * i) for c in colour)).save(buf, format="PNG")
            out.append((buf.getvalue(), "png", label))
    return out


def test_wds_writer_layout_read_by_ours_and_clip_benchmark(bench, cb, tmp_path):
    samples = _samples()
    order = bench.write_wds(tmp_path / "wds", samples, CLASSNAMES, TEMPLATES, shard_size=4)
    root = tmp_path / "wds"
    assert (root / "test" / "nshards.txt").read_text().strip() == "2"
    assert sorted(p.name for p in (root / "test").glob("*.tar")) == ["0.tar", "1.tar"]
    assert [s.label for s in order] == [label for _, _, label in samples]
    assert [s.shard for s in order] == ["0.tar"] * 4 + ["1.tar"] * 2 and len({s.key for s in order}) == 6

    ours = WdsDataset(root, "test")
    assert ours.classnames == CLASSNAMES and sorted(ours.labels) == sorted(s.label for s in order)
    keys = [Path(p).name.partition(".")[0] for p, _ in ours.samples]
    assert dict(zip(keys, ours.labels, strict=True)) == {s.key: s.label for s in order}
    image, label, _ = ours[0]
    assert image.size == (20, 20) and label == order[0].label

    from clip_benchmark.datasets.builder import build_dataset

    theirs = build_dataset(f"wds/{bench.WDS_NAME}", root=str(root), transform=None, split="test",
                           task="zeroshot_classification")
    assert theirs.classes == CLASSNAMES and theirs.templates == TEMPLATES
    assert [int(y) for _, y in theirs] == [s.label for s in order]  # clip_benchmark reads in written order

    with pytest.raises(ValueError, match="field 'label'"):
        bench.write_wds(tmp_path / "bad", [(samples[0][0], "png", 3)], CLASSNAMES, TEMPLATES)


def test_instrumented_clip_benchmark_matches_ours(bench, cb, tmp_path, monkeypatch):
    clip_dir = write_clip_dir(tmp_path / "clip", tiny_clip_config(), seed=0)
    root = tmp_path / "wds"
    order = bench.write_wds(root, _samples(3), CLASSNAMES, TEMPLATES, shard_size=5)

    cache = tmp_path / "cache"
    assert mmadapters_main(["zeroshot", "--model", f"local-dir:{clip_dir}", "--dataset", "wds", "--dataset-root", str(root),
                            "--batch-size", "4", "--num-workers", "0", "--templates",
                            str(root / "zeroshot_classification_templates.txt"), "--output", str(tmp_path / "ours.json"),
                            "--predictions", str(tmp_path / "ours.jsonl"), "--cache-dir", str(cache), "--no-progress"]) == 0
    results = json.loads((tmp_path / "ours.json").read_text())
    assert results["counts"]["evaluated"] == len(order) and results["classifier_cache_hit"] is False

    dump = tmp_path / "cb.pt"
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the instrumented main sets sys.argv
    args = ["eval", "--dataset", f"wds/{bench.WDS_NAME}", "--dataset_root", str(root), "--task",
            "zeroshot_classification", "--model", f"local-dir:{clip_dir}", "--pretrained", "", "--batch_size", "4",
            "--num_workers", "0", "--no_amp", "--quiet", "--output", str(tmp_path / "cb.json")]
    assert bench.main([bench.INSTRUMENTED, str(dump), "--", *args]) == 0
    record = torch.load(dump, weights_only=True)
    assert record["classifier_s"] > 0 and record["classification_s"] > 0 and record["main_s"] >= record["classifier_s"]
    assert record["logits"].shape == (len(order), len(CLASSNAMES)) and record["classifier"].shape[1] == len(CLASSNAMES)
    cb_metrics = json.loads((tmp_path / "cb.json").read_text())["metrics"]
    assert cb_metrics["acc1"] == pytest.approx(results["metrics"]["acc1"])

    ours = bench.read_predictions(tmp_path / "ours.jsonl")
    agreement = bench.compare_predictions(ours, order, record["logits"], record["targets"])
    assert agreement["images"] == len(order) and agreement["labels_match"]
    assert agreement["top1_agreement"] == 1.0 and agreement["top3_agreement"] == 1.0
    assert bench.classifier_difference(cache, record["classifier"]) < 1e-5

    # a disagreement is counted, a misaligned order is refused
    key = order[0].key
    flipped = dict(ours)
    flipped[key] = {**ours[key], "prediction": (ours[key]["prediction"] + 1) % len(CLASSNAMES)}
    assert bench.compare_predictions(flipped, order, record["logits"], record["targets"])["top1_agree"] == len(order) - 1
    with pytest.raises(ValueError, match="order"):
        bench.compare_predictions(ours, order[::-1], record["logits"], record["targets"])


def test_truncated_text_encoding_equals_full_context(bench, tmp_path):
    import open_clip

    clip_dir = write_clip_dir(tmp_path / "clip", tiny_clip_config(context_length=16), seed=1)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokens = open_clip.get_tokenizer(f"local-dir:{clip_dir}")([t.replace("{c}", c) for c in CLASSNAMES for t in TEMPLATES])
    assert int((tokens != 0).sum(dim=1).max()) < tokens.shape[1]  # something to truncate
    with torch.inference_mode():
        full, short = model.eval().encode_text(tokens), bench.truncated_encode_text(model, tokens)
    assert short.shape == full.shape and torch.allclose(short, full, atol=1e-5)
