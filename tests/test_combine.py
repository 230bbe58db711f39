"""Combining adapters: exact LoRA combination, weight-space soups, selection from checkpoints, checkpoint dirs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from toys import LORA_TARGETS, POINT_TARGETS, make_toy, toy_input

import mmadapters as mma
from mmadapters.io import load_adapters, save_adapters


def _perturb(model, name, seed, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mma.adapter_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _out(model, active, x):
    mma.set_active(model, active)
    with torch.no_grad():
        return model(x)


def _two_loras(toy):
    model = make_toy(toy)
    t = LORA_TARGETS[toy]
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, alpha=4, target_modules=t, train_biases="adapted"))
    mma.add_adapter(model, "b", mma.LoRAConfig(r=3, alpha=5, rslora=True, gate=True, target_modules=t))
    _perturb(model, "a", 1)
    _perturb(model, "b", 2)
    return model


@pytest.mark.parametrize("toy", ["mlp", "transformer", "conv"])
def test_lora_average_is_the_exact_weighted_sum_of_deltas(toy):
    model = _two_loras(toy)
    x = toy_input(toy)
    weights = [0.3, -1.2]
    mma.average_adapters(model, ["a", "b"], weights, "c")
    config = mma.get_config(model, "c")
    assert config.r == 5 and config.scaling == 1.0 and not config.gate and config.train_biases == "adapted"
    expected = _out(model, mma.Average("a", "b", weights=weights), x)  # LoRA is linear: Average is exact here
    torch.testing.assert_close(_out(model, "c", x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_out(model, "a", x), expected, atol=1e-3)
    # and the merged weights: W + sum_i w_i dW_i
    mma.set_active(model, "c")
    mma.merge(model)
    merged_c = {k: v.clone() for k, v in model.state_dict().items()}
    mma.unmerge(model)
    mma.set_active(model, mma.Average("a", "b", weights=weights))
    mma.merge(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged_c[k], v, rtol=1e-5, atol=1e-6, msg=k)
    mma.unmerge(model)


def test_lora_average_matches_delta_weights_and_rank_truncation_is_best():
    model = _two_loras("mlp")
    ua, ub = (model.fc1.adapters[n]["lora"] for n in ("a", "b"))
    delta = 0.5 * ua.delta_weight() + 0.5 * float(ub.gate.detach()) * ub.delta_weight()
    mma.average_adapters(model, ["a", "b"], None, "exact")  # None: uniform weights
    torch.testing.assert_close(model.fc1.adapters["exact"]["lora"].delta_weight(), delta, rtol=1e-5, atol=1e-6)
    s = torch.linalg.svdvals(delta.double())
    mma.average_adapters(model, ["a", "b"], [0.5, 0.5], "r2", rank=2)
    assert mma.get_config(model, "r2").r == 2
    approx = model.fc1.adapters["r2"]["lora"].delta_weight()
    err = torch.linalg.norm((approx - delta).double())
    torch.testing.assert_close(err, s[2:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-6)  # Eckart-Young optimum
    mma.average_adapters(model, ["a", "b"], [0.5, 0.5], "r5", rank=5)  # full rank: exact again
    x = toy_input("mlp")
    torch.testing.assert_close(_out(model, "r5", x), _out(model, "exact", x), rtol=1e-5, atol=1e-5)
    mma.average_adapters(model, ["a", "b"], [0.5, 0.5], "r30", rank=30)  # past the matrix rank: zero-padded
    torch.testing.assert_close(_out(model, "r30", x), _out(model, "exact", x), rtol=1e-5, atol=1e-5)


def test_lora_truncation_on_conv_and_embedding_shapes():
    for toy in ("conv", "transformer"):
        model = _two_loras(toy)
        x = toy_input(toy)
        mma.average_adapters(model, ["a", "b"], [1.0, 1.0], "full", rank=5)
        torch.testing.assert_close(_out(model, "full", x), _out(model, mma.Average("a", "b", weights=[1.0, 1.0]), x),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [
    mma.BottleneckConfig(bottleneck_dim=4, pre_norm=True, target_modules=POINT_TARGETS["mlp"]),
    mma.CompacterConfig.compacter(bottleneck_dim=4, phm_dim=2, target_modules=POINT_TARGETS["mlp"]),
], ids=["bottleneck", "compacter"])
def test_soup_averages_parameters(config):
    model = make_toy("mlp")
    for i, n in enumerate(["a", "b", "c"]):
        mma.add_adapter(model, n, config)
        _perturb(model, n, i)
    weights = [0.2, 0.3, 0.5]
    mma.average_adapters(model, ["a", "b", "c"], weights, "soup")
    src = [mma.adapter_parameters(model, n) for n in ("a", "b", "c")]
    soup = mma.adapter_parameters(model, "soup")
    assert soup.keys() == src[0].keys()
    for k, p in soup.items():
        torch.testing.assert_close(p, sum(w * s[k] for w, s in zip(weights, src, strict=True)), rtol=1e-6, atol=1e-7)
        assert all(p is not s[k] for s in src)  # its own copies
    x = toy_input("mlp")
    # a weight-space average is not the average of outputs (that is mma.Average)
    assert not torch.allclose(_out(model, "soup", x), _out(model, mma.Average("a", "b", "c", weights=weights), x),
                              atol=1e-4)


def test_hyperformer_soup_keeps_the_shared_hypernetwork():
    model = make_toy("mlp")
    config = mma.HyperAdapterConfig(task_embedding_dim=4, layer_embedding_dim=4, hidden_dim=8, bottleneck_dim=4,
                                    target_modules=POINT_TARGETS["mlp"])
    for i, n in enumerate(["a", "b"]):
        mma.add_adapter(model, n, config)
        _perturb(model, n, i)
    before = {k: v.clone() for k, v in mma.adapter_parameters(model, "a").items()}
    mma.average_adapters(model, ["a", "b"], [2.0, 1.0], "soup")  # weights summing to 3 would scale a shared net
    pa, pb, soup = (mma.adapter_parameters(model, n) for n in ("a", "b", "soup"))
    for k, v in before.items():
        assert torch.equal(pa[k], v), f"{k} of adapter 'a' changed"
        if pa[k] is pb[k]:
            assert soup[k] is pa[k]
        else:
            torch.testing.assert_close(soup[k], 2.0 * pa[k] + 1.0 * pb[k])
    assert any(pa[k] is pb[k] for k in pa) and any(pa[k] is not pb[k] for k in pa)


def test_average_errors_leave_the_model_unchanged():
    model = make_toy("mlp")
    mma.add_adapter(model, "l1", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    mma.add_adapter(model, "l2", mma.LoRAConfig(r=2, target_modules=["fc2"]))
    mma.add_adapter(model, "b1", mma.BottleneckConfig(bottleneck_dim=4, target_modules=["fc1"]))
    mma.add_adapter(model, "b2", mma.BottleneckConfig(bottleneck_dim=6, target_modules=["fc1"]))
    names = mma.adapter_names(model)
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        mma.average_adapters(model, ["l1", "zz"], None, "new")
    with pytest.raises(ValueError, match="different methods.*'l1': lora.*'b1': bottleneck"):
        mma.average_adapters(model, ["l1", "b1"], None, "new")
    with pytest.raises(ValueError, match="'l1' and 'l2' adapt different modules.*'fc1'"):
        mma.average_adapters(model, ["l1", "l2"], None, "new")
    with pytest.raises(ValueError, match="'b1' and 'b2' differ in 'bottleneck_dim' \\(4 vs 6\\).*mma.Average"):
        mma.average_adapters(model, ["b1", "b2"], None, "new")
    with pytest.raises(ValueError, match="2 adapters but 3 weights"):
        mma.average_adapters(model, ["l1", "l2"], [1, 2, 3], "new")
    with pytest.raises(ValueError, match="already exists"):
        mma.average_adapters(model, ["b1"], None, "b2")
    with pytest.raises(ValueError, match="'names' is empty"):
        mma.average_adapters(model, [], None, "new")
    with pytest.raises(ValueError, match="repeats"):
        mma.average_adapters(model, ["b1", "b1"], None, "new")
    with pytest.raises(ValueError, match="'rank' applies to LoRA only"):
        mma.average_adapters(model, ["b1"], None, "new", rank=2)
    with pytest.raises(ValueError, match="'rank' must be a positive integer"):
        mma.average_adapters(model, ["l1"], None, "new", rank=0)
    with pytest.raises(ValueError, match="'weights' must be finite"):
        mma.average_adapters(model, ["l1"], [float("nan")], "new")
    assert mma.adapter_names(model) == names


# -- checkpoint directories and selection ------------------------------------------------------------------

ADAPTERS = {"en": mma.LoRAConfig(r=2, target_modules=["fc1", "fc2"]),
            "de": mma.LoRAConfig(r=3, target_modules=["fc2"]),
            "fr": mma.BottleneckConfig(bottleneck_dim=4, target_modules=["@ffn_out"])}


def _training_run(tmp_path, steps=3):
    """Three 'steps' of a run: each adapter's weights move, each step is saved as a checkpoint directory.

    Returns (model at the last step, {step: {adapter: output}})."""
    model = make_toy("mlp")
    for n, c in ADAPTERS.items():
        mma.add_adapter(model, n, c)
    x = toy_input("mlp")
    outputs = {}
    for step in range(1, steps + 1):
        for i, n in enumerate(ADAPTERS):
            _perturb(model, n, seed=10 * step + i)
        save_adapters(model, tmp_path / f"step{step}")
        outputs[step] = {n: _out(model, n, x) for n in ADAPTERS}
    return model, outputs


def test_save_and_load_adapters_round_trip(tmp_path):
    model, outputs = _training_run(tmp_path, steps=1)
    ckpt = tmp_path / "step1"
    assert sorted(p.name for p in ckpt.iterdir()) == ["de", "en", "fr"]
    fresh = make_toy("mlp")
    assert load_adapters(fresh, ckpt) == ["de", "en", "fr"]
    x = toy_input("mlp")
    for n in ADAPTERS:
        torch.testing.assert_close(_out(fresh, n, x), outputs[1][n], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"already has adapter\(s\) \['en'\]; pass replace=True"):
        load_adapters(fresh, ckpt, ["en"])
    with pytest.raises(FileNotFoundError, match=r"no adapter 'xx' \(expected .*step1/xx/adapter_config.json\); "
                                                r"this checkpoint has \['de', 'en', 'fr'\]"):
        load_adapters(make_toy("mlp"), ckpt, ["en", "xx"])
    only = make_toy("mlp")
    assert load_adapters(only, ckpt, ["fr"]) == ["fr"] and mma.adapter_names(only) == ["fr"]
    save_adapters(model, ckpt, ["en"], bits=8)  # replaces one subdirectory, leaves the others
    assert json.loads((ckpt / "en" / "adapter_config.json").read_text())["quantization"]["bits"] == 8
    assert "quantization" not in json.loads((ckpt / "de" / "adapter_config.json").read_text())
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_select_from_checkpoints_takes_each_adapter_from_its_step(tmp_path):
    model, outputs = _training_run(tmp_path)
    best = {"en": 1, "de": 3, "fr": 2}  # e.g. the step where each language's dev WER was best
    sources = {"en": tmp_path / "step1", "de": tmp_path / "step3" / "de", "fr": str(tmp_path / "step2")}
    x = toy_input("mlp")
    mma.set_active(model, mma.Stack("en", "fr"))
    result = mma.select_from_checkpoints(sources, model, output_dir=tmp_path / "merged")
    assert result is model and sorted(mma.adapter_names(model)) == ["de", "en", "fr"]
    assert mma.get_active(model) == mma.Stack("en", "fr")  # replaced adapters keep the active composition
    for n, step in best.items():
        torch.testing.assert_close(_out(model, n, x), outputs[step][n], rtol=0, atol=0)
    merged = tmp_path / "merged"
    assert sorted(p.name for p in merged.iterdir()) == ["de", "en", "fr", "selection.json"]
    record = json.loads((merged / "selection.json").read_text())["adapters"]
    assert record["en"]["source"] == str((tmp_path / "step1" / "en").resolve())
    for n, step in best.items():
        assert (merged / n / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / f"step{step}" / n / "adapter_model.safetensors").read_bytes()
    fresh = make_toy("mlp")
    load_adapters(fresh, merged)
    for n, step in best.items():
        torch.testing.assert_close(_out(fresh, n, x), outputs[step][n], rtol=0, atol=0)
    # output only: no model needed
    out = mma.select_from_checkpoints({"en": tmp_path / "step2"}, output_dir=tmp_path / "only_en")
    assert out == tmp_path / "only_en" and sorted(p.name for p in out.iterdir()) == ["en", "selection.json"]
    # overwrite replaces an assembled checkpoint
    mma.select_from_checkpoints({"de": tmp_path / "step1"}, output_dir=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["de", "selection.json"]


def test_select_from_checkpoints_errors(tmp_path):
    model, _ = _training_run(tmp_path, steps=2)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="give a model to load into, an output_dir to write, or both"):
        mma.select_from_checkpoints({"en": tmp_path / "step1"})
    with pytest.raises(ValueError, match="non-empty mapping"):
        mma.select_from_checkpoints({}, model)
    with pytest.raises(FileNotFoundError, match=r"step1: no adapter 'es' .*this checkpoint has \['de', 'en', 'fr'\]"):
        mma.select_from_checkpoints({"en": tmp_path / "step2", "es": tmp_path / "step1"}, model)
    with pytest.raises(FileNotFoundError, match=r"nowhere: checkpoint not found \(sources\['en'\]\)"):
        mma.select_from_checkpoints({"en": tmp_path / "nowhere"}, model)
    with pytest.raises(ValueError, match=r"step1/de/adapter_config.json: field 'name' is 'de', but it was selected as "
                                         r"adapter 'en'"):
        mma.select_from_checkpoints({"en": tmp_path / "step1" / "de"}, model)
    weights = tmp_path / "step2" / "fr" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="step2/fr/adapter_model.safetensors: checksum differs"):
        mma.select_from_checkpoints({"en": tmp_path / "step1", "fr": tmp_path / "step2"}, model,
                                    output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    other = copy.deepcopy(make_toy("mlp", width=24))
    with pytest.raises(ValueError, match="shape mismatch at module 'fc1'"):
        mma.select_from_checkpoints({"en": tmp_path / "step1"}, other)
    for k, v in model.state_dict().items():  # every failure above happened before the model was touched
        assert torch.equal(v, snapshot[k]), k
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="busy: already exists and is not empty; pass overwrite=True"):
        mma.select_from_checkpoints({"en": tmp_path / "step1"}, output_dir=tmp_path / "busy")
    with pytest.raises(FileExistsError, match=r"busy: holds \['notes.txt'\], which are not adapter checkpoints"):
        mma.select_from_checkpoints({"en": tmp_path / "step1"}, output_dir=tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_load_adapter_replace_keeps_the_old_one_when_the_new_one_does_not_fit(tmp_path):
    model, outputs = _training_run(tmp_path, steps=1)
    x = toy_input("mlp")
    # a checkpoint of 'en' built for a different target set: fits the base, so replace succeeds
    donor = make_toy("mlp")
    mma.add_adapter(donor, "en", mma.LoRAConfig(r=1, target_modules=["fc1"]))
    mma.save_adapter(donor, "en", tmp_path / "en_small")
    mma.set_active(model, "de")
    mma.load_adapter(model, tmp_path / "en_small", replace=True)
    assert mma.get_config(model, "en").r == 1 and mma.get_active(model) == "de"
    # a checkpoint whose tensors do not match its config fails while the old adapter is still in place
    meta = json.loads((tmp_path / "step1" / "fr" / "adapter_config.json").read_text())
    meta["config"]["bottleneck_dim"] = 5
    (tmp_path / "step1" / "fr" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"builds tensor 'fc2.bottleneck.down.weight' of shape \[5, 8\], but .* holds \[4, 8\]"):
        mma.load_adapter(model, tmp_path / "step1" / "fr", replace=True)
    torch.testing.assert_close(_out(model, "fr", x), outputs[1]["fr"], rtol=0, atol=0)
