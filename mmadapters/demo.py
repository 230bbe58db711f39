"""The main job until a recipe ships one: the adapter core on a small transformer, end to end.

Not imported by the core. ``TinyTransformer`` is a stand-in backbone: it declares its adapter points
the way real backbones (CLIP, ViT, the Conformer transducer) do.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import mmadapters as mma


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)); x + mlp(LN(x)). Input (B, T, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_ratio * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token classifier: (B, T) int tokens -> (B, num_classes) logits (mean-pooled)."""

    def __init__(self, vocab: int = 32, dim: int = 64, depth: int = 2, heads: int = 4, num_classes: int = 2,
                 max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        mma.declare_adapter_points(self, {
            "tokens": mma.AdapterPoint("embed", doc="token embeddings (B, T, D): prompt tokens go here"),
            "attn_out": mma.AdapterPoint("blocks.*.attn", doc="self-attention output"),
            "ffn_out": mma.AdapterPoint("blocks.*.mlp.fc2", doc="feed-forward output"),
            "attn": mma.AdapterPoint("blocks.*.attn", doc="nn.MultiheadAttention (LoRA on in_proj/out_proj)"),
            "block": mma.AdapterPoint("re:blocks\\.\\d+", dim=dim, doc="whole block output"),
        })

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        x = x + self.pos[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def toy_task(n: int, seq: int = 16, vocab: int = 32, seed: int = 0, flip: bool = False) -> tuple[Tensor, Tensor]:
    """Label 1 when token 3 occurs more often than token 5 (``flip`` swaps the two): a counting task."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq), generator=g)
    a, b = (5, 3) if flip else (3, 5)
    labels = ((tokens == a).sum(1) > (tokens == b).sum(1)).long()
    return tokens, labels


def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data[0]).argmax(-1) == data[1]).float().mean().item()


def train_adapter(model: nn.Module, name: str, data: tuple[Tensor, Tensor], steps: int, lr: float = 3e-3) -> float:
    mma.set_active(model, name)
    mma.freeze_base(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    tokens, labels = data
    model.train()
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(steps), desc=f"train {name}", leave=False, disable=None):
        idx = torch.randint(0, len(tokens), (64,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(tokens[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def run_demo(output: str = "out/demo", steps: int = 60, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    base = TinyTransformer()
    # A base "pretrained" on one task; adapters adapt it to the flipped task.
    pre, test = toy_task(4096, seed=seed), toy_task(1024, seed=seed + 1)
    print("1. pretrain a small transformer (the frozen backbone) on a counting task")
    base.requires_grad_(True)
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    for step in tqdm(range(steps * 2), desc="pretrain", leave=False, disable=None):
        idx = torch.randint(0, 4096, (64,), generator=torch.Generator().manual_seed(10_000 + step))
        loss = F.cross_entropy(base(pre[0][idx]), pre[1][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    pristine = copy.deepcopy(base)
    new_train, new_test = toy_task(4096, seed=seed + 2, flip=True), toy_task(1024, seed=seed + 3, flip=True)
    print(f"   base accuracy: original task {accuracy(base, test):.3f}, new (flipped) task {accuracy(base, new_test):.3f}")

    print("2. add LoRA (attention in_proj/out_proj + FFN) and a Houlsby bottleneck adapter")
    model = base
    mma.add_adapter(model, "lora", mma.LoRAConfig(r=4, alpha=8, target_modules=["@attn", "mlp.fc1", "mlp.fc2"]))
    mma.add_adapter(model, "houlsby", mma.BottleneckConfig.houlsby(bottleneck_dim=8))
    results = {}
    for name in ("lora", "houlsby"):
        loss = train_adapter(model, name, new_train, steps * 4)
        results[name] = accuracy(model, new_test)
        print(f"   trained {name!r}: final loss {loss:.3f}, accuracy on the new task {results[name]:.3f}")
    mma.set_active(model, "lora")
    mma.freeze_base(model)
    print("3. parameter report (LoRA active and trainable)")
    print("   " + str(mma.parameter_report(model)).replace("\n", "\n   "))

    print("4. merge LoRA into the base weights, compare, unmerge")
    x = new_test[0][:256]
    with torch.no_grad():
        y = model(x)
        mma.merge(model)
        y_merged = model(x)
        mma.unmerge(model)
    print(f"   max |merged - unmerged| = {(y - y_merged).abs().max().item():.2e}")

    out = Path(output)
    print(f"5. save both adapters to {out}/ and reload them onto a fresh copy of the base")
    for name in ("lora", "houlsby"):
        mma.save_adapter(model, name, out / name)
    fresh = copy.deepcopy(pristine).eval()  # same mode as `model`: eval picks other attention kernels
    for name in ("lora", "houlsby"):
        mma.load_adapter(fresh, out / name)
        mma.set_active(fresh, name)
        mma.set_active(model, name)
        with torch.no_grad():
            diff = (fresh(x) - model(x)).abs().max().item()
        print(f"   {name!r}: reloaded accuracy {accuracy(fresh, new_test):.3f}, max output difference {diff:.2e}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"done in {time.perf_counter() - t0:.1f} s; adapters on disk: {size / 1024:.1f} KiB in {out}/")
    return results
