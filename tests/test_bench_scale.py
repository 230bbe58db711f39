"""bench/scale.py and bench/gpu.sh: a --quick run with tiny sizes writes every section of the report with ours and
peft measured in the same run; routed outputs equal per-sample outputs; bad flags are named; gpu.sh parses, refuses
to run without CUDA, and assembles one table from the benches it runs (faked here: there is no GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "scale.py"
GPU_SH = ROOT / "bench" / "gpu.sh"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_quick_run_writes_every_section(bench, tmp_path):
    out = tmp_path / "scale"
    argv = ["--quick", "--ns", "1,6", "--distinct", "1,4", "--batch", "8", "--capacity", "4", "--reps", "1",
            "--warmup", "0", "--serve-adapters", "12", "--serve-requests", "20", "--serve-batch", "4",
            "--serve-capacity", "4", "--out", str(out)]
    result = bench.main(argv)
    written = json.loads(out.with_suffix(".json").read_text())
    assert written["settings"]["ns"] == [1, 6] and written["settings"]["distinct"] == [1, 4]
    assert "--quick" in written["command"] and written["scale"]["plain_s"] > 0
    rows = written["scale"]["rows"]
    assert [r["N"] for r in rows] == [1, 6]
    assert [c["k"] for c in rows[0]["cells"]] == [1]  # k > N is left out
    assert [c["k"] for c in rows[1]["cells"]] == [1, 4]
    for r in rows:
        assert r["add"]["ours"]["adds"] == r["add"]["peft"]["adds"] == r["N"]  # peft finished within its budget
        assert r["add"]["ours"]["total_s"] > 0 and r["add"]["peft"]["per_add_s"] > 0
        m = r["memory"]
        assert m["adapter_bytes"] == r["N"] * 3 * 2 * 4 * 8 * (96 + 384)  # 3 blocks x (c_fc, c_proj) x fp32 (A, B)
        assert 0 < m["device_pool_bytes"] <= 3 * 2 * 4 * 8 * (96 + 384) * (4 + 1)  # at most capacity + the zero slot
        for c in r["cells"]:
            assert c["routed_over_plain"] == pytest.approx(c["ours_s"] / written["scale"]["plain_s"])
            assert c["ours_over_peft"] == pytest.approx(c["ours_s"] / c["peft_s"])
            assert c["max_abs_diff_vs_peft"] < 1e-5 and 0 <= c["cache_hit_rate"] <= 1
    assert rows[1]["cells"][-1]["max_abs_diff_vs_per_sample"] < 1e-5
    serving = written["serving"]
    assert serving["requests"] == 20 and serving["adapters"] == 12 and serving["max_abs_diff_ours_vs_peft"] < 1e-5
    assert serving["rate_auto"] and serving["offered_rate"] > 0
    for name in ("ours", "peft"):
        s = serving["servers"][name]
        assert s["requests_per_s"] > 0 and 0 < s["p50_ms"] <= s["p99_ms"] and 1 <= s["mean_batch"] <= 4
    assert result["serving"]["servers"].keys() == {"ours", "peft"}
    md = out.with_suffix(".md").read_text()
    assert "| N | k distinct | routed / plain |" in md and "| ours |" in md and "| peft |" in md
    assert "Aims:" in md and "simulated clock" in md


def test_routed_outputs_equal_per_sample_outputs(bench):
    base = bench.tiny_tower("cpu")
    built = bench.build_ours(base, 5, 8, "cpu")
    names = bench.zipf_batch(np.random.default_rng(3), 5, 3, 8, 1.0)
    assert len(names) == 8 and len(set(names)) == 3
    x = torch.randn(8, 3, *base.image_size)
    import mmadapters as mma

    with torch.inference_mode():
        got = bench.routed(built.model, mma.AdapterCache(capacity=3), names, x)
        want = bench.per_sample(built.model, names, x, "cpu")
        plain = base(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapters change the output: the equality above is not trivial


def test_peft_past_its_budget_is_skipped_and_marked(bench):
    base = bench.tiny_tower("cpu")
    built = bench.build_peft(base, 4, 8, 0.0, direct=False)
    assert built.model is None and "1 of 4 adds" in built.note and "skipped" in built.note
    direct = bench.build_peft(base, 4, 8, 0.0, direct=True)
    assert direct.model is not None and "registered directly" in direct.note
    ours = bench.build_ours(base, 4, 8, "cpu")
    bench.copy_weights(ours.model, direct.model)  # directly registered adapters run peft's mixed batch like ours
    names = ["a3", "a0", "a2", "a3"]
    x = torch.randn(4, 3, *base.image_size)
    import mmadapters as mma

    with torch.inference_mode():
        torch.testing.assert_close(direct.model(x, adapter_names=names),
                                   bench.routed(ours.model, mma.AdapterCache(), names, x), rtol=1e-5, atol=1e-5)


def test_aims_are_judged_on_the_measured_cells(bench):
    def cell(k, routed, vs_peft):
        return {"k": k, "routed_over_plain": routed, "ours_over_peft": vs_peft}

    scale = {"rows": [{"N": 32, "cells": [cell(32, 1.25, 0.9)]},
                      {"N": 256, "cells": [cell(8, 1.1, 0.6), cell(32, 1.2, 0.7)]},
                      {"N": 4096, "cells": [cell(32, 1.35, None)]}]}  # peft skipped at N=4096
    assert bench.aims(scale) == [
        ("routed with 32 distinct ≤ 1.3× plain at every N", False),  # 1.35 at N=4096
        ("routed/plain at N=4096 within 10% of N=32 (k=32)", True),  # 1.35 / 1.25 = 1.08
        ("≥ 1.5× faster than peft's mixed batch at N ≥ 256 (peft measured at N=256)", False)]  # 0.7 > 1 / 1.5
    assert [ok for _, ok in bench.aims({"rows": [{"N": 1, "cells": [cell(1, 1.0, 1.0)]}]})] == [None, None, None]


@pytest.mark.parametrize("argv, message", [
    (["--distinct", "1,40"], "--distinct 40 exceeds --batch 32"),
    (["--capacity", "4"], "--capacity 4 is below --distinct 32"),
    (["--ns", "0,4"], "--ns expects comma-separated positive integers"),
    (["--sections", "scale,other"], "--sections: expected scale and/or serve"),
    (["--serve-batch", "80"], "--serve-capacity 64 is below --serve-batch 80"),
])
def test_bad_flags_are_named(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert message in (str(e.value) + capsys.readouterr().err)


def test_gpu_script_parses_and_refuses_without_cuda(tmp_path):
    assert subprocess.run(["bash", "-n", str(GPU_SH)], capture_output=True).returncode == 0
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin", PY=sys.executable, OUT=str(tmp_path / "o"), MD=str(tmp_path / "g.md"))
    fake = tmp_path / "nvidia-smi"  # present, but this torch sees no CUDA device (or is a CPU build)
    fake.write_text("#!/bin/sh\necho 'Fake GPU, 80 GiB, 1.0'\n")
    fake.chmod(0o755)
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal cannot be shown here")
    r = subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "torch.cuda.is_available() is False" in r.stderr and "nothing was run" in r.stderr
    fake.unlink()
    r = subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "nvidia-smi not found" in r.stderr
    assert not (tmp_path / "g.md").exists()


def test_gpu_script_assembles_one_table(tmp_path):
    """With nvidia-smi and the interpreter faked, every bench is called with its GPU flags under its time limit;
    a failing and a hanging bench are reported in the table and make the exit status 1."""
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'Fake GPU, 80 GiB, 1.0'\n")
    (tmp_path / "py").write_text(
        "#!/bin/bash\n[ \"$1\" = -c ] && exit 0\nout=${@: -1}\n"
        "case $1 in *asr.py) echo boom >&2; exit 3;; *video.py) sleep 20;; esac\n"
        "printf '| table of | %s |\\n' \"$*\" > \"$out.md\"\n")
    for f in ("nvidia-smi", "py"):
        (tmp_path / f).chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", PY=str(tmp_path / "py"), OUT=str(tmp_path / "o"),
               MD=str(tmp_path / "g.md"), VIDEO_S="1")
    r = subprocess.run(["bash", str(GPU_SH)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1, r.stderr
    md = (tmp_path / "g.md").read_text()
    assert md.startswith("# GPU benchmarks: Fake GPU, 80 GiB, 1.0")
    assert "| table of | bench/core.py --device cuda --batch 64 --ks 1,16,64 --rank 16 --out" in md
    assert "| table of | bench/scale.py --device cuda" in md and "| table of | bench/zeroshot.py --device cuda --models vit-b-32" in md
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ") and "`" in line}
    assert " ok " in rows["core"] and " ok " in rows["scale"] and " ok " in rows["zeroshot"]
    assert "**failed** (exit 3)" in rows["asr"] and "boom" in md
    assert "**timed out** after 1 s" in rows["video"]
