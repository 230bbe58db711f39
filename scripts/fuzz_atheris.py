"""Coverage-guided fuzzing (atheris / libFuzzer) of the annotation readers and adapter config parsing.

Each input's first byte picks a target (a reader, or ``AdapterConfig.from_dict`` / ``read_adapter_config``), the
rest is that target's file. A target may return samples or raise its documented errors (``ValueError``
subclasses naming the file, not a bare ``UnicodeDecodeError``); anything else is a finding: printed with the
target, the exception and the input (hex), and saved under ``--out``. The run goes on after a finding (at most
``--max-findings``), bounded by ``--seconds`` and ``--runs``.

    OMP_NUM_THREADS=1 python scripts/fuzz_atheris.py --seconds 60
    OMP_NUM_THREADS=1 python scripts/fuzz_atheris.py --seconds 120 --target vqa --out fuzz-findings

Seeds: a small valid file per target is fed first, so mutations start from the formats' real structure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SEEDS = {
    "nemo": b'{"audio_filepath": "a.wav", "text": "hello", "lang": "en", "duration": 1.5, "id": "u1"}\n',
    "common_voice": b"client_id\tpath\tsentence\tlocale\nc1\ta.mp3\thello\ten\n",
    "mls": b"10_20_30\thello world\n",
    "csv": b"path,label\na.png,cat\nb.png,dog\n",
    "coop": json.dumps({"train": [["a.jpg", 0, "cat"]], "test": [["b.jpg", 1, "dog"]]}).encode(),
    "classnames": b"cat\ndog\n",
    "vqa": json.dumps([{"question_id": 1, "img_id": "i1", "sent": "what?", "label": {"red": 1.0},
                        "answers": ["red"]}]).encode(),
    "gqa": json.dumps([{"question_id": 1, "img_id": "i1", "sent": "what?", "label": "red"}]).encode(),
    "nlvr2": b'{"identifier": "dev-1-0-0", "sent": "two dogs", "label": "True"}\n',
    "coco": json.dumps({"images": [{"filepath": "val2014", "filename": "a.jpg", "imgid": 1, "split": "test",
                                    "sentences": [{"raw": "a cat"}]}]}).encode(),
    "trafficqa": json.dumps(["record_id", "vid_id", "vid_filename", "perspective", "q_body", "q_type", "option0",
                             "option1", "option2", "option3", "answer"]).encode() + b"\n"
                 + json.dumps([1, 2, "b_1.mp4", 1, "why?", "U", "a", "b", "", "", 0]).encode() + b"\n",
    "dfer": b"clips/00001 16 3\nclips/00002 20 1\n",
    "config_dict": json.dumps({"method": "lora", "r": 4, "alpha": 8, "target_modules": ["fc1"]}).encode(),
    "adapter_config": json.dumps({"name": "a", "format_version": 1, "config": {"method": "lora", "r": 2},
                                  "fingerprint": {"fc1": {"weight": [20, 10]}}, "weights_sha256": "0" * 64,
                                  "targets": [{"name": "fc1", "parts": [], "dim": None}]}).encode(),
}
TARGETS = tuple(SEEDS)


def _allowed(err: BaseException) -> bool:
    return isinstance(err, ValueError) and not isinstance(err, UnicodeDecodeError) and bool(str(err))


def run_target(target: str, data: bytes) -> None:
    """Run ``target`` on ``data``; raise AssertionError for an undocumented error."""
    if target == "config_dict":
        import mmadapters as mma
        import mmadapters.methods  # noqa: F401

        try:
            value = json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError):
            return  # not JSON: nothing for from_dict to parse
        try:
            mma.AdapterConfig.from_dict(value, source="fuzz")
        except ValueError:
            return
        except TypeError:
            if isinstance(value, dict):
                raise
        return
    with tempfile.TemporaryDirectory(prefix="mma-atheris-") as tmp:
        if target == "adapter_config":
            from mmadapters.io import CONFIG_NAME, read_adapter_config

            (Path(tmp) / CONFIG_NAME).write_bytes(data)
            read = lambda: read_adapter_config(tmp)  # noqa: E731
        else:
            from test_fuzz_readers import _layout

            read = _layout(target, Path(tmp), data)
        try:
            read()
        except Exception as err:  # noqa: BLE001 - the point: which types escape
            if not _allowed(err):
                raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this many seconds (default 60)")
    parser.add_argument("--runs", type=int, default=-1, help="stop after this many inputs (default: no bound)")
    parser.add_argument("--target", choices=TARGETS, action="append",
                        help="fuzz only these targets (repeatable; default: all)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the inputs of findings")
    parser.add_argument("--max-findings", type=int, default=20, help="stop after this many distinct findings")
    parser.add_argument("--max-len", type=int, default=512, help="largest input in bytes")
    args = parser.parse_args(argv)

    import atheris

    targets = tuple(args.target or TARGETS)
    findings: dict[tuple[str, str, str], bytes] = {}
    start, count = time.monotonic(), [0]

    seeds = tempfile.mkdtemp(prefix="mma-atheris-seeds-")  # libFuzzer's corpus: the seeds, then what it adds

    def report() -> None:
        shutil.rmtree(seeds, ignore_errors=True)
        print(f"fuzz_atheris: {count[0]} inputs in {time.monotonic() - start:.0f} s over {len(targets)} targets; "
              f"{len(findings)} distinct finding(s)", flush=True)

    def one_input(data: bytes) -> None:
        count[0] += 1
        if time.monotonic() - start > args.seconds or (args.runs >= 0 and count[0] > args.runs):
            report()
            os._exit(1 if findings else 0)
        if not data:
            return
        target = targets[data[0] % len(targets)]
        payload = data[1:]
        try:
            run_target(target, payload)
        except Exception as err:  # noqa: BLE001
            frame = traceback.extract_tb(err.__traceback__)[-1]
            key = (target, type(err).__name__, f"{Path(frame.filename).name}:{frame.lineno}")
            if key not in findings:
                findings[key] = payload
                print(f"FINDING {target}: {type(err).__name__} at {key[2]}: {str(err)[:200]}\n  input: {payload[:200].hex()}",
                      flush=True)
                if args.out is not None:
                    args.out.mkdir(parents=True, exist_ok=True)
                    (args.out / f"{target}-{type(err).__name__}-{len(findings)}.bin").write_bytes(payload)
                if len(findings) >= args.max_findings:
                    report()
                    os._exit(1)

    for i, target in enumerate(TARGETS):
        if target in targets:
            Path(seeds, f"seed{i}").write_bytes(bytes([targets.index(target)]) + SEEDS[target])
    import hypothesis  # noqa: F401 - dependencies first, so that only mmadapters' own code is instrumented
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401

    with atheris.instrument_imports(include=["mmadapters"]):
        import mmadapters.config  # noqa: F401
        import mmadapters.io  # noqa: F401
        import mmadapters.methods  # noqa: F401
        import mmadapters.speech.readers  # noqa: F401
        import mmadapters.video.readers  # noqa: F401
        import mmadapters.vision.readers  # noqa: F401
        import mmadapters.vision.vl_readers  # noqa: F401
    import test_fuzz_readers  # noqa: F401 - the readers' file layouts (shared with the hypothesis tests)
    atheris.Setup([sys.argv[0], f"-max_len={args.max_len}", "-rss_limit_mb=4096", seeds], one_input)
    atheris.Fuzz()
    report()
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
