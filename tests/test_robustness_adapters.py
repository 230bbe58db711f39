"""Bad adapter files and interrupted writes: errors name the file and the field, and nothing already saved is
corrupted (a failed save keeps the previous adapter loadable; a results file of another run is not replaced).
Part of the bad-input catalogue in docs/robustness.md."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from toys import MLP

import mmadapters as mma
from mmadapters import io as mio
from mmadapters.io import CONFIG_NAME, WEIGHTS_NAME


def _model(width: int = 20, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP(width)
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def _saved(tmp_path, **kw):
    model = _model(**kw)
    return model, mma.save_adapter(model, "a", tmp_path / "adapter")


def _edit_config(directory, edit):
    path = directory / CONFIG_NAME
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return path


def _names(err: pytest.ExceptionInfo, *parts: str) -> None:
    text = str(err.value)
    for part in parts:
        assert part in text, f"{part!r} not in {text!r}"


def test_adapter_for_another_base_model(tmp_path):
    _, directory = _saved(tmp_path, width=20)
    other = MLP(width=32)
    with pytest.raises(ValueError) as err:
        mma.load_adapter(other, directory)
    _names(err, str(directory / CONFIG_NAME), "shape mismatch at module 'fc1'", "this base has [32")
    assert mma.adapter_names(other) == []  # nothing half-installed


def test_truncated_safetensors(tmp_path):
    _, directory = _saved(tmp_path)
    weights = directory / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError) as err:
        mma.load_adapter(MLP(), directory)
    _names(err, str(weights), "checksum differs from field 'weights_sha256'", "truncated")


def test_truncated_safetensors_with_a_matching_checksum(tmp_path):
    """A truncated file whose checksum was recorded as such still fails as unreadable, naming the file."""
    _, directory = _saved(tmp_path)
    weights = directory / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    import hashlib

    _edit_config(directory, lambda m: m.update(weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest()))
    with pytest.raises(ValueError) as err:
        mma.load_adapter(MLP(), directory)
    _names(err, str(weights), "not a readable safetensors file")


def test_weights_of_another_adapter_under_the_right_checksum(tmp_path):
    _, directory = _saved(tmp_path)
    weights = directory / WEIGHTS_NAME
    save_file({"fc1.lora_A": torch.zeros(2, 10)}, str(weights))
    import hashlib

    _edit_config(directory, lambda m: m.update(weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest()))
    with pytest.raises(ValueError) as err:
        mma.load_adapter(MLP(), directory)
    _names(err, str(weights), "tensors do not match the adapter built from its config")


def test_adapter_config_with_an_unknown_method(tmp_path):
    _, directory = _saved(tmp_path)
    path = _edit_config(directory, lambda m: m["config"].update(method="dora"))
    with pytest.raises(ValueError) as err:
        mma.load_adapter(MLP(), directory)
    _names(err, str(path), "field 'config'", "field 'method': unknown adapter method 'dora'", "registered methods")


def test_adapter_config_with_an_unknown_field(tmp_path):
    _, directory = _saved(tmp_path)
    path = _edit_config(directory, lambda m: m["config"].update(rank=4))
    with pytest.raises(ValueError) as err:
        mma.load_adapter(MLP(), directory)
    _names(err, str(path), "unknown field(s) ['rank'] for method 'lora'", "known fields")


def test_adapter_config_field_of_the_wrong_type(tmp_path):
    """Regression: "train_norms": "false" was accepted, and a non-empty string is true: norms were trained."""
    _, directory = _saved(tmp_path)
    path = _edit_config(directory, lambda m: m["config"].update(train_norms="false"))
    with pytest.raises(ValueError) as err:
        mma.load_adapter(MLP(), directory)
    _names(err, str(path), "field 'train_norms' = 'false'; expected true/false")


def test_adapter_config_bad_json(tmp_path):
    _, directory = _saved(tmp_path)
    (directory / CONFIG_NAME).write_text('{"name": "a", "config": {')
    with pytest.raises(ValueError) as err:
        mma.load_adapter(MLP(), directory)
    _names(err, str(directory / CONFIG_NAME), "not valid JSON")


def test_adapter_config_with_a_mistyped_top_level_field(tmp_path):
    """Regression: a string format_version raised TypeError ('>' between str and int), naming nothing."""
    _, directory = _saved(tmp_path)
    path = _edit_config(directory, lambda m: m.update(format_version="2"))
    with pytest.raises(ValueError) as err:
        mma.load_adapter(MLP(), directory)
    _names(err, str(path), "field 'format_version'", "expected an integer")
    path = _edit_config(directory, lambda m: m.update(format_version=1, fingerprint=["fc1"]))
    with pytest.raises(ValueError) as err:
        mma.load_adapter(MLP(), directory)
    _names(err, str(path), "field 'fingerprint'", "expected an object")


def _state(model):
    return {k: v.clone() for k, v in mio.adapter_state(model, "a")[0].items()}


@pytest.mark.parametrize("fail_in", ["weights", "config"])
def test_failed_save_over_an_existing_adapter_keeps_it_loadable(tmp_path, monkeypatch, fail_in):
    """Regression (fail_in="config"): the new weights were already in place when writing the config failed, so
    the old config's checksum no longer matched and the previous adapter could not be loaded."""
    first, directory = _saved(tmp_path, seed=0)
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    second = _model(seed=1)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if fail_in == "weights":  # the weights' temporary file is written, then syncing it fails
        monkeypatch.setattr(mio.os, "fsync", boom)
    else:
        real_replace = mio.os.replace

        def replace(src, dst):
            if str(dst).endswith(CONFIG_NAME):
                boom()
            return real_replace(src, dst)

        monkeypatch.setattr(mio.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        mma.save_adapter(second, "a", directory)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # no temporary files left either
    fresh = MLP()
    mma.load_adapter(fresh, directory)
    for key, value in _state(first).items():
        assert torch.equal(_state(fresh)[key], value)


def test_results_of_another_run_are_not_replaced(tmp_path):
    from mmadapters.eval.results_schema import build_results, read_results, write_results

    def results(lr):
        return build_results(dataset="toy", model="tiny", pretrained=None, task="zeroshot_classification",
                             metrics={"acc1": 0.5}, counts={"total": 2, "evaluated": 2, "skipped": 0},
                             settings={"lr": lr}, timings={"total_s": 1.0})

    path = tmp_path / "results.json"
    write_results(path, results(0.1))
    before = path.read_bytes()
    with pytest.raises(FileExistsError) as err:
        write_results(path, results(0.2))
    _names(err, str(path), "holds the results of a different run", "--overwrite")
    assert path.read_bytes() == before and read_results(path)["settings"] == {"lr": 0.1}
    write_results(path, results(0.1))  # the same run may rewrite its own file
    write_results(path, results(0.2), overwrite=True)
    assert read_results(path)["settings"] == {"lr": 0.2}
