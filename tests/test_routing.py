"""Per-sample routing: a mixed batch equals running each sample alone with its adapter active."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from toys import make_toy, toy_input

import mmadapters as mma
from mmadapters.routing import RoutingError, offload


def _randomize(model: nn.Module, names: list[str], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            for p in mma.adapter_parameters(model, n).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _alone(model: nn.Module, x: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    outs = []
    for i, n in enumerate(names):
        mma.set_active(model, n)
        with torch.no_grad():
            outs.append(model(x[i : i + 1]))
    mma.set_active(model, None)
    return torch.cat(outs)


def _check(model, x, names, **kw):
    with torch.no_grad(), mma.route(model, names, **kw):
        y = model(x)
    torch.testing.assert_close(y, _alone(model, x, names), atol=1e-5, rtol=1e-5)
    return y


CONFIGS = {
    "lora": lambda r, t: mma.LoRAConfig(r=r, alpha=2 * r, target_modules=t),
    "series": lambda r, t: mma.BottleneckConfig(bottleneck_dim=r, target_modules=t, pre_norm=True),
    "parallel": lambda r, t: mma.BottleneckConfig(placement="parallel", bottleneck_dim=r, activation="gelu", target_modules=t),
    "post_norm_gate": lambda r, t: mma.BottleneckConfig(bottleneck_dim=r, post_norm=True, gate=True, target_modules=t),
}
TARGETS = {"mlp": {"lora": ["fc1", "fc2"]}, "transformer": {"lora": ["@attn", "mlp.fc1", "embed", "head"]},
           "conv": {"lora": None}}
POINTS = ["@attn_out", "@ffn_out"]


@pytest.mark.parametrize("toy", ["mlp", "transformer", "conv"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_mixed_batch_equals_each_sample_alone(toy, method):
    if method == "lora" and toy == "conv":
        pytest.skip("LoRA on convolutions is not routable (clear error tested below)")
    model = make_toy(toy)
    targets = TARGETS[toy]["lora"] if method == "lora" else POINTS
    names = ["a", "b", "c"]
    for i, n in enumerate(names):  # different ranks / widths: padded in one pool
        mma.add_adapter(model, n, CONFIGS[method](2 + 2 * i, targets))
    _randomize(model, names)
    x = toy_input(toy)
    x = torch.cat([x, x[:1]])[: max(4, x.shape[0])] if x.shape[0] < 4 else x
    batch = ["b", None, "c", "a", "b"][: x.shape[0]]
    _check(model, x, batch)


def test_mixed_methods_in_one_batch_and_series_after_attention():
    model = make_toy("transformer")
    mma.add_adapter(model, "lora", mma.LoRAConfig(r=4, target_modules=["@attn", "mlp.fc1"]))
    mma.add_adapter(model, "bn", mma.BottleneckConfig(bottleneck_dim=3, target_modules=["@attn", "@ffn_out"]))
    _randomize(model, ["lora", "bn"])
    x = torch.randint(0, 16, (4, 5))
    _check(model, x, ["bn", "lora", None, "lora"])


class SeqFirst(nn.Module):
    """Attention with (T, B, D) inputs and masks: the batch is dim 1."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 8)

    def forward(self, x, mask=None, kpm=None, need_weights=False):
        h, w = self.attn(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=need_weights)
        return self.fc(h), w


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_sequence_first_with_masks(need_weights):
    torch.manual_seed(0)
    model = SeqFirst().eval()
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["attn"]))
    mma.add_adapter(model, "b", mma.LoRAConfig(r=4, target_modules=["attn.out_proj"]))  # out_proj only
    _randomize(model, ["a", "b"])
    x = torch.randn(5, 3, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1, -1] = True
    names = ["a", "b", None]
    with torch.no_grad(), mma.route(model, names):
        y, w = model(x, mask, kpm, need_weights)
    ref_y, ref_w = [], []
    for i, n in enumerate(names):
        mma.set_active(model, n)
        with torch.no_grad():
            yi, wi = model(x[:, i : i + 1], mask, kpm[i : i + 1], need_weights)
        ref_y.append(yi)
        ref_w.append(wi)
    torch.testing.assert_close(y, torch.cat(ref_y, 1), atol=1e-5, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(w, torch.cat(ref_w, 0), atol=1e-5, rtol=1e-5)


def test_lru_cache_bounded_evicts_and_stays_correct():
    model = make_toy("mlp")
    names = [f"t{i}" for i in range(6)]
    for n in names:
        mma.add_adapter(model, n, mma.LoRAConfig(r=3, target_modules=["fc1", "fc2"]))
    _randomize(model, names)
    cache = mma.AdapterCache(capacity=3, device="cpu")
    x = torch.randn(3, 10)
    for batch in (["t0", "t1", "t2"], ["t3", "t0", None], ["t4", "t5", "t0"], ["t1", "t1", "t2"]):
        _check(model, x, batch, cache=cache)
    assert len(cache.resident()) == 3
    assert cache.stats.evictions >= 3 and cache.stats.hits >= 1
    with pytest.raises(RoutingError, match="holds 3"):
        with mma.route(model, ["t0", "t1", "t2", "t3"], cache=cache):
            pass


def test_cache_refreshes_changed_weights_and_offloaded_adapters_route():
    model = make_toy("mlp")
    for n in ("a", "b"):
        mma.add_adapter(model, n, mma.LoRAConfig(r=2, target_modules=["fc1"]))
    _randomize(model, ["a", "b"])
    offload(model, ["a", "b"], "cpu")  # host copies; the cache pools live on the compute device (cpu here)
    x = torch.randn(2, 10)
    _check(model, x, ["a", "b"])
    _randomize(model, ["a"], seed=5)  # in-place change bumps parameter versions: re-uploaded
    _check(model, x, ["a", "b"])
    mma.delete_adapter(model, "b")
    mma.add_adapter(model, "b", mma.LoRAConfig(r=5, target_modules=["fc1", "fc2"]))  # a new, larger "b"
    _randomize(model, ["b"], seed=7)
    _check(model, x, ["a", "b"])


def test_training_through_routing_updates_each_adapter_with_its_samples():
    model = make_toy("mlp")
    for n in ("a", "b"):
        mma.add_adapter(model, n, mma.BottleneckConfig(bottleneck_dim=4, target_modules=POINTS))
    mma.freeze_base(model, adapters=["a", "b"])
    _randomize(model, ["a", "b"])
    x = torch.randn(4, 10)
    names = ["a", "a", "b", None]
    with mma.route(model, names):
        loss = model(x).pow(2).sum()
    loss.backward()
    grads = {n: [p.grad.clone() for p in mma.adapter_parameters(model, n).values()] for n in ("a", "b")}
    # the same loss computed one adapter at a time gives the same gradients
    for p in model.parameters():
        p.grad = None
    total = 0
    for n, rows in (("a", [0, 1]), ("b", [2]), (None, [3])):
        mma.set_active(model, n)
        total = total + model(x[rows]).pow(2).sum()
    mma.set_active(model, None)
    total.backward()
    for n in ("a", "b"):
        for g, p in zip(grads[n], mma.adapter_parameters(model, n).values(), strict=True):
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, total, atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem():
    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    mma.add_adapter(model, "c", mma.CompacterConfig.compacter(bottleneck_dim=4, phm_dim=2, target_modules=POINTS))
    x = torch.randn(3, 10)
    with pytest.raises(KeyError, match="nope"):
        with mma.route(model, ["a", "nope", None]):
            pass
    with pytest.raises(RoutingError, match="3 adapter names"):
        with mma.route(model, ["a", "a", None]):
            model(torch.randn(2, 10))
    with pytest.raises(RoutingError, match="cannot be routed"):
        with mma.route(model, ["c", "a", None]):
            model(x)
    conv = make_toy("conv")
    mma.add_adapter(conv, "l", mma.LoRAConfig(r=2, target_modules=["conv1"]))
    with pytest.raises(RoutingError, match="LoRAConv"):
        with mma.route(conv, ["l", None]):
            conv(torch.randn(2, 3, 6, 6))
    mma.set_active(model, "a")
    mma.merge(model)
    with pytest.raises(RoutingError, match="unmerge"):
        with mma.route(model, ["a", None, None]):
            pass


def test_deep_copied_model_routes_with_its_own_cache():
    import copy

    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    _randomize(model, ["a"])
    x = torch.randn(2, 10)
    _check(model, x, ["a", None])
    twin = copy.deepcopy(model)
    _randomize(twin, ["a"], seed=3)
    _check(twin, x, ["a", None])
    _check(model, x, ["a", None])


def test_route_restores_active_adapter_afterwards():
    model = make_toy("mlp")
    mma.add_adapter(model, "a", mma.LoRAConfig(r=2, target_modules=["fc1"]))
    _randomize(model, ["a"])
    x = torch.randn(2, 10)
    with torch.no_grad():
        before = model(x)
        with mma.route(model, [None, None]):
            base = model(x)
        after = model(x)
    assert torch.equal(before, after) and not torch.allclose(before, base)


class _TimeMajor(nn.Module):
    """Layers working on (T, B, D), like torchaudio's Conformer internals."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(d, d) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, D)
        h = x.transpose(0, 1)
        for blk in self.blocks:
            h = torch.tanh(blk(h))
        return h.transpose(0, 1)


def test_adapter_point_batch_dim_routes_time_major_modules():
    torch.manual_seed(0)
    model = _TimeMajor()
    mma.declare_adapter_points(model, {"block_out": mma.AdapterPoint("blocks.*", batch_dim=1)})
    for n in ("a", "b"):
        mma.add_adapter(model, n, mma.BottleneckConfig(bottleneck_dim=4, target_modules=["@block_out"]))
    _randomize(model, ["a", "b"])
    x = torch.randn(3, 5, 8)  # B=3 != T=5, so a wrong batch dim cannot pass silently
    _check(model, x, ["a", None, "b"])
    # without the declared batch dim the same layout is refused with a clear error, never mis-routed
    plain = _TimeMajor()
    mma.add_adapter(plain, "a", mma.BottleneckConfig(bottleneck_dim=4, target_modules=["blocks.*"]))
    with pytest.raises(RoutingError, match="batch expected in dim 0"), torch.no_grad(), mma.route(plain, ["a", None, "a"]):
        plain(x)
