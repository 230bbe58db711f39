"""scripts/compare_methods.py end to end on a very small generated task (the real run is in docs/results.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def compare():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import compare_methods

        yield compare_methods
    finally:
        sys.path.remove(str(SCRIPTS))


def test_budget_matching_and_rows(compare, tmp_path):
    out = tmp_path / "out.json"
    result = compare.main(["--methods", "series_both,lora_both,mosa,sparse_ft", "--budget", "4000", "--epochs", "1",
                           "--seeds", "0", "--lr", "1e-3", "--train-per-class", "2", "--val-per-class", "1",
                           "--test-per-class", "1", "--data-root", str(tmp_path / "data"), "--output", str(out),
                           "--markdown", str(tmp_path / "out.md")])
    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    by = {s["method"]: s for s in result["summary"]}
    assert set(by) == {"series_both", "lora_both", "mosa", "sparse_ft"}
    for s in by.values():
        assert 0.0 <= s["test_mean"] <= 1.0 and s["storage_bytes"] > 0
    # sizes are matched to the budget: no candidate size is closer than the one picked
    assert by["sparse_ft"]["trainable"] == 4000
    assert abs(by["series_both"]["trainable"] - 4000) <= 1158 / 2 + 1  # one bottleneck unit = 6 x 193 params
    # MoSA is merged into a plain bottleneck of its size (at least num_modules wide): 6 adapted modules of width 96
    assert by["mosa"]["trainable"] == 6 * (2 * 96 * by["mosa"]["size"] + by["mosa"]["size"] + 96)
    assert by["series_both"]["trainable"] == 6 * (2 * 96 * by["series_both"]["size"] + by["series_both"]["size"] + 96)
    assert "| sparse_ft" in (tmp_path / "out.md").read_text()


def test_unknown_method_is_named(compare, tmp_path):
    with pytest.raises(SystemExit, match="nope"):
        compare.main(["--methods", "nope", "--data-root", str(tmp_path)])
