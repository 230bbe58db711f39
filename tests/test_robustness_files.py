"""Adapter files that a save could not have written (issue "correct under abuse"): non-finite numbers, undeclared
dtypes; and saves that are honest: byte-reproducible, with the mode the umask gives. Rows in docs/robustness.md."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from toys import MLP

import mmadapters as mma
from mmadapters.io import CONFIG_NAME, WEIGHTS_NAME


def _saved(tmp_path, bits=None, name="adapter"):
    torch.manual_seed(0)
    model = MLP(20)
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for p in mma.adapter_parameters(model, "a").values():
            p.normal_()
    return model, mma.save_adapter(model, "a", tmp_path / name, bits=bits)


def _fresh():
    torch.manual_seed(0)
    return MLP(20)


def _rewrite_weights(directory, edit):
    """Edit the tensors and re-sign the file (field weights_sha256), as someone producing a bad file would."""
    weights = directory / WEIGHTS_NAME
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    return weights


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_hyperparameter_in_adapter_config_is_refused(tmp_path, token):
    _, directory = _saved(tmp_path)
    path = directory / CONFIG_NAME
    text = path.read_text()
    assert '"alpha": 8.0' in text
    path.write_text(text.replace('"alpha": 8.0', f'"alpha": {token}'))
    with pytest.raises(ValueError, match=r"field 'config\.alpha' is not a finite number") as err:
        mma.load_adapter(_fresh(), directory)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_weights_are_refused(tmp_path, value):
    _, directory = _saved(tmp_path)
    key = "fc1.lora.lora_B.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key][0, 0] = value

    weights = _rewrite_weights(directory, poison)
    with pytest.raises(ValueError, match=f"tensor '{re.escape(key)}' holds NaN or infinite values") as err:
        mma.load_adapter(_fresh(), directory)
    assert str(weights) in str(err.value)


def test_non_finite_low_bit_scale_is_refused(tmp_path):
    _, directory = _saved(tmp_path, bits=4)
    weights = directory / WEIGHTS_NAME
    scale = next(k for k in load_file(weights) if k.endswith("scale"))

    def poison(t):
        t[scale] = torch.full_like(t[scale], float("nan"))

    _rewrite_weights(directory, poison)
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        mma.load_adapter(_fresh(), directory)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool, torch.float16, torch.float64, torch.int64])
def test_tensor_stored_in_a_dtype_the_config_does_not_declare_is_refused(tmp_path, dtype):
    _, directory = _saved(tmp_path)
    key = "fc2.lora.lora_A.weight"

    def cast(t):
        t[key] = t[key].to(dtype)

    weights = _rewrite_weights(directory, cast)
    with pytest.raises(ValueError, match=f"tensor '{re.escape(key)}' is stored as") as err:
        mma.load_adapter(_fresh(), directory)
    assert str(weights) in str(err.value)


def test_files_without_declared_dtypes_still_refuse_integer_weights(tmp_path):
    _, directory = _saved(tmp_path)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta.pop("dtypes")  # as files written before dtypes were declared
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    assert mma.load_adapter(_fresh(), directory) == "a"  # a float file without the field still loads

    def cast(t):
        t["fc1.lora.lora_A.weight"] = t["fc1.lora.lora_A.weight"].to(torch.int8)

    _rewrite_weights(directory, cast)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta.pop("dtypes", None)
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="'fc1.lora.lora_A.weight' is stored as int8; the adapter's parameter is float32"):
        mma.load_adapter(_fresh(), directory)


@pytest.mark.parametrize("bits", [None, 4])
def test_saving_the_same_adapter_twice_gives_the_same_bytes(tmp_path, bits):
    model, first = _saved(tmp_path, bits=bits, name="one")
    second = mma.save_adapter(model, "a", tmp_path / "two", bits=bits)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert load_file(first / WEIGHTS_NAME).keys() == load_file(second / WEIGHTS_NAME).keys()


def test_saved_adapter_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _, directory = _saved(tmp_path)
    finally:
        os.umask(old)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        assert (directory / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("version", ["2", None, 0, True])
def test_quantization_version_that_is_not_a_positive_integer_is_named(tmp_path, version):
    _, directory = _saved(tmp_path, bits=4)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta["quantization"]["version"] = version
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"field 'quantization'\.version: expected a positive integer"):
        mma.load_adapter(_fresh(), directory)


def test_storage_report_of_a_quantization_record_without_shape_is_named(tmp_path):
    _, directory = _saved(tmp_path, bits=4)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    key = next(iter(meta["quantization"]["tensors"]))
    del meta["quantization"]["tensors"][key]["shape"]
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"field 'quantization\.tensors\[.*\]\.shape' is None"):
        mma.storage_report(directory)


@pytest.mark.parametrize("targets,message", [
    ([""], r"target_modules\[0\]: '' is not a pattern"),
    (["fc1", "fc2", "fc1"], r"target_modules\[2\]: 'fc1' repeats target_modules\[0\]"),
])
def test_empty_or_repeated_target_pattern_is_named(targets, message):
    with pytest.raises(ValueError, match=message):
        mma.add_adapter(_fresh(), "a", mma.LoRAConfig(r=2, target_modules=targets))


@pytest.mark.parametrize("r", [20_000_000, 1_000_000_000])
def test_config_declaring_absurd_sizes_is_refused_before_allocating(tmp_path, r):
    """adapter_config.json with "r": 2e7 in a 1.3 KB folder allocated 4.6 GB before failing; r = 1e9 gave a bare
    allocator error. The config is now built on the meta device and compared with the file's tensors first."""
    import resource

    _, directory = _saved(tmp_path)
    meta = json.loads((directory / CONFIG_NAME).read_text())
    meta["config"]["r"] = r
    (directory / CONFIG_NAME).write_text(json.dumps(meta))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = _fresh()
    with pytest.raises(ValueError, match=rf"field 'config' builds tensor '.*' of shape \[{r}, 10\], but .* holds \[2, 10\]"):
        mma.load_adapter(model, directory)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: far below the 4.6 GB
    assert mma.adapter_names(model) == []


def test_checkpoint_directory_folders_honour_the_umask(tmp_path):
    model, _ = _saved(tmp_path)
    old = os.umask(0o022)
    try:
        ckpt = mma.save_adapters(model, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert (ckpt / "a").stat().st_mode & 0o777 == 0o755
    assert (ckpt / "a" / WEIGHTS_NAME).stat().st_mode & 0o777 == 0o644
