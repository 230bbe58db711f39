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
        assert mod.__doc__
    for sub in ("speech", "video"):  # no longer placeholders: the docs name their modules
        assert "Will hold" not in importlib.import_module(f"mmadapters.{sub}").__doc__
    # Run from an unrelated directory: only the installed layout is visible there.
    code = (
        "import importlib.util, sys\n"
        "bad = [m for m in ('speech', 'vision', 'video', 'eval') if importlib.util.find_spec(m) is not None]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_help_is_fast_and_lists_demo():
    proc = subprocess.run([sys.executable, "-m", "mmadapters.eval.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "zeroshot" in proc.stdout


def test_ruff_clean():
    import shutil
    from pathlib import Path

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([ruff, "check", str(root)], capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_public_name_resolves():
    import mmadapters as mma

    for name in mma.__all__:
        assert getattr(mma, name) is not None, name
    assert sorted(mma.__all__) == sorted(set(mma.__all__))


def test_adapted_models_move_and_cast_like_any_module():
    """nn.Module.to/half/double walk modules through _apply: a wrapper must not shadow it."""
    import torch

    import mmadapters as mma

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    mma.add_adapter(model, "a", mma.BottleneckConfig(bottleneck_dim=2, target_modules=["0"]))
    mma.add_adapter(model, "l", mma.LoRAConfig(r=2, target_modules=["2"]))
    model.to("cpu").double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    y = model(torch.randn(3, 4, dtype=torch.float64))
    assert y.dtype == torch.float64
    model.half().float()
    assert all(p.dtype == torch.float32 for p in model.parameters())
