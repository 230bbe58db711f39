"""Target resolution, config (de)serialization, and the save format's guarantees."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from toys import make_toy, toy_input

import mmadapters as mma
from mmadapters.targets import resolve_targets


def _names(model, patterns):
    return [t.name for t in resolve_targets(model, patterns)]


def test_pattern_kinds_resolve_like_peft_names_plus_globs_regexes_points():
    model = make_toy("transformer")
    assert _names(model, "fc1") == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]  # suffix at a dot boundary
    assert _names(model, "blocks.1.mlp.fc1") == ["blocks.1.mlp.fc1"]  # exact
    assert _names(model, "blocks.*.mlp.fc?") == [f"blocks.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)]
    assert _names(model, r"re:blocks\.0\..*fc\d") == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert _names(model, "@ffn_out") == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    with pytest.raises(ValueError, match="pattern 'c1' matched no module of TinyTransformer"):
        _names(model, "c1")
    with pytest.raises(ValueError, match=r"adapter point '@nope' is not declared.*'@attn_out'"):
        _names(model, "@nope")
    with pytest.raises(ValueError, match="target_modules is not set.*'@ffn_out'"):
        _names(model, None)


def test_names_stay_logical_after_wrapping_and_points_declared_on_submodules():
    outer = nn.Module()
    outer.tower = make_toy("transformer")
    assert _names(outer, "@ffn_out") == ["tower.blocks.0.mlp.fc2", "tower.blocks.1.mlp.fc2"]
    mma.add_adapter(outer, "a", mma.LoRAConfig(r=2, target_modules=["@ffn_out"]))
    assert _names(outer, "@ffn_out") == ["tower.blocks.0.mlp.fc2", "tower.blocks.1.mlp.fc2"]
    mma.add_adapter(outer, "b", mma.BottleneckConfig(bottleneck_dim=2, target_modules=["@ffn_out"]))
    assert type(outer.tower.blocks[0].mlp.fc2).__name__ == "AdaptedModule"  # one wrapper, two adapters
    assert sorted(outer.tower.blocks[0].mlp.fc2.adapters) == ["a", "b"]
    assert outer.tower.blocks[0].mlp.fc2.in_features == 64  # attributes fall through to the base


def test_multihead_attention_out_proj_is_lifted_to_the_attention_module():
    model = make_toy("transformer")
    targets = resolve_targets(model, ["attn.out_proj"])
    assert [(t.name, t.parts) for t in targets] == [("blocks.0.attn", {"out_proj"}), ("blocks.1.attn", {"out_proj"})]
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["attn.out_proj"]))
    unit = model.blocks[0].attn.adapters["a"]["lora"]
    assert unit.in_proj is None and unit.out_proj is not None
    with torch.no_grad():
        unit.out_proj.lora_B.weight.normal_()  # (a constant fill would be removed by the LayerNorms)
    x = toy_input("transformer")
    mma.set_active(model, None)
    y0 = model(x)
    mma.set_active(model, "a")
    assert not torch.allclose(model(x), y0)  # the delta reaches the attention's computation


def test_prompt_tokens_prepend_and_replace():
    emb = nn.Sequential(nn.Embedding(10, 8))
    tokens = torch.randint(0, 10, (2, 5))
    mma.add_adapter(emb, "p", mma.PromptConfig(num_tokens=3, position=1, target_modules=["0"]))
    out = emb(tokens)
    assert out.shape == (2, 8, 8)
    prompts = emb[0].adapters["p"]["prompt"].tokens()
    torch.testing.assert_close(out[:, 1:4], prompts.expand(2, -1, -1))
    torch.testing.assert_close(out[:, :1], emb[0].base_layer(tokens)[:, :1])
    mma.add_adapter(emb, "r", mma.PromptConfig(num_tokens=2, mode="replace", seq_dim=1, target_modules=["0"]))
    mma.set_active(emb, "r")
    assert emb(tokens).shape == (2, 5, 8)
    with pytest.raises(ValueError, match="not linear|merge"):
        mma.merge(emb)


_config_strategy = st.one_of(
    st.builds(mma.LoRAConfig, r=st.integers(1, 64), alpha=st.floats(0.1, 64), dropout=st.floats(0, 0.9),
              rslora=st.booleans(), target_modules=st.lists(st.text("abc.*", min_size=1, max_size=6), max_size=3),
              train_biases=st.sampled_from(["none", "adapted", "all"]), gate=st.booleans()),
    st.builds(mma.BottleneckConfig, placement=st.sampled_from(["series", "parallel"]),
              bottleneck_dim=st.none() | st.integers(1, 128), activation=st.sampled_from(["relu", "gelu", "identity"]),
              pre_norm=st.booleans(), post_norm=st.booleans(), scaling=st.floats(-4, 4), train_norms=st.booleans()),
    st.builds(mma.CompacterConfig, phm_dim=st.integers(1, 8), factorized_phm=st.booleans(),
              shared_phm_rule=st.booleans(), phm_rank=st.integers(1, 4)),
    st.builds(mma.HyperAdapterConfig, hypernet=st.text("xyz", min_size=1, max_size=4),
              task_embedding_dim=st.integers(1, 64), hidden_dim=st.integers(1, 64)),
    st.builds(mma.PromptConfig, num_tokens=st.integers(1, 50), position=st.integers(0, 3),
              mode=st.sampled_from(["prepend", "replace"]), reparameterize=st.booleans()),
)


@settings(max_examples=150, deadline=None)
@given(_config_strategy)
def test_config_round_trips_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert mma.AdapterConfig.from_dict(data) == config


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\] for method 'lora'"):
        mma.AdapterConfig.from_dict({"method": "lora", "rank": 4})
    with pytest.raises(ValueError, match="field 'method': unknown adapter method 'dora'"):
        mma.AdapterConfig.from_dict({"method": "dora"})
    with pytest.raises(ValueError, match="LoRAConfig.r: expected a positive number"):
        mma.LoRAConfig(r=0)
    with pytest.raises(ValueError, match="BottleneckConfig.placement"):
        mma.BottleneckConfig(placement="sideways")
    with pytest.raises(ValueError, match="adapter name"):
        mma.add_adapter(make_toy("mlp"), "has.dot", mma.LoRAConfig(target_modules=["fc1"]))


def _saved(tmp_path):
    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    return model, mma.save_adapter(model, "a", tmp_path / "a")


def test_save_is_atomic_and_overwrites_cleanly(tmp_path):
    model, d = _saved(tmp_path)
    meta = json.loads((d / "adapter_config.json").read_text())
    assert meta["config"]["method"] == "lora" and meta["library_version"] == mma.__version__
    assert meta["fingerprint"] == {"fc1": {"weight": [20, 10], "bias": [20]}}
    mma.save_adapter(model, "a", d)  # overwrite in place
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files left


def test_load_errors_name_file_and_field(tmp_path):
    model, d = _saved(tmp_path)
    weights = d / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors: checksum differs"):
        mma.load_adapter(make_toy("mlp"), d)
    weights.write_bytes(good)
    cfg = d / "adapter_config.json"
    meta = json.loads(cfg.read_text())
    meta["config"]["method"] = "nonexistent"
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"adapter_config.json: field 'config': field 'method': unknown adapter method"):
        mma.load_adapter(make_toy("mlp"), d)
    cfg.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        mma.load_adapter(make_toy("mlp"), d)
    with pytest.raises(FileNotFoundError, match="adapter config not found"):
        mma.load_adapter(make_toy("mlp"), tmp_path / "missing")


def test_load_onto_a_base_missing_the_module(tmp_path):
    _, d = _saved(tmp_path)
    with pytest.raises(ValueError, match="module 'fc1', which this Sequential does not have"):
        mma.load_adapter(nn.Sequential(nn.Linear(10, 20)), d)


def test_nested_adapters_and_time_major_batch_dim_survive_save_and_load(tmp_path):
    """An adapter on a block and another on a module inside it save and load into a fresh model; a declared
    batch_dim comes back with the adapter, so a loaded adapter routes time-major modules."""
    from torch import nn

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(2))

        def forward(self, x):  # (B, T, D) in, (T, B, D) inside
            h = x.transpose(0, 1)
            for b in self.blocks:
                h = b(h)
            return h.transpose(0, 1)

    def make():
        torch.manual_seed(0)
        m = TimeMajor()
        mma.declare_adapter_points(m, {"block_out": mma.AdapterPoint(["blocks.0", "blocks.1"], dim=6, batch_dim=1),
                                       "inner": mma.AdapterPoint(["blocks.0.0", "blocks.1.0"], batch_dim=1)})
        return m

    model = make()
    mma.add_adapter(model, "outer", mma.BottleneckConfig(bottleneck_dim=3, target_modules=["@block_out"]))
    mma.add_adapter(model, "inner", mma.BottleneckConfig(bottleneck_dim=3, target_modules=["@inner"]))
    with torch.no_grad():
        for n in ("outer", "inner"):
            for p in mma.adapter_parameters(model, n).values():
                p.normal_(0, 0.3)
    mma.save_adapters(model, tmp_path / "ad")
    fresh = make()
    mma.load_adapters(fresh, tmp_path / "ad")
    x = torch.randn(3, 5, 6)
    with torch.no_grad(), mma.route(fresh, ["outer", None, "inner"]):
        y = fresh(x)
    with torch.no_grad(), mma.route(model, ["outer", None, "inner"]):
        ref = model(x)
    torch.testing.assert_close(y, ref)
    mma.set_active(fresh, "inner")
    with torch.no_grad():
        torch.testing.assert_close(y[2:], fresh(x[2:]))
    # files written before targets recorded batch_dim: the model's declared points supply it on load
    import json

    for n in ("outer", "inner"):
        cfg_path = tmp_path / "ad" / n / "adapter_config.json"
        meta = json.loads(cfg_path.read_text())
        for t in meta["targets"]:
            t.pop("batch_dim", None)
        cfg_path.write_text(json.dumps(meta))
    older = make()
    mma.load_adapters(older, tmp_path / "ad")
    with torch.no_grad(), mma.route(older, ["outer", None, "inner"]):
        torch.testing.assert_close(older(x), ref)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os
    import stat

    from mmadapters.io import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert (tmp_path / "f.json").read_bytes() == b"{}" and len(list(tmp_path.iterdir())) == 1
