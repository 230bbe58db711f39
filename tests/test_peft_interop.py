"""peft interop for LoRA: our adapters load in peft with the same outputs, peft's load here, round trips are exact."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from toys import LORA_TARGETS, make_toy, toy_input

import mmadapters as mma
from mmadapters.io import adapter_state
from mmadapters.peft_interop import peft_doubles_mha_out_proj

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft warns about custom models and MHA merges

# peft's target_modules for the same modules as LORA_TARGETS (it has no adapter points)
PEFT_TARGETS = {"mlp": ["fc1", "fc2"], "conv": ["conv1", "conv2"], "transformer": ["attn", "fc1", "embed"]}


def _randomize(params) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _ours(kind: str, **lora):
    base = make_toy(kind)
    model = copy.deepcopy(base)
    mma.add_adapter(model, "a", mma.LoRAConfig(target_modules=LORA_TARGETS[kind], **lora))
    _randomize(mma.adapter_parameters(model, "a").values())  # random, non-zero B
    return base, model


def _peft_trained(kind: str, **lora):
    base = make_toy(kind)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=PEFT_TARGETS[kind], **lora))
    _randomize(p for n, p in pm.named_parameters() if "lora_" in n)
    return base, pm


@pytest.mark.parametrize("kind,lora", [
    ("mlp", dict(r=2, alpha=6, dropout=0.1)),
    ("conv", dict(r=3, alpha=4, rslora=True)),
    ("transformer", dict(r=2, alpha=5.5)),  # nn.MultiheadAttention + Linear + Embedding
])
def test_export_loads_in_peft_with_the_same_outputs_and_keys(kind, lora, tmp_path):
    base, model = _ours(kind, **lora)
    x = toy_input(kind)
    mma.export_peft(model, "a", tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_outputs(peft_model, x), _outputs(model, x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_outputs(base, x), _outputs(model, x))  # the adapter does something
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora) == (
        lora["r"], lora["alpha"], lora.get("dropout", 0.0), lora.get("rslora", False))
    # the same key names and shapes that peft itself writes for these modules
    _, theirs = _peft_trained(kind, r=lora["r"])
    theirs.save_pretrained(tmp_path / "theirs")
    ours_t, theirs_t = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in ours_t.items()} == {k: v.shape for k, v in theirs_t.items()}


@pytest.mark.parametrize("kind,lora", [
    ("mlp", dict(r=2, lora_alpha=6, lora_dropout=0.1)),
    ("conv", dict(r=3, lora_alpha=4, use_rslora=True)),
    ("transformer", dict(r=2, lora_alpha=8, init_lora_weights="gaussian")),
])
def test_peft_saved_adapter_imports_with_the_same_outputs(kind, lora, tmp_path):
    base, pm = _peft_trained(kind, **lora)
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    assert mma.import_peft(model, tmp_path, "p") == "p"
    x = toy_input(kind)
    torch.testing.assert_close(_outputs(model, x), _outputs(pm, x), rtol=1e-5, atol=1e-5)
    config = mma.get_config(model, "p")
    assert (config.r, config.alpha, config.dropout, config.rslora) == (
        lora["r"], lora["lora_alpha"], lora.get("lora_dropout", 0.0), lora.get("use_rslora", False))
    assert sorted(config.target_modules) == sorted(PEFT_TARGETS[kind])  # peft's patterns, same modules here


def test_pickled_adapter_model_bin_imports(tmp_path):
    base, pm = _peft_trained("mlp", r=2, lora_alpha=4)
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    model = copy.deepcopy(base)
    mma.import_peft(model, tmp_path, "p")
    x = toy_input("mlp")
    torch.testing.assert_close(_outputs(model, x), _outputs(pm, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "conv", "transformer"])
def test_export_then_import_gives_identical_tensors(kind, tmp_path):
    base, model = _ours(kind, r=2, alpha=3)
    mma.export_peft(model, "a", tmp_path)
    back = copy.deepcopy(base)
    mma.import_peft(back, tmp_path, "a")
    want, fingerprint = adapter_state(model, "a")
    got, fingerprint_back = adapter_state(back, "a")
    assert fingerprint == fingerprint_back and want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    torch.testing.assert_close(_outputs(back, toy_input(kind)), _outputs(model, toy_input(kind)), rtol=0, atol=0)


def test_gate_folds_into_lora_b(tmp_path):
    base, model = _ours("transformer", r=2, alpha=2, gate=True)
    for unit in (m.adapters["a"]["lora"] for m in model.modules() if isinstance(m, mma.AdaptedModule)):
        unit.gate.data.fill_(0.7)
    mma.export_peft(model, "a", tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = toy_input("transformer")
    torch.testing.assert_close(_outputs(peft_model, x), _outputs(model, x), rtol=1e-5, atol=1e-5)


def test_peft_mha_out_proj_quirk_matches_what_we_compensate():
    """peft's nn.MultiheadAttention layer adds the out_proj delta twice (huggingface/peft PR #3774). When a peft
    release fixes it, this fails: set mmadapters.peft_interop.PEFT_MHA_FIX_VERSION to that release."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    _randomize(p for n, p in pm.named_parameters() if "lora_" in n)
    layer = pm.base_model.model[0]
    ref = copy.deepcopy(base[0])
    with torch.no_grad():
        ref.in_proj_weight += layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        out = layer.base_layer.out_proj
        delta_out = out.lora_B["default"].weight @ out.lora_A["default"].weight
        h = torch.randn(2, 3, 8)
        got = layer(h, h, h, need_weights=False)[0]
        ref.out_proj.weight += delta_out
        once = ref(h, h, h, need_weights=False)[0]
        ref.out_proj.weight += delta_out
        twice = ref(h, h, h, need_weights=False)[0]
    doubled = torch.allclose(got, twice, atol=1e-5)
    assert doubled or torch.allclose(got, once, atol=1e-5)
    assert doubled == peft_doubles_mha_out_proj(peft.__version__)


def test_open_clip_tiny_vit_both_ways(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    base = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2,
                                                   mlp_ratio=2, output_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    model = copy.deepcopy(base)  # LoRA on nn.MultiheadAttention, the MLP input and the patch conv
    mma.add_adapter(model, "a", mma.LoRAConfig(r=4, alpha=8, target_modules=["attn", "mlp.c_fc", "conv1"]))
    _randomize(mma.adapter_parameters(model, "a").values())
    mma.export_peft(model, "a", tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_outputs(peft_model, x), _outputs(model, x), rtol=1e-5, atol=1e-5)

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn", "c_proj"]))
    _randomize(p for n, p in pm.named_parameters() if "lora_" in n)
    pm.save_pretrained(tmp_path / "theirs")
    back = copy.deepcopy(base)
    mma.import_peft(back, tmp_path / "theirs", "p")
    torch.testing.assert_close(_outputs(back, x), _outputs(pm, x), rtol=1e-5, atol=1e-5)


def test_timm_vit_both_ways(tmp_path):
    vit = pytest.importorskip("timm.models.vision_transformer")
    torch.manual_seed(0)  # vit_tiny's architecture, narrower and shallower (random init, no download)
    base = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    model = copy.deepcopy(base)  # "proj" also matches patch_embed.proj, a strided Conv2d
    mma.add_adapter(model, "a", mma.LoRAConfig(r=4, alpha=8, target_modules=["qkv", "proj", "fc2"]))
    _randomize(mma.adapter_parameters(model, "a").values())
    mma.export_peft(model, "a", tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(_outputs(peft_model, x), _outputs(model, x), rtol=1e-5, atol=1e-5)

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(qkv|fc1)"))
    _randomize(p for n, p in pm.named_parameters() if "lora_" in n)
    pm.save_pretrained(tmp_path / "theirs")
    back = copy.deepcopy(base)
    mma.import_peft(back, tmp_path / "theirs", "p")
    torch.testing.assert_close(_outputs(back, x), _outputs(pm, x), rtol=1e-5, atol=1e-5)
    assert mma.get_config(back, "p").target_modules == r"re:.*\.(qkv|fc1)"  # a peft regex stays a regex


def test_a_root_name_that_is_also_a_nested_suffix_exports_as_an_exact_regex(tmp_path):
    base = nn.Module()
    base.fc1, base.sub = nn.Linear(4, 4), nn.Module()
    base.sub.fc1 = nn.Linear(4, 4)
    model = copy.deepcopy(base)
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["re:fc1"]))  # the root fc1 only
    _randomize(mma.adapter_parameters(model, "a").values())
    mma.export_peft(model, "a", tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "^(?:fc1)$"
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).base_model.model
    assert not hasattr(peft_model.sub.fc1, "lora_A")  # a list ["fc1"] would have adapted sub.fc1 too
    x = torch.randn(3, 4)
    torch.testing.assert_close(_outputs(peft_model.fc1, x), _outputs(model.fc1, x), rtol=1e-5, atol=1e-5)
    back = copy.deepcopy(base)
    mma.import_peft(back, tmp_path, "a")
    assert mma.get_config(back, "a").target_modules == "re:^(?:fc1)$"
    assert isinstance(back.fc1, mma.AdaptedModule) and not isinstance(back.sub.fc1, mma.AdaptedModule)


# -- what cannot cross ----------------------------------------------------------------------------------

def test_export_refuses_non_lora_and_unrepresentable_lora(tmp_path):
    model = make_toy("transformer")
    mma.add_adapter(model, "b", mma.BottleneckConfig(bottleneck_dim=4, target_modules=["@ffn_out"]))
    with pytest.raises(ValueError, match=r"adapter 'b' is a 'bottleneck' adapter.*LoRA adapters only"):
        mma.export_peft(model, "b", tmp_path)
    mma.add_adapter(model, "o", mma.LoRAConfig(r=2, target_modules=["attn.out_proj"]))
    with pytest.raises(ValueError, match=r"adapter 'o' at module 'blocks.0.attn': LoRA on its out_proj alone"):
        mma.export_peft(model, "o", tmp_path)
    mma.add_adapter(model, "n", mma.LoRAConfig(r=2, target_modules=["fc1"], train_norms=True))
    with pytest.raises(ValueError, match=r"adapter 'n' has train_norms=True"):
        mma.export_peft(model, "n", tmp_path)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    mma.add_adapter(conv, "d", mma.LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"adapter 'd' at module '0': a dilated convolution"):
        mma.export_peft(conv, "d", tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()  # nothing half-written


def _peft_dir(tmp_path, **config_changes):
    """A valid peft LoRA directory for the MLP toy, with fields of adapter_config.json overridden."""
    _, pm = _peft_trained("mlp", r=2, lora_alpha=4)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return tmp_path


@pytest.mark.parametrize("changes,message", [
    (dict(use_dora=True), r"field 'use_dora' is True; DoRA"),
    (dict(bias="all"), r"field 'bias' is 'all'; expected 'none'"),
    (dict(peft_type="IA3"), r"field 'peft_type' is 'IA3'"),
    (dict(rank_pattern={"fc2": 4}), r"field 'rank_pattern' gives modules their own r \({'fc2': 4}\)"),
    (dict(init_lora_weights="pissa"), r"field 'init_lora_weights' is 'pissa'"),
    (dict(modules_to_save=["norm"]), r"field 'modules_to_save'"),
])
def test_import_refuses_unsupported_peft_options_by_field(tmp_path, changes, message):
    directory = _peft_dir(tmp_path, **changes)
    model = make_toy("mlp")
    with pytest.raises(ValueError, match=r"adapter_config.json: " + message):
        mma.import_peft(model, directory, "p")
    assert mma.adapter_names(model) == []


def test_fan_in_fan_out_on_linear_layers_is_harmless_but_other_layer_types_are_named(tmp_path):
    directory = _peft_dir(tmp_path, fan_in_fan_out=True)  # peft itself resets it for nn.Linear targets
    model = make_toy("mlp")
    mma.import_peft(model, directory, "p")
    assert mma.adapter_names(model) == ["p"]
    save_file({"base_model.model.norm.lora_A.weight": torch.ones(2, 20), "base_model.model.norm.lora_B.weight":
               torch.ones(20, 2)}, directory / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"module 'norm' is a LayerNorm \(supported: .*\(fan_in_fan_out=True"):
        mma.import_peft(make_toy("mlp"), directory, "p")


def test_import_refuses_dora_weights_rank_mismatch_and_missing_files(tmp_path):
    directory = _peft_dir(tmp_path)
    weights = load_file(directory / "adapter_model.safetensors")
    save_file({**weights, "base_model.model.fc1.lora_magnitude_vector": torch.ones(20)},
              directory / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"'base_model.model.fc1.lora_magnitude_vector' cannot be imported: a DoRA"):
        mma.import_peft(make_toy("mlp"), directory, "p")
    save_file({**weights, "base_model.model.fc1.lora_A.weight": torch.ones(3, 10)}, directory / "adapter_model.safetensors")
    model = make_toy("mlp")
    with pytest.raises(ValueError, match=r"shape \[3, 10\], expected \[2, 10\] \(rank 3 != field 'r' = 2\)"):
        mma.import_peft(model, directory, "p")
    assert mma.adapter_names(model) == []  # a failed import leaves no half-loaded adapter
    save_file({"base_model.model.nope.lora_A.weight": torch.ones(2, 2)}, directory / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"is for module 'nope', which this MLP does not have"):
        mma.import_peft(model, directory, "p")
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors or adapter_model.bin"):
        mma.import_peft(model, directory, "p")
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json"):
        mma.import_peft(model, tmp_path / "missing", "p")


def test_catastrophic_target_modules_regex_is_stopped_not_waited_for(tmp_path, monkeypatch):
    """A peft target_modules string that backtracks exponentially (in Python's re) on long module names hung
    import_peft for > 60 s. Patterns now run in the `regex` engine, under a timeout."""
    import time

    from mmadapters import targets

    directory = _peft_dir(tmp_path)
    cfg_path = directory / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = r"((\w+\.?)+)+X"
    cfg_path.write_text(json.dumps(cfg))
    model = make_toy("mlp")
    t0 = time.perf_counter()
    assert mma.import_peft(model, directory, "p") == "p"  # the weights name the modules; the pattern is not kept
    assert time.perf_counter() - t0 < 15
    assert mma.get_config(model, "p").target_modules == ["fc1", "fc2"]

    def too_slow(*args, **kwargs):
        raise TimeoutError("regex timed out")

    monkeypatch.setattr(targets.regex, "fullmatch", too_slow)
    with pytest.raises(ValueError, match=r"target pattern 're:x\+' took over 1 s on module name .*catastrophic"):
        mma.add_adapter(make_toy("mlp"), "q", mma.LoRAConfig(target_modules="re:x+"))
