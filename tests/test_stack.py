"""The pinned stack imports, and the modality folders exist only as mmadapters subpackages."""

import importlib
import subprocess
import sys


def test_pinned_stack_imports():
    import torch
    import torchaudio
    import torchvision

    assert torch.__version__.startswith("2.11.0")
    assert torchaudio.__version__.startswith("2.11.0")
    assert torchvision.__version__.startswith("0.26.0")
    # torchaudio pieces the speech backbone builds on must import against this torch
    from torchaudio.functional import rnnt_loss  # noqa: F401
    from torchaudio.models import Conformer  # noqa: F401

    for name in ("open_clip", "timm", "transformers", "decord", "safetensors", "numpy", "PIL", "tqdm"):
        importlib.import_module(name)


def test_modality_packages_are_subpackages_only(tmp_path):
    for sub in ("speech", "vision", "video", "eval"):
        mod = importlib.import_module(f"mmadapters.{sub}")
        assert mod.__doc__ and "Will hold" in mod.__doc__ or "will hold" in (mod.__doc__ or "").lower()
    code = ("import importlib.util, sys\n"
            "bad = [m for m in ('speech', 'vision', 'video') if importlib.util.find_spec(m) is not None]\n"
            "import builtins\n"
            "try:\n    import eval as e; bad.append('eval')\nexcept ImportError:\n    pass\n"
            "sys.exit(1 if bad else 0) if not bad else print(bad) or sys.exit(1)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_help_is_fast_and_lists_demo():
    proc = subprocess.run([sys.executable, "-m", "mmadapters.eval.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "demo" in proc.stdout
