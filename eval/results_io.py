"""Files shared by the evaluators (torch-free): the overwrite guard, output name templates, the cache folder,
JSON encoding, atomic writes. Run keys and the results schema: :mod:`mmadapters.eval.results_schema`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def default_cache_dir(chosen: str | os.PathLike | None = None) -> Path:
    """``chosen`` (a ``--cache-dir``) when given, else ``$MMADAPTERS_CACHE``, else ``$XDG_CACHE_HOME/mmadapters``,
    else ``~/.cache/mmadapters``."""
    if chosen:
        return Path(chosen)
    if os.environ.get("MMADAPTERS_CACHE"):
        return Path(os.environ["MMADAPTERS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mmadapters"


def _slug(value: str | None) -> str:
    text = "none" if not value else str(value)
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text).strip("_") or "none"


def fill_output(template: str, **fields: str | None) -> Path:
    """``template`` with ``{dataset}``, ``{model}``... (the keyword names) filled in, file-name safe."""
    try:
        return Path(template.format(**{k: _slug(v) for k, v in fields.items()}))
    except (KeyError, IndexError, ValueError) as e:
        names = " ".join(f"{{{k}}}" for k in fields)
        raise ValueError(f"--output {template!r}: only {names} can be filled in ({e})") from None


def prepare_output(args, run_key: str, **fields: str | None) -> Path:
    """The results file of an evaluation, checked before any work: ``--output`` with its ``{fields}`` filled in, not
    the ``--predictions`` file, writable, and not another run's results (unless ``--overwrite``). Under torchrun only
    rank 0 checks (it alone writes)."""
    from mmadapters import distributed

    from .eval_cli import check_output_paths

    output = fill_output(str(args.output), **fields)
    if distributed.is_main():
        if output.is_dir():
            raise IsADirectoryError(f"--output {output}: is a directory; expected a results file path")
        check_output_paths(args, output)  # the template is filled now: --predictions may name the same file
        check_overwrite(output, run_key, args.overwrite)
    return output


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


def null_non_finite(value: Any) -> Any:
    """``value`` with every NaN / ±inf float (in dicts and lists) replaced by None: JSON has no such numbers, and
    Python's ``NaN`` in a file is refused by other readers. A metric that is undefined (acc5 with fewer than
    5 classes) is null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: null_non_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [null_non_finite(v) for v in value]
    return value


def json_bytes(obj: Any) -> bytes:
    """``obj`` as indented JSON (non-finite numbers as null), ending in a newline."""
    return (json.dumps(null_non_finite(obj), indent=2, allow_nan=False) + "\n").encode()


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
