"""bench/video.py smoke test: a --quick run on two tiny generated clips writes the JSON and markdown with every variant,
ratios against the peer measured in the same run, and frames that agree with the peer's."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "video.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_video", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_run_writes_ratios_for_every_variant(bench, tmp_path):
    out = tmp_path / "video"
    argv = ["--quick", "--clips", "2", "--frames", "24", "--workers", "1", "--out", str(out), "--work-dir", str(tmp_path / "w")]
    result = bench.main(argv)
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["variants"].keys() == result["variants"].keys() == {
        "pyav decode-all", "ours pyav", "ours decord", "ours decord, time-bounded", "ours DataLoader"}
    assert written["settings"]["clips"] == 2 and written["settings"]["frames"] == 24
    assert written["peer"] == "pyav decode-all" and written["variants"]["pyav decode-all"]["ratio"] == pytest.approx(1.0)
    for v in written["variants"].values():
        assert v["clips_per_s"] > 0 and v["ratio"] > 0 and len(v["seconds"]) == 1
    assert written["target"] == {"variant": "ours decord", "ratio": 3.0, "met": written["variants"]["ours decord"]["ratio"] >= 3.0}
    assert all(diff < 1.0 for diff in written["agreement"].values())  # same frames as the peer's
    assert "--quick" in written["command"]
    md = out.with_suffix(".md").read_text()
    assert "| ours decord |" in md and "ratio vs pyav decode-all" in md
    # the clips are reused while their settings match
    clips = sorted((tmp_path / "w" / "quick").glob("clip_*.mp4"))
    assert len(clips) == 2
    mtimes = [c.stat().st_mtime_ns for c in clips]
    bench.make_clips(tmp_path / "w" / "quick", 2, 24, 160, 120, 30, 0)
    assert [c.stat().st_mtime_ns for c in clips] == mtimes
