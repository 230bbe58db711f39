"""Results files shared by the evaluators: run keys, the overwrite guard, JSON encoding, atomic writes (torch-free)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def results_key(payload: dict[str, Any]) -> str:
    """A short stable hash of everything a run depends on (written as ``run_key``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_overwrite(path: Path, run_key: str, overwrite: bool) -> None:
    if overwrite or not path.exists():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8")).get("run_key")
    except (OSError, ValueError, AttributeError, RecursionError):
        previous = None
    if previous != run_key:
        raise FileExistsError(f"{path} holds the results of a different run (run_key {previous!r}, this run "
                              f"{run_key!r}); choose another --output or pass --overwrite")


def jsonable(value: Any) -> Any:
    """Tensors and numpy scalars as plain JSON values (hyperparameters come in all kinds)."""
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # a tensor (torch is not imported here)
        return value.tolist()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode()


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write ``results`` as JSON to ``path`` atomically (creating its folder); records it under ``output``."""
    from mmadapters.atomic import atomic_write_bytes

    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json_bytes(results))
    results["output"] = str(path)


def write_bench_report(out: str | Path, result: dict[str, Any], md: str, *, title: str,
                       append_to: str | Path | None = None) -> None:
    """A benchmark's outputs: ``out``.json and ``out``.md written atomically, the markdown printed, and,
    with ``append_to``, a dated section (command, wall time, table) appended to that file."""
    import time

    from mmadapters.atomic import atomic_write_bytes

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".json"), json_bytes(result))
    atomic_write_bytes(out.with_suffix(".md"), md.encode())
    print(md)
    if append_to:
        with open(append_to, "a", encoding="utf-8") as f:
            f.write(f"\n### {title} ({time.strftime('%Y-%m-%d')})\n\nCommand: `{result['command']}` "
                    f"(wall {result['wall_seconds']} s)\n\n{md}")
