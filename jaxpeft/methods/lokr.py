"""LoKr: a weight update that is a Kronecker product, ``ΔW = s · W₁ ⊗ W₂``, W₂ (and optionally W₁) low-rank; and its
PEFT ``LOKR`` codec.

HF tensors (no ``.weight``), in torch's ``(out, in)`` layout: ``<module>.lokr_w1`` ``[l, m]`` or its factors
``.lokr_w1_a`` ``[l, r]`` / ``.lokr_w1_b`` ``[r, m]``, and ``.lokr_w2`` ``[k, n]`` or ``.lokr_w2_a`` ``[k, r]`` /
``.lokr_w2_b`` ``[r, n]``, with ``ΔW = (alpha/r)·lokr_w1 ⊗ lokr_w2`` over the weight flattened to ``(out, in)`` =
``(l·k, m·n)``. Ours are the transposes: ``lokr_w1 = w1ᵀ``, ``lokr_w1_a = w1_bᵀ``, ``lokr_w1_b = w1_aᵀ`` (likewise
for ``w2``). Which of the factors exist follows from the rank, ``decompose_both`` and ``decompose_factor`` by PEFT's
rule (:meth:`.LokrConfig.shapes`), checked both ways.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._select import Layout
from jaxpeft.api import fold_weight
from jaxpeft.hf import _lycoris
from jaxpeft.hf import codec as hfc
from jaxpeft.methods._factors import RankedConfig, uniform
from jaxpeft.protocol import STATIC, LayerAdapter, LayerCall, check_ndim

__all__ = ["LokrConfig", "LokrWeights", "factorization"]

_HI = jax.lax.Precision.HIGHEST


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dimension``: HF PEFT's (and LyCORIS') split of a dimension for a Kronecker product.

    With ``factor > 0`` dividing ``dimension`` the answer is ``(factor, dimension // factor)`` (in that order).
    Otherwise ``m`` is the largest divisor not above ``factor`` (any, for ``factor = -1``) that keeps ``m ≤ n``
    on the way up from 1, i.e. the divisor pair nearest the square root, smaller number first:
    ``factorization(128) == (8, 16)``, ``factorization(127) == (1, 127)``, ``factorization(128, 4) == (4, 32)``.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        if new_m > limit:
            break
        m, n = new_m, dimension // new_m
    return (n, m) if m > n else (m, n)


def _product(full: Any, a: Any, b: Any) -> jax.Array:
    """``full``, or ``a·b`` (stack axes batched), in float32."""
    if full is not None:
        return jnp.asarray(full, jnp.float32)
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HI)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LokrWeights(LayerAdapter):
    """One LoKr adapter: ``ΔW = scale · W₁ ⊗ W₂`` over the kernel flattened to ``(fan-in, fan-out)``.

    The fan-in size factors as ``m·n`` and the fan-out size as ``l·k`` (:func:`.factorization`); ``W₁`` is
    ``(*stack, m, l)`` and ``W₂`` ``(*stack, n, k)``, so ``ΔW[(i, j), (p, q)] = scale · W₁[i, p] · W₂[j, q]``. Each
    factor is either full (``w1``/``w2``) or low-rank (``w1 = w1_a·w1_b``, ``w2 = w2_a·w2_b``, A on the fan-in
    side); the unused fields are None. HF PEFT stores the ``(out, in)`` transposes: its ``lokr_w1`` is ``w1ᵀ``,
    its ``lokr_w1_a``/``lokr_w1_b`` are ``w1_bᵀ``/``w1_aᵀ`` (likewise for ``w2``).

    Dense and DenseGeneral calls never form the Kronecker product: the input's contracted axes are reshaped to
    ``(m, n)`` and contracted with ``W₂`` then ``W₁`` (cost per row ``in·k + m·out`` instead of ``in·out``).
    Einsum calls form ``ΔW`` (weight-sized) and run the layer's einsum on it; neither forms ``W + ΔW``.
    """

    w1: Any = None
    w1_a: Any = None
    w1_b: Any = None
    w2: Any = None
    w2_a: Any = None
    w2_b: Any = None
    scale: float = dataclasses.field(default=1.0, metadata=STATIC)
    fan_in_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=STATIC)
    fan_out_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=STATIC)
    layout: Layout = dataclasses.field(metadata=STATIC, kw_only=True)

    def _factor_shape(self, index: int) -> tuple[int, int]:
        """``(rows, columns)`` of ``W₁`` (index 1) or ``W₂`` (index 2), from whichever fields hold it."""
        full, a, b = (self.w1, self.w1_a, self.w1_b) if index == 1 else (self.w2, self.w2_a, self.w2_b)
        if full is not None:
            return int(full.shape[-2]), int(full.shape[-1])
        return int(a.shape[-2]), int(b.shape[-1])

    def describe(self) -> str:
        parts = []
        for i, a in ((1, self.w1_a), (2, self.w2_a)):
            rows, cols = self._factor_shape(i)
            parts.append(f"w{i} {rows}x{cols}" + ("" if a is None else f" r={int(a.shape[-1])}"))
        return f"{', '.join(parts)} scale={self.scale:g}"

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        """The factors share only the stack axes with the weight (their other axes split flattened ones)."""
        stack = self.layout.axes()[0]
        return {name: (*stack, None, None) for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        if problem := check_ndim(self.layout, weight_shape):
            return problem
        stack, fan_in, fan_out = self.layout.split(weight_shape)
        if (fan_in, fan_out) != (self.fan_in_shape, self.fan_out_shape):
            return f"the adapter was made for fan-in {self.fan_in_shape} and fan-out {self.fan_out_shape}"
        (m, l_), (n, k) = self._factor_shape(1), self._factor_shape(2)
        if m * n != math.prod(fan_in) or l_ * k != math.prod(fan_out):
            return f"W1 ({m}, {l_}) ⊗ W2 ({n}, {k}) is not ({math.prod(fan_in)}, {math.prod(fan_out)})"
        for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"):
            leaf = getattr(self, name)
            if leaf is not None and tuple(leaf.shape[: len(stack)]) != stack:
                return f"`{name}` {tuple(leaf.shape)} does not lead with the stack axes {stack}"
        return None

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(W₁, W₂)`` in float32."""
        return _product(self.w1, self.w1_a, self.w1_b), _product(self.w2, self.w2_a, self.w2_b)

    def delta(self, kernel_shape: Sequence[int]) -> jax.Array:
        """``scale · W₁ ⊗ W₂`` reshaped to ``kernel_shape``, in float32 (a weight-sized array: merge and einsum)."""
        w1, w2 = self.factors()
        stack = math.prod(self.layout.split(kernel_shape)[0])
        w1 = jnp.reshape(w1, (stack, *w1.shape[-2:]))
        w2 = jnp.reshape(w2, (stack, *w2.shape[-2:]))
        kron = jnp.einsum("sip,sjq->sijpq", w1, w2, precision=_HI) * self.scale
        return jnp.reshape(kron, tuple(kernel_shape))

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        return fold_weight(weight, self.delta(weight.shape), sign), None

    def forward(self, call: LayerCall) -> jax.Array:
        y = call.base(call.x)
        x = call.x.astype(y.dtype)
        if call.kind in ("dense", "dense_general") and self.layout.stack == 0:
            out = self._kron_dense(x, call.axes, y.dtype, call.precision)
        else:
            stack = (self.w1 if self.w1 is not None else self.w1_a).shape[: self.layout.stack]
            delta = self.delta((*stack, *self.fan_in_shape, *self.fan_out_shape)).astype(y.dtype)
            out = call.contract(delta, x)
        return y + out.astype(y.dtype)

    def _kron_dense(self, x: jax.Array, axes: tuple[int, ...] | None, dtype: Any, precision: Any) -> jax.Array:
        """``x·(scale · W₁ ⊗ W₂)`` by two reshaped contractions (W₂ first, then W₁); no Kronecker product."""
        n_in = len(self.fan_in_shape)
        if axes is not None:
            x = jnp.moveaxis(x, tuple(ax % x.ndim for ax in axes), tuple(range(x.ndim - n_in, x.ndim)))
        lead = x.shape[: x.ndim - n_in]
        (m, _), (n, _) = self._factor_shape(1), self._factor_shape(2)
        x = jnp.reshape(x, (*lead, m, n))

        def dot(spec: str, lhs: jax.Array, rhs: Any) -> jax.Array:
            return jnp.einsum(spec, lhs, rhs.astype(dtype), precision=precision)

        if self.w2 is not None:
            t = dot("...mn,nk->...mk", x, self.w2)
        else:
            t = dot("...mr,rk->...mk", dot("...mn,nr->...mr", x, self.w2_a), self.w2_b)
        t = t * jnp.asarray(self.scale, dtype)
        if self.w1 is not None:
            out = dot("...mk,ml->...lk", t, self.w1)
        else:
            out = dot("...rk,rl->...lk", dot("...mk,mr->...rk", t, self.w1_a), self.w1_b)
        return jnp.reshape(out, (*lead, *self.fan_out_shape))


@dataclasses.dataclass(frozen=True)
class LokrConfig(RankedConfig):
    """LoKr hyper-parameters (HF PEFT's ``LoKrConfig``); frozen, hashable and JSON round-trippable.

    Args:
      rank: the rank of the low-rank Kronecker factor(s).
      alpha: ``scale = alpha / rank`` (HF PEFT's scaling, also when both factors are full).
      targets: ``"all-linear"``, a regex over leaf paths, module names, or a predicate (as for ``LoraConfig``).
      exclude: removed from the selection.
      rank_pattern: ``{path regex: rank}``; the first matching entry overrides ``rank``.
      alpha_pattern: ``{path regex: alpha}``, likewise.
      dtype: dtype of the factors.
      decompose_factor: how :func:`.factorization` splits the flattened fan-in and fan-out sizes (-1: the divisor
        pair nearest the square root).
      decompose_both: also write ``W₁`` low-rank (when ``rank < max(W₁'s dims) / 2``, as in HF PEFT).

    As in HF PEFT: fan-in ``m·n`` and fan-out ``l·k`` come from ``factorization``; ``W₁`` is ``(m, l)``, ``W₂``
    ``(n, k)``; ``W₂`` is low-rank when ``rank < max(n, k) / 2``. Initialisation (``init_weights=True``): ``W₁``
    zeros (or its fan-out factor zeros, the other kaiming-uniform), ``W₂`` kaiming-uniform, so ``ΔW = 0`` at
    init. Dense, DenseGeneral (fan-in and fan-out flattened) and Einsum kernels; convolutions, ``rank_dropout``
    and ``module_dropout`` are not implemented.

    References:
      Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", 2024.
    """

    method: ClassVar[str] = "lokr"
    title: ClassVar[str] = "LoKr"
    kinds: ClassVar[tuple[str, ...]] = ("dense", "dense_general", "einsum")

    decompose_factor: int = -1
    decompose_both: bool = False

    def __post_init__(self) -> None:
        factor = self.decompose_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or (factor < 1 and factor != -1):
            raise ValueError(
                f"`decompose_factor`={factor!r}; expected -1 (split each dimension near its square root) or a "
                "positive integer such as 4."
            )
        if not isinstance(self.decompose_both, bool):
            raise ValueError(f"`decompose_both`={self.decompose_both!r}; expected True or False (not a string).")
        super().__post_init__()

    def shapes(self, path: str, shape: Sequence[int], layout: Layout) -> dict[str, tuple[int, ...]]:
        """The factor fields of the adapter at ``path`` on a weight of ``shape`` and their shapes."""
        stack, fan_in, fan_out = layout.split(shape)
        m, n = factorization(math.prod(fan_in), self.decompose_factor)
        l_, k = factorization(math.prod(fan_out), self.decompose_factor)
        rank = self.rank_for(path)
        out: dict[str, tuple[int, ...]] = {}
        if self.decompose_both and rank < max(m, l_) / 2:
            out |= {"w1_a": (*stack, m, rank), "w1_b": (*stack, rank, l_)}
        else:
            out["w1"] = (*stack, m, l_)
        if rank < max(n, k) / 2:
            out |= {"w2_a": (*stack, n, rank), "w2_b": (*stack, rank, k)}
        else:
            out["w2"] = (*stack, n, k)
        return out

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> LokrWeights:
        self.check_weight(path, weight, layout)
        _, fan_in, fan_out = layout.split(weight.shape)
        shapes, dtype = self.shapes(path, weight.shape, layout), jnp.dtype(self.dtype)
        keys = dict(zip(("w1_a", "w2", "w2_a", "w2_b"), jax.random.split(key, 4), strict=True))
        # HF PEFT (its (out, in) layout, transposed here): W1 (or W1's fan-out factor) zeros, the rest
        # kaiming-uniform U(±1/√fan_in), PyTorch's fan-in being each factor's rows here (its columns in PEFT)
        arrays: dict[str, jax.Array] = {}
        for name, shape in shapes.items():
            if name in ("w1", "w1_b"):
                arrays[name] = jnp.zeros(shape, dtype)
            else:
                arrays[name] = uniform(keys[name], shape, dtype, shape[-2])
        return LokrWeights(
            **arrays, scale=self.scale_for(path), fan_in_shape=fan_in, fan_out_shape=fan_out, layout=layout
        )


# ----------------------------------------------------------------------------------------------- PEFT codec

_SUFFIXES = {
    ".lokr_w1": "w1",
    ".lokr_w1_a": "w1_a",
    ".lokr_w1_b": "w1_b",
    ".lokr_w2": "w2",
    ".lokr_w2_a": "w2_a",
    ".lokr_w2_b": "w2_b",
    ".lokr_t2": "t2",
}
_WHAT = "LoKr factors (lokr_w1, lokr_w1_a/b, lokr_w2, lokr_w2_a/b)"
#: Our factor field <-> the part of PEFT's tensor name after ``lokr_`` (each the other's transpose; A and B swap).
_SWAP = {"w1": "w1", "w1_a": "w1_b", "w1_b": "w1_a", "w2": "w2", "w2_a": "w2_b", "w2_b": "w2_a"}


def _checked(target: Any, cfg: LokrConfig) -> Any:
    node, path = target.node, target.path
    want = cfg.shapes(path, target.shape, target.layout)
    have = {f: tuple(getattr(node, f).shape) for f in _SWAP if getattr(node, f) is not None}
    if have != want:
        raise ValueError(
            f"adapter {path!r} has LoKr factors {have}, but `cfg` (rank {cfg.rank_for(path)}, decompose_both="
            f"{cfg.decompose_both}, decompose_factor={cfg.decompose_factor}) gives {want}; pass its config."
        )
    return hfc.check_rank_scale(target, cfg, cfg.rank_for(path), node.scale)


def _to_hf(req: hfc.Export) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of LoKr adapters."""
    cfg = req.cfg

    def tensors_of(target: Any, layer: int | None) -> dict[str, np.ndarray]:
        fields = [f for f in _SWAP if getattr(target.node, f) is not None]
        return {f".lokr_{_SWAP[f]}": target.array(f, layer).T for f in fields}

    tensors, names = hfc.write_modules(req, LokrWeights, tensors_of, lambda t: _checked(t, cfg))
    config = _lycoris.config_fields(req, names, "LOKR")
    config |= {
        "decompose_both": cfg.decompose_both,
        "decompose_factor": cfg.decompose_factor,
        "rank_dropout_scale": False,
        "target_modules": hfc.target_modules(req, names),
    }
    return config, tensors


def _group_arrays(group: hfc.Group, layout: Layout, cfg: LokrConfig) -> dict[str, np.ndarray]:
    """Our factor arrays at ``group.path`` from its HF modules (stacked when ``{layer}``), checked against ``cfg``."""
    want = {f: s[layout.stack :] for f, s in cfg.shapes(group.path, group.shape, layout).items()}
    out: dict[str, list[np.ndarray]] = {f: [] for f in want}
    for name, entry in group.modules:
        have = {f"lokr_{k}": np.shape(v) for k, v in entry.items()}
        expected = {f"lokr_{_SWAP[f]}": s[::-1] for f, s in want.items()}
        if have != expected:
            raise ValueError(
                f"HF module {name!r} has LoKr tensors {dict(sorted(have.items()))}; for {group.path!r} of shape "
                f"{group.shape} {hfc.CONFIG_NAME} (rank {cfg.rank_for(group.path)}, "
                f"decompose_both={cfg.decompose_both}, decompose_factor={cfg.decompose_factor}) gives "
                f"{dict(sorted(expected.items()))} (PEFT's rule). Do "
                "the config and tensors belong together, and to this base model?"
            )
        for k, v in entry.items():
            out[_SWAP[k]].append(np.asarray(v).T)
    return {k: group.stack(v) for k, v in out.items()}


def _from_hf(req: hfc.Import) -> tuple[LokrConfig, dict[str, Any]]:
    """A ``LokrConfig`` and adapter tree from a PEFT ``LOKR`` adapter."""
    fields, groups = _lycoris.groups(req, "LOKR", _SUFFIXES, _WHAT)
    layouts = dict(req.layouts or {})
    arrays, used_layouts, ranks, alphas = {}, {}, {}, {}
    for group in groups:
        ranks[group.path], alphas[group.path] = hfc.group_rank_alpha(
            fields.rank_alpha, group, [None] * len(group.modules)
        )
        layout = _lycoris.layout_of(group, layouts, fields)
        if layout.kind == "conv":
            raise ValueError(
                f"HF module {group.first!r} is a LoKr convolution ({group.path!r}); jaxpeft's LoKr adapts Dense, "
                "DenseGeneral and Einsum kernels only. Leave the convolution out of the adapter."
            )
        one = LokrConfig(
            rank=ranks[group.path], decompose_factor=fields.decompose_factor, decompose_both=fields.decompose_both
        )
        used_layouts[group.path] = layout
        arrays[group.path] = _group_arrays(group, layout, one)
    cfg = LokrConfig(
        **hfc.per_path_args(fields.r, fields.alpha, ranks, alphas, arrays, req.dtype),
        decompose_factor=fields.decompose_factor,
        decompose_both=fields.decompose_both,
    )
    return cfg, hfc.build_adapters(cfg, req.params, used_layouts, arrays)


LokrConfig.codec = hfc.PeftCodec(
    "LOKR",
    "LoKrConfig",
    _lycoris.LOKR_FIELDS,
    _to_hf,
    _from_hf,
    tensor_parts=frozenset(("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")),
)
