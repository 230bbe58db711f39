"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation (Cao, 2024).

Method. Each adapted weight matrix ``W`` (``out x in``) is split by its singular value decomposition
``W = U diag(S) V^T`` into a principal part ``W_p = U_p diag(S_p) V_p^T`` (the ``r`` largest singular
triplets) and a residual ``W_r = W - W_p``. The residual is frozen; ``U_p`` (``out x r``), ``S_p`` (``r``)
and ``V_p^T`` (``r x in``) are trained. The effective weight is ``W_r + s * U_p diag(S_p) V_p^T`` with
``s = alpha / r`` (``alpha=None``: ``s = 1``, the official default). During training the orthonormal
regularizer :func:`orthonormal_regularizer` keeps ``U_p`` and ``V_p`` close to orthonormal, so scaling
information moves into ``S_p``; it is added to the task loss times a coefficient ``gamma`` the user picks
(the official code backpropagates ``gamma * L_reg`` into the same optimizer step). Since the update is a
weight delta, SORSA merges into the base weights exactly and costs nothing at inference once merged.

Choices made here:

- **The base weight is never modified.** The unit is a weight-delta unit (see :mod:`mmadapters.units`):
  ``W + s * (U_p diag(S_p) V_p^T - U_0 diag(S_0) V_0^T)``, where ``U_0, S_0, V_0`` are the initial
  principal factors. That equals ``W_r + s * W_p`` and lets several adapters share one base.
- **Exact identity at init, accurate deltas.** The delta is evaluated in difference form,
  ``U_0 diag(S_p - S_0) V_0^T + U_0 diag(S_p) (V_p - V_0)^T + (U_p - U_0) diag(S_p) V_p^T``, as one rank-3r
  product. At init every term has an exactly-zero factor, so the delta is exactly zero (not a rounding
  residue of two large products), and later its rounding error scales with the update, not with ``|W|``
  (this matters in half precision, where ``W_p - W_p0`` would lose most of its bits).
- **The initial factors are recomputed, not stored.** ``U_0, S_0, V_0`` are non-persistent buffers rebuilt
  from the base weight whenever the adapter is built (also on load), so a saved adapter holds only
  ``U_p, S_p, V_p`` (``r (out + in + 1)`` numbers per matrix, as in the paper). The SVD runs on the CPU in
  float64 (deterministic for a given input, and more accurate than a float32 or CUDA SVD, which the
  official README warns about), and signs are canonicalized (each column of ``U_0`` has its largest-magnitude
  entry positive, ``V_0`` flipped with it), so the factors do not depend on the LAPACK's sign choice.
  Loading onto the same base on the same software stack therefore reproduces the trained outputs bit for
  bit (tested); across different BLAS/LAPACK builds they agree to float rounding (~1e-7 relative).
- **Layers.** ``nn.Linear`` and ``nn.Embedding`` (the weight matrix as it is), ``nn.Conv1d/2d/3d`` (the
  kernel flattened to ``out x (in/groups * k...)``) and ``nn.MultiheadAttention`` (``out_proj.weight`` and
  the packed ``in_proj_weight`` split into its q, k, v blocks, each decomposed separately, as the official
  code adapts q_proj, k_proj and v_proj). Other modules are refused with an error naming them.
- ``gate=True`` is refused: the delta starts at exactly zero, so a zero gate would receive no gradient and
  block every other gradient too.
- The official layer's optional dropout on the branch input is not offered: a weight delta has no branch.

Parameter names: ``sorsa_U`` (``out x r``), ``sorsa_S`` (``r``), ``sorsa_V`` (``r x in``, i.e. ``V_p^T``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import AdapterConfig, check_positive, register_method, target_modules_field
from ..units import AdapterUnit
from ._common import BuildContext


@dataclass
class SORSAConfig(AdapterConfig):
    r: int = field(default=8, metadata={"help": "Rank of the trainable principal part U_p diag(S_p) V_p^T."})
    target_modules: list[str] | str | None = target_modules_field()
    alpha: float | None = field(default=None, metadata={
        "help": "Scale of the principal part: alpha / r. None: no scaling (the official default)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(self, "r")
        if isinstance(self.r, float):
            raise ValueError(f"SORSAConfig.r: expected a positive integer, got {self.r!r}")
        check_positive(self, "alpha", allow_none=True)
        if self.gate:
            raise ValueError("SORSAConfig.gate: not supported; SORSA's delta starts at exactly zero, so a zero-initialized "
                             "gate would get no gradient and block all others")

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


def principal_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``r`` leading singular triplets of a 2-D ``weight`` (``out x in``): ``U (out, r), S (r,), V^T (r, in)``.

    Computed on the CPU in float64 with canonical signs (largest-magnitude entry of each column of ``U``
    positive), then cast to ``weight``'s dtype and device."""
    w = weight.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    pivot = u.abs().argmax(dim=0)
    sign = torch.sign(u[pivot, torch.arange(u.shape[1])])
    sign[sign == 0] = 1.0
    u, vh = u * sign, vh * sign[:, None]
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return tuple(t.to(device=weight.device, dtype=dtype).contiguous() for t in (u, s, vh))  # type: ignore[return-value]


class SORSAPrincipal(nn.Module):
    """The trainable principal part of one weight matrix and its (non-persistent) initial value."""

    def __init__(self, matrix: Tensor, r: int, where: str):
        super().__init__()
        out_dim, in_dim = matrix.shape
        if r > min(out_dim, in_dim):
            raise ValueError(f"SORSAConfig.r: {r} exceeds the rank limit min(out, in) = {min(out_dim, in_dim)} of "
                             f"{where} (a {out_dim} x {in_dim} matrix)")
        u, s, vh = principal_factors(matrix, r)
        self.sorsa_U = nn.Parameter(u.clone())
        self.sorsa_S = nn.Parameter(s.clone())
        self.sorsa_V = nn.Parameter(vh.clone())
        self.register_buffer("U0", u, persistent=False)
        self.register_buffer("S0", s, persistent=False)
        self.register_buffer("V0", vh, persistent=False)

    def delta(self) -> Tensor:
        """``U_p diag(S_p) V_p^T - U_0 diag(S_0) V_0^T`` (``out x in``), exactly zero at init (see module doc)."""
        u, s, v = self.sorsa_U, self.sorsa_S, self.sorsa_V
        u0, s0, v0 = self.U0.to(u.dtype), self.S0.to(u.dtype), self.V0.to(u.dtype)
        left = torch.cat([u0 * (s - s0), u0 * s, (u - u0) * s], dim=1)  # (out, 3r)
        right = torch.cat([v0, v - v0, v], dim=0)  # (3r, in)
        return left @ right

    def orthonormality(self) -> tuple[Tensor, Tensor]:
        """``(||U_p^T U_p - I||_F, ||V_p^T V_p - I||_F)`` (``V_p^T`` is stored, so the second is ``V V^T``)."""
        eye = torch.eye(self.sorsa_S.shape[0], dtype=self.sorsa_U.dtype, device=self.sorsa_U.device)
        u_err = torch.linalg.matrix_norm(self.sorsa_U.T @ self.sorsa_U - eye, "fro")
        v_err = torch.linalg.matrix_norm(self.sorsa_V @ self.sorsa_V.T - eye, "fro")
        return u_err, v_err


class SORSAUnit(AdapterUnit):
    """Weight-delta unit: one :class:`SORSAPrincipal` per adapted matrix of the base module."""

    kind = "weight"

    def __init__(self, base: nn.Module, name: str, config: SORSAConfig, parts: set[str]):
        super().__init__(gate=False)
        self.scaling = config.scaling
        self.principals = nn.ModuleDict()
        # base parameter name -> (principal keys concatenated along dim 0, the parameter's shape)
        self.layout: dict[str, tuple[list[str], torch.Size]] = {}
        if isinstance(base, nn.MultiheadAttention):
            if "in_proj" in parts:
                if not base._qkv_same_embed_dim:
                    raise ValueError(f"SORSAConfig: module {name!r} is an nn.MultiheadAttention with kdim/vdim != embed_dim "
                                     "(separate q/k/v weights); target its out_proj only")
                chunks = base.in_proj_weight.detach().chunk(3, dim=0)
                keys = [f"in_proj_{p}" for p in "qkv"]
                for key, chunk in zip(keys, chunks, strict=True):
                    self.principals[key] = SORSAPrincipal(chunk, config.r, f"{name}.in_proj_weight[{key[-1]}]")
                self.layout["in_proj_weight"] = (keys, base.in_proj_weight.shape)
            if "out_proj" in parts:
                self.principals["out_proj"] = SORSAPrincipal(base.out_proj.weight.detach(), config.r, f"{name}.out_proj")
                self.layout["out_proj.weight"] = (["out_proj"], base.out_proj.weight.shape)
        else:
            weight = base.weight.detach()
            self.principals["weight"] = SORSAPrincipal(weight.reshape(weight.shape[0], -1), config.r, name)
            self.layout["weight"] = (["weight"], weight.shape)

    def delta_params(self) -> dict[str, Tensor]:
        out = {}
        for pname, (keys, shape) in self.layout.items():
            parts = [self.principals[k].delta() for k in keys]
            delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            out[pname] = (delta * self.scaling if self.scaling != 1.0 else delta).reshape(shape)
        return out


def build(ctx: BuildContext):
    config: SORSAConfig = ctx.config
    for target in ctx.targets:
        module = target.module
        if isinstance(module, nn.modules.conv._ConvNd) or isinstance(module, nn.Linear | nn.Embedding | nn.MultiheadAttention):
            yield target.name, "sorsa", SORSAUnit(module, target.name, config, target.parts)
        else:
            raise ValueError(f"SORSAConfig: module {target.name!r} is a {type(module).__name__}; SORSA decomposes the "
                             "weight matrix of nn.Linear, nn.Embedding, nn.Conv1d/2d/3d or nn.MultiheadAttention")


def orthonormal_regularizer(model: nn.Module, adapter_name: str | None = None, *, reduction: str = "mean") -> Tensor:
    """SORSA's orthonormal regularizer: ``||U_p^T U_p - I||_F + ||V_p^T V_p - I||_F`` over the adapted matrices.

    Plain (not squared) Frobenius norms, as in the paper and the official code. ``reduction="mean"`` (the
    official form) averages the norms over all ``U_p`` and ``V_p`` matrices, so ``gamma`` does not depend on
    how many layers are adapted; ``"sum"`` adds them. ``adapter_name=None`` covers every SORSA adapter of
    ``model``. Returns a 0-dim tensor (differentiable); add ``gamma * orthonormal_regularizer(model)`` to
    the loss. Raises ``ValueError`` if there is nothing to regularize."""
    from ..model import get_config, state_of, wrappers

    if reduction not in ("mean", "sum"):
        raise ValueError(f"orthonormal_regularizer: reduction expected 'mean' or 'sum', got {reduction!r}")
    if adapter_name is None:
        names = [n for n, c in state_of(model).configs.items() if isinstance(c, SORSAConfig)]
    else:
        if not isinstance(get_config(model, adapter_name), SORSAConfig):
            raise ValueError(f"orthonormal_regularizer: adapter {adapter_name!r} is a "
                             f"{type(get_config(model, adapter_name)).__name__}, not a SORSAConfig adapter")
        names = [adapter_name]
    terms: list[Tensor] = []
    for w in wrappers(model):
        for n in names:
            for unit in w.units(n):
                if isinstance(unit, SORSAUnit):
                    for principal in unit.principals.values():
                        terms.extend(principal.orthonormality())
    if not terms:
        raise ValueError("orthonormal_regularizer: the model has no SORSA adapter"
                         + (f" named {adapter_name!r}" if adapter_name else ""))
    total = torch.stack([t.float() for t in terms]).sum()
    return total / len(terms) if reduction == "mean" else total


register_method("sorsa", SORSAConfig, build)
