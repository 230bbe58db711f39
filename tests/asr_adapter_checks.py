"""One check shared by the ASR backbones ported from other libraries (NeMo files, transformers Parakeet folders):
their declared adapter points take language adapters that start as the identity, route per sample and train alone."""

from __future__ import annotations

import torch

import mmadapters as mma
from mmadapters.speech.lda import adapter_config

POINTS = {"attn_out", "ffn_out", "block_out", "attn", "predictor_out", "joiner_in"}


def check_language_adapters(model, x, lengths, points: list[str]) -> None:
    """Add adapters "nl" and "pt" at ``points``: zero-initialised "nl" leaves the encoder output unchanged; with
    "pt" perturbed, routing ["nl", "pt"] changes only the second sample; after ``freeze_base`` the transducer
    loss reaches adapter parameters only. Leaves "pt" active and the model in training mode."""
    assert POINTS <= set(mma.declared_points(model))
    with torch.no_grad():
        base, _ = model.encode(x, lengths)
    for name in ("nl", "pt"):
        mma.add_adapter(model, name, adapter_config(4, points))
    with torch.no_grad():  # zero-initialised up-projections: nothing changes
        mma.set_active(model, "nl")
        assert torch.allclose(model.encode(x, lengths)[0], base, atol=1e-5)
        for p in mma.adapter_parameters(model, "pt").values():
            p.add_(0.05)
        mma.set_active(model, None)
        with mma.route(model, ["nl", "pt"]):
            routed, _ = model.encode(x, lengths)
    assert torch.allclose(routed[0], base[0], atol=1e-5) and not torch.allclose(routed[1], base[1], atol=1e-3)
    mma.freeze_base(model, adapters=["nl", "pt"])
    mma.set_active(model, "pt")
    model.train()
    loss = model(x, lengths, torch.tensor([[5, 6], [7, 8]]), torch.tensor([2, 2]))["loss"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("adapter" in n for n in grads)
