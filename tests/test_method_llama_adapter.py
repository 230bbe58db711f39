"""LLaMA-Adapter V1/V2: zero-init gated adaptation prompts, unlocked bias/scale/norm, early visual fusion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmadapters as mma
from mmadapters.demo import TinyTransformer, toy_task
from mmadapters.methods import llama_adapter as la
from mmadapters.methods.llama_adapter import LlamaAdapterConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(depth: int = 2) -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer(vocab=16, dim=16, depth=depth, heads=2).eval()


def _tokens(b: int = 3, t: int = 7) -> torch.Tensor:
    return torch.randint(0, 16, (b, t), generator=torch.Generator().manual_seed(1))


def _units(model: nn.Module, name: str = "a") -> list[la.AdaptionPrompt]:
    return [u for w in mma.model.wrappers(model) for u in w.units(name) if isinstance(u, la.AdaptionPrompt)]


def _open_gates(model: nn.Module, value: float = 0.7) -> None:
    with torch.no_grad():
        for u in _units(model):
            u.prompt_gate.fill_(value)


def _perturb(model: nn.Module, name: str = "a", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mma.adapter_parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


V2 = dict(target_modules="@attn", num_prompts=4, bias_scale=["mlp.fc1", "mlp.fc2", "@attn"], train_norms=True,
          visual_dim=6, visual_layers=1)


class _Attn(nn.Module):
    """A bare nn.MultiheadAttention self-attention, optionally causal like CLIP's text tower."""

    def __init__(self, batch_first: bool, causal: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.causal = causal

    def forward(self, x):
        mask = None
        if self.causal:
            n = x.shape[1] if self.attn.batch_first else x.shape[0]
            mask = torch.triu(torch.full((n, n), float("-inf")), 1)
        return self.attn(x, x, x, need_weights=False, attn_mask=mask)[0]


# -- nn.MultiheadAttention -----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first,causal", [(True, False), (False, False), (True, True)])
def test_mha_identity_at_init_then_matches_torch_attention_over_the_prompts(batch_first, causal):
    model = _Attn(batch_first, causal)
    x = torch.randn(2, 5, 8) if batch_first else torch.randn(5, 2, 8)
    y0 = model(x)
    mma.add_adapter(model, "a", LlamaAdapterConfig(target_modules="attn", num_prompts=3))
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)  # the gates start at zero: exactly the base
    (unit,) = _units(model)
    _open_gates(model, 1.0)
    base = model.attn.base_layer
    p = unit.prompts.detach().unsqueeze(0 if batch_first else 1).expand(*((2, -1, -1) if batch_first else (-1, 2, -1)))
    # With all gates at 1 the added term is torch's own attention of x over the prompts, minus out_proj's bias
    # (which the sequence path already added); the causal mask does not apply to the prompts.
    expected = y0 + base(x, p, p, need_weights=False)[0] - base.out_proj.bias
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_per_head_gates_scale_each_head():
    model = _Attn(True)
    x = torch.randn(2, 5, 8)
    y0 = model(x)
    mma.add_adapter(model, "a", LlamaAdapterConfig(target_modules="attn", num_prompts=3))
    (unit,) = _units(model)
    with torch.no_grad():
        unit.prompt_gate.copy_(torch.tensor([1.0, 0.0]))
        head0 = model(x) - y0
        unit.prompt_gate.copy_(torch.tensor([0.0, 2.0]))
        head1 = model(x) - y0
        unit.prompt_gate.copy_(torch.tensor([0.5, 1.0]))
        both = model(x) - y0
    torch.testing.assert_close(both, 0.5 * head0 + 0.5 * head1, rtol=1e-5, atol=1e-6)


def test_zero_gate_blocks_prompt_gradients_but_the_gate_always_learns():
    model = _tiny()
    x = _tokens()
    mma.add_adapter(model, "a", LlamaAdapterConfig(target_modules="@attn", num_prompts=3))
    mma.freeze_base(model)
    model(x).pow(2).mean().backward()
    for u in _units(model):
        assert u.prompt_gate.grad is not None and u.prompt_gate.grad.abs().sum() > 0
        assert u.prompts.grad is None or torch.count_nonzero(u.prompts.grad) == 0
    model.zero_grad()
    _open_gates(model, 0.3)
    model(x).pow(2).mean().backward()
    for u in _units(model):
        assert u.prompts.grad.abs().sum() > 0 and u.prompt_gate.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


def test_num_layers_adapts_the_top_layers_only():
    model = _tiny(depth=3)
    mma.add_adapter(model, "a", LlamaAdapterConfig(target_modules="@attn", num_prompts=2, num_layers=2))
    adapted = sorted(w.module_name for w in mma.model.wrappers(model) if w.units("a"))
    assert adapted == ["blocks.1.attn", "blocks.2.attn"]


# -- V2: bias, scale, norms ---------------------------------------------------------------------------------

def test_v2_unlocks_bias_scale_and_norms_identity_at_init_and_all_learn():
    model = _tiny()
    x = _tokens()
    y0 = model(x)
    config = LlamaAdapterConfig.v2(["mlp.fc1", "mlp.fc2", "@attn"], target_modules="@attn", num_prompts=4)
    assert config == LlamaAdapterConfig(**{**V2, "visual_dim": None})
    mma.add_adapter(model, "a", config)
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
    names = mma.adapter_parameters(model, "a")
    assert {"blocks.0.mlp.fc1.bias_scale.scale", "blocks.0.mlp.fc1.bias_scale.bias", "blocks.1.attn.bias_scale.scale",
            "blocks.0.norm1.tuning.deltas.weight", "norm.tuning.deltas.bias"} <= set(names)
    assert names["blocks.0.mlp.fc1.bias_scale.scale"].shape == (64,)
    _perturb(model)
    mma.freeze_base(model)
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in names.items()), \
        [n for n, p in names.items() if p.grad is None or p.grad.abs().sum() == 0]


def test_bias_scale_is_scale_times_output_plus_bias():
    model = _tiny()
    x = torch.randn(4, 16)
    fc1 = model.blocks[0].mlp.fc1
    y0 = fc1(x)
    mma.add_adapter(model, "a", LlamaAdapterConfig(target_modules="@attn", bias_scale="blocks.0.mlp.fc1"))
    unit = model.blocks[0].mlp.fc1.adapters["a"]["bias_scale"]
    with torch.no_grad():
        unit.scale.uniform_(0.5, 1.5)
        unit.bias.normal_()
        torch.testing.assert_close(model.blocks[0].mlp.fc1(x), unit.scale * (y0 + unit.bias))
        merged = unit.merge_into(fc1, dict(fc1.named_parameters()))  # the unit alone folds into the Linear exactly
        torch.testing.assert_close(F.linear(x, merged["weight"], merged["bias"]), model.blocks[0].mlp.fc1(x))
    with pytest.raises(ValueError, match="merge: adapter 'a' at 'blocks.0.attn'"):
        mma.merge(model)  # the prompts are not mergeable, so the adapter is not


# -- early fusion ---------------------------------------------------------------------------------------------

def test_early_fusion_changes_only_the_early_layers_prompts_per_sample():
    model = _tiny(depth=3)
    x = _tokens()
    mma.add_adapter(model, "a", LlamaAdapterConfig(**{**V2, "visual_layers": 2}))
    _perturb(model)
    attns = {w.module_name: w for w in mma.model.wrappers(model) if w.units("a") and w.module_name.endswith("attn")}
    inputs = {}
    hooks = [w.register_forward_pre_hook(lambda m, args: inputs.__setitem__(m.module_name, args[0])) for w in attns.values()]
    with torch.no_grad():
        text_only = model(x)
        for h in hooks:
            h.remove()

        def prompt_changes():  # each adapted layer's prompt-attention term, on the same layer inputs
            return {n: w.adapters["a"]["adaption_prompt"].change(inputs[n], None) for n, w in attns.items()}

        vis = torch.randn(3, 6)
        with la.visual_tokens(model, vis):
            fused = model(x)
            change_with = prompt_changes()
        change_without = prompt_changes()
        assert [u.fused for u in _units(model)] == [True, True, False]
        for n in ("blocks.0.attn", "blocks.1.attn"):  # same layer input, other prompts: the early layers changed
            assert not torch.allclose(change_with[n], change_without[n])
        torch.testing.assert_close(change_with["blocks.2.attn"], change_without["blocks.2.attn"], rtol=0, atol=0)
        assert not torch.allclose(fused, text_only)
        # per sample: changing sample 1's visual token changes sample 1's output only
        vis2 = vis.clone()
        vis2[1] += 1.0
        with la.visual_tokens(model, vis2):
            fused2 = model(x)
        torch.testing.assert_close(fused2[[0, 2]], fused[[0, 2]], rtol=0, atol=0)
        assert not torch.allclose(fused2[1], fused[1])
        # back to text-only after the block; V = num_prompts tokens per sample work too
        torch.testing.assert_close(model(x), text_only, rtol=0, atol=0)
        la.set_visual_tokens(model, torch.randn(3, 4, 6))
        assert not torch.allclose(model(x), text_only)
        la.clear_visual_tokens(model)
        torch.testing.assert_close(model(x), text_only, rtol=0, atol=0)


def test_visual_projection_trains_only_when_tokens_are_fed():
    model = _tiny()
    x = _tokens()
    mma.add_adapter(model, "a", LlamaAdapterConfig(**V2))
    _perturb(model)
    mma.freeze_base(model)
    proj = mma.adapter_parameters(model, "a")["mma_shared.visual_proj.proj.weight"]
    model(x).pow(2).mean().backward()
    assert proj.grad is None
    with la.visual_tokens(model, torch.randn(3, 6)):
        model(x).pow(2).mean().backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0


def test_visual_token_errors_name_what_was_expected():
    model = _tiny()
    x = _tokens()
    with pytest.raises(ValueError, match="no adapter on this model takes visual tokens"):
        la.set_visual_tokens(model, torch.randn(3, 6))
    mma.add_adapter(model, "text", LlamaAdapterConfig(target_modules="@attn"))
    with pytest.raises(ValueError, match="adapter 'text' has no early fusion"):
        la.set_visual_tokens(model, torch.randn(3, 6), adapter="text")
    mma.add_adapter(model, "a", LlamaAdapterConfig(**V2))
    mma.set_active(model, "a")
    with pytest.raises(ValueError, match=r"expects tokens \(B, V, 6\) or \(B, 6\), got shape \(3, 5\)"):
        la.set_visual_tokens(model, torch.randn(3, 5))
    with pytest.raises(ValueError, match="expected V = 1 or 4, got V = 3"):
        la.set_visual_tokens(model, torch.randn(3, 3, 6))
    with la.visual_tokens(model, torch.randn(2, 6)), pytest.raises(ValueError, match="batch of 2, this forward has 3"):
        model(x)


# -- io and errors --------------------------------------------------------------------------------------------

def test_save_load_round_trip_with_fusion(tmp_path):
    model = _tiny()
    base = copy.deepcopy(model)
    x = _tokens()
    config = LlamaAdapterConfig(**V2)
    mma.add_adapter(model, "a", config)
    _perturb(model)
    mma.save_adapter(model, "a", tmp_path / "a")
    assert mma.load_adapter(base, tmp_path / "a", name="b") == "b"
    assert mma.get_config(base, "b") == config
    vis = torch.randn(3, 6)
    with torch.no_grad(), la.visual_tokens(model, vis), la.visual_tokens(base, vis):
        torch.testing.assert_close(base(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(base(x), model(x), rtol=0, atol=0)


def test_unsupported_modules_and_bad_options_are_named():
    with pytest.raises(ValueError, match=r"module 'blocks.0.mlp.fc1' is a Linear; adaptation prompts support nn.Multihead"):
        mma.add_adapter(_tiny(), "a", LlamaAdapterConfig(target_modules="mlp.fc1"))
    with pytest.raises(ValueError, match=r"bias_scale: module 'blocks.0.norm1' is a LayerNorm; expected nn.Linear"):
        mma.add_adapter(_tiny(), "a", LlamaAdapterConfig(target_modules="@attn", bias_scale="norm1"))
    with pytest.raises(ValueError, match="visual_layers: 3 early layers asked for, but only 2"):
        mma.add_adapter(_tiny(), "a", LlamaAdapterConfig(target_modules="@attn", visual_dim=4, visual_layers=3))
    with pytest.raises(ValueError, match="LlamaAdapterConfig.gate"):
        LlamaAdapterConfig(target_modules="@attn", gate=True)
    with pytest.raises(ValueError, match="LlamaAdapterConfig.num_prompts: expected a positive number"):
        LlamaAdapterConfig(target_modules="@attn", num_prompts=0)
    model = _tiny()
    mma.add_adapter(model, "a", LlamaAdapterConfig(target_modules="@attn", bias_scale=("mlp.fc1",)))
    assert mma.get_config(model, "a").bias_scale == ["mlp.fc1"]


# -- transformers T5 (the VL-T5 backbone) ----------------------------------------------------------------------

def _tiny_t5():
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=4, num_heads=2, num_layers=2, num_decoder_layers=2, d_ff=32,
                   dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5Model(cfg).eval()


def test_t5_attention_matches_its_own_cross_attention_over_the_prompts():
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    torch.manual_seed(0)
    cfg = T5Config(d_model=16, d_kv=4, num_heads=2, dropout_rate=0.0)
    holder = nn.Module()
    holder.attn = T5Attention(cfg, has_relative_attention_bias=False)
    x = torch.randn(2, 5, 16)
    y0 = holder.attn(x)[0]
    mma.add_adapter(holder, "a", LlamaAdapterConfig(target_modules="attn", num_prompts=3))
    torch.testing.assert_close(holder.attn(x)[0], y0, rtol=0, atol=0)
    (unit,) = _units(holder)
    _open_gates(holder, 1.0)
    kv = unit.prompts.detach().unsqueeze(0).expand(2, -1, -1)
    expected = y0 + holder.attn.base_layer(x, key_value_states=kv)[0]  # T5's own (unscaled) attention over the prompts
    torch.testing.assert_close(holder.attn(x)[0], expected, rtol=1e-5, atol=1e-6)


def test_t5_model_self_and_cross_attention_with_fusion_and_round_trip(tmp_path):
    model = _tiny_t5()
    base = copy.deepcopy(model)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    dec = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(1))

    def run(m):
        return m(input_ids=ids, decoder_input_ids=dec).last_hidden_state

    y0 = run(model)
    config = LlamaAdapterConfig(target_modules=["SelfAttention", "EncDecAttention"], num_prompts=3,
                                bias_scale=["SelfAttention.q", "SelfAttention.o", "DenseReluDense.wo"],
                                visual_dim=5, visual_layers=1)
    mma.add_adapter(model, "a", config)
    assert len(_units(model)) == 6 and [u.fused for u in _units(model)] == [True] + [False] * 5
    torch.testing.assert_close(run(model), y0, rtol=0, atol=0)
    _perturb(model)
    mma.freeze_base(model)
    vis = torch.randn(2, 5)
    with la.visual_tokens(model, vis):
        y = run(model)
        y.pow(2).mean().backward()
    assert not torch.allclose(y, y0)
    params = mma.adapter_parameters(model, "a")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n and not n.startswith("mma_shared"))
    mma.save_adapter(model, "a", tmp_path / "a")
    mma.load_adapter(base, tmp_path / "a")
    with torch.no_grad(), la.visual_tokens(model, vis), la.visual_tokens(base, vis):
        torch.testing.assert_close(run(base), run(model), rtol=0, atol=0)


# -- training ---------------------------------------------------------------------------------------------------

def test_a_few_steps_of_training_reduce_the_loss():
    torch.manual_seed(0)
    model = TinyTransformer(vocab=16, dim=16, depth=2, heads=2)
    tokens, labels = toy_task(64, seq=12, vocab=16, seed=0)  # a fixed batch: the frozen random base must fit it
    mma.add_adapter(model, "a", LlamaAdapterConfig(**{**V2, "visual_dim": None}))
    mma.freeze_base(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
