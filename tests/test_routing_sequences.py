"""Any sequence of ``route()`` calls equals per-sample runs (issue: the pool of a module did not grow when a
later call gave a slot to an adapter that has no unit at that module)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toys import make_toy

import mmadapters as mma
from mmadapters.routing import AdapterCache, RoutingError


def _alone(model, x, names):
    outs = []
    for i, n in enumerate(names):
        mma.set_active(model, n)
        with torch.no_grad():
            outs.append(model(x[i : i + 1]))
    mma.set_active(model, None)
    return torch.cat(outs)


def _routed(model, x, names, cache):
    with torch.no_grad(), mma.route(model, names, cache=cache):
        return model(x)


def _model_with(specs, seed=0):
    """specs: [(name, method, rank, targets)] on the toy transformer (nn.MultiheadAttention + MLP)."""
    torch.manual_seed(seed)
    model = make_toy("transformer")
    for name, method, rank, targets in specs:
        if method == "lora":
            cfg = mma.LoRAConfig(r=rank, alpha=2 * rank, target_modules=targets)
        else:
            cfg = mma.BottleneckConfig(bottleneck_dim=rank, target_modules=targets)
        mma.add_adapter(model, name, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, *_ in specs:
            for p in mma.adapter_parameters(model, name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    return model


@pytest.mark.parametrize("cache", [None, "default", 4])
def test_second_call_with_an_adapter_on_other_modules(cache):
    """The reported case: LoRA "a" on the attention, bottleneck "b" on the MLP output; route(["a", None]) then
    route(["a", "b"]) raised IndexError in routed_mha."""
    model = _model_with([("a", "lora", 4, ["@attn"]), ("b", "bottleneck", 3, ["@ffn_out"])])
    cache_obj = None if cache is None else AdapterCache() if cache == "default" else AdapterCache(capacity=cache)
    x = torch.randint(0, 16, (2, 5))
    for names in (["a", None], ["a", "b"], ["b", "a"], [None, "b"]):
        torch.testing.assert_close(_routed(model, x, names, cache_obj), _alone(model, x, names), atol=1e-5, rtol=1e-5)


def test_a_failed_route_call_leaves_routing_correct():
    model = _model_with([("a", "lora", 2, ["@attn"]), ("b", "bottleneck", 3, ["@ffn_out"])])
    x = torch.randint(0, 16, (2, 5))
    torch.testing.assert_close(_routed(model, x, ["a", None], None), _alone(model, x, ["a", None]), atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError):
        _routed(model, x, ["a", "nope"], None)
    with pytest.raises(RoutingError, match="got 3 adapter names"):  # a forward that fails inside the block
        with torch.no_grad(), mma.route(model, ["a", "b", None]):
            model(x)
    torch.testing.assert_close(_routed(model, x, ["a", "b"], None), _alone(model, x, ["a", "b"]), atol=1e-5, rtol=1e-5)


TARGET_CHOICES = [["@attn"], ["mlp.fc1"], ["@ffn_out"], ["@attn_out"], ["@attn", "mlp.fc1"], ["embed", "head"]]
ADAPTER = st.tuples(st.sampled_from(["lora", "bottleneck"]), st.integers(1, 6), st.sampled_from(range(len(TARGET_CHOICES))))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters=st.lists(ADAPTER, min_size=1, max_size=5), capacity=st.sampled_from([None, 1, 2, 3, 8]),
       calls=st.lists(st.lists(st.integers(-1, 4), min_size=1, max_size=4), min_size=1, max_size=6),
       fail_at=st.integers(-1, 5), data=st.data())
def test_any_sequence_of_route_calls_equals_per_sample_runs(adapters, capacity, calls, fail_at, data):
    specs = []
    for i, (method, rank, t) in enumerate(adapters):
        targets = TARGET_CHOICES[t]
        if method == "bottleneck":  # bottlenecks go on points or Linear outputs, never on the embedding
            targets = [t for t in targets if t not in ("embed", "head")] or ["@ffn_out"]
        specs.append((f"ad{i}", method, rank, targets))
    model = _model_with(specs)
    cache = AdapterCache(capacity=capacity) if capacity is not None else None
    for step, call in enumerate(calls):
        names = [None if j < 0 or j >= len(specs) else specs[j][0] for j in call]
        x = torch.randint(0, 16, (len(names), 5), generator=torch.Generator().manual_seed(step))
        if step == fail_at:  # an error midway: a forward with the wrong batch size inside the block
            try:
                with torch.no_grad(), mma.route(model, names, cache=cache):
                    model(torch.randint(0, 16, (len(names) + 1, 5)))
            except RoutingError:
                pass  # the wrong batch size, or more distinct adapters than the cache holds
        distinct = len({n for n in names if n is not None})
        if capacity is not None and distinct > capacity:
            with pytest.raises(RoutingError):
                _routed(model, x, names, cache)
            continue
        torch.testing.assert_close(_routed(model, x, names, cache), _alone(model, x, names), atol=1e-5, rtol=1e-5)
