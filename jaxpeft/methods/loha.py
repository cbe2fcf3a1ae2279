"""LoHa: a weight update that is the Hadamard product of two low-rank products, ``s·(A₁·B₁) ⊙ (A₂·B₂)``; and its
PEFT ``LOHA`` codec.

HF tensors (no ``.weight``): ``<module>.hada_w1_a`` ``[out, r]``, ``.hada_w1_b`` ``[r, in]``, likewise ``hada_w2_*``,
with ``ΔW = (alpha/r)·(w1_a·w1_b) ⊙ (w2_a·w2_b)`` in torch's ``(out, in)`` layout: our ``b1ᵀ``, ``a1ᵀ``, ``b2ᵀ``,
``a2ᵀ``. Kernels with several fan-in or fan-out axes are flattened; a Conv's fan-in is flattened in torch's
``(in, *window)`` order (ours is ``(*window, in)``), as PEFT does without ``use_effective_conv2d``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._select import Layout
from jaxpeft.api import fold_weight
from jaxpeft.hf import _lycoris
from jaxpeft.hf import codec as hfc
from jaxpeft.methods._factors import RankedConfig, check_factors, factor_axes, factors_delta, uniform
from jaxpeft.protocol import STATIC, LayerAdapter, LayerCall

__all__ = ["LohaConfig", "LohaWeights"]


def delta_output(call: LayerCall, delta: jax.Array, layout: Layout) -> jax.Array:
    """Deprecated: ``call.contract(delta)``, the layer's contraction with a kernel-shaped update (any call kind)."""
    return call.contract(delta)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LohaWeights(LayerAdapter):
    """One LoHa adapter: ``ΔW = scale · (A₁·B₁) ⊙ (A₂·B₂)``, A ``(*stack, *fan_in, r)``, B ``(*stack, r, *fan_out)``.

    Leaves ``a1, b1, a2, b2``; ``scale`` and ``layout`` are static. HF PEFT's ``hada_w1_a``/``hada_w1_b`` (its
    ``(out, in)`` layout) are ``b1ᵀ``/``a1ᵀ`` here, likewise for pair 2. The Hadamard product of two rank-r
    products has rank up to r², but it exists only as a whole matrix: the forward forms ``ΔW`` (weight-sized, in
    float32 then cast to the activation dtype) and adds ``x·ΔW`` to ``base(x)``; it never forms ``W + ΔW`` and no
    gradient reaches ``W``. The price over LoRA is one weight-sized temporary (and its gradient) per adapted layer.
    """

    a1: Any
    b1: Any
    a2: Any
    b2: Any
    scale: float = dataclasses.field(metadata=STATIC)
    layout: Layout = dataclasses.field(metadata=STATIC, kw_only=True)

    @property
    def rank(self) -> int:
        return int(self.a1.shape[-1])

    def describe(self) -> str:
        return f"r={self.rank} scale={self.scale:g}"

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        axes = factor_axes(self.layout)
        return {"a1": axes["a"], "b1": axes["b"], "a2": axes["a"], "b2": axes["b"]}

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        return check_factors(self.a1, self.b1, self.layout, weight_shape) or check_factors(
            self.a2, self.b2, self.layout, weight_shape
        )

    def delta(self, kernel_shape: tuple[int, ...]) -> jax.Array:
        """``scale · (A₁·B₁) ⊙ (A₂·B₂)`` reshaped to ``kernel_shape``, in float32."""
        first = factors_delta(self.a1, self.b1, 1.0, self.layout, kernel_shape)
        return first * factors_delta(self.a2, self.b2, self.scale, self.layout, kernel_shape)

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        return fold_weight(weight, self.delta(weight.shape), sign), None

    def forward(self, call: LayerCall) -> jax.Array:
        y = call.base(call.x)
        shape = (*self.a1.shape[:-1], *self.b1.shape[self.layout.stack + 1 :])
        delta = self.delta(shape).astype(y.dtype)
        return y + call.contract(delta, call.x.astype(y.dtype)).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LohaConfig(RankedConfig):
    """LoHa hyper-parameters (HF PEFT's ``LoHaConfig``); frozen, hashable and JSON round-trippable.

    Args:
      rank: the rank r of each of the two products (``ΔW`` has rank up to r²).
      alpha: ``scale = alpha / rank``.
      targets: ``"all-linear"``, a regex over leaf paths, module names, or a predicate (as for ``LoraConfig``).
      exclude: removed from the selection.
      rank_pattern: ``{path regex: rank}``; the first matching entry overrides ``rank``.
      alpha_pattern: ``{path regex: alpha}``, likewise.
      dtype: dtype of the factors.

    HF PEFT's initialisation: A₁, B₁ and B₂ kaiming-uniform (``U(±1/√fan_in)`` with PyTorch's fan-in: the fan-in
    size for A, r for B) and A₂ zeros, so ``ΔW = 0`` at init. Dense, DenseGeneral (fan-in × fan-out flattened),
    Einsum and Conv kernels; ``rank_dropout``/``module_dropout`` and the CP decomposition of convolutions
    (``use_effective_conv2d``) are not implemented.

    References:
      Hyeon-Woo et al., "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning", 2022.
      Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation", 2024.
    """

    method: ClassVar[str] = "loha"
    title: ClassVar[str] = "LoHa"
    kinds: ClassVar[tuple[str, ...]] = ("dense", "dense_general", "einsum", "conv")

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> LohaWeights:
        self.check_weight(path, weight, layout)
        stack, fan_in, fan_out = layout.split(weight.shape)
        rank, dtype = self.rank_for(path), jnp.dtype(self.dtype)
        a_shape, b_shape = (*stack, *fan_in, rank), (*stack, rank, *fan_out)
        k1, k2, k3 = jax.random.split(key, 3)
        a1 = uniform(k1, a_shape, dtype, math.prod(fan_in))
        b1 = uniform(k2, b_shape, dtype, rank)
        b2 = uniform(k3, b_shape, dtype, rank)
        return LohaWeights(a1, b1, jnp.zeros(a_shape, dtype), b2, self.scale_for(path), layout=layout)


# ----------------------------------------------------------------------------------------------- PEFT codec

_SUFFIXES = {
    ".hada_w1_a": "w1_a",
    ".hada_w1_b": "w1_b",
    ".hada_w2_a": "w2_a",
    ".hada_w2_b": "w2_b",
    ".hada_t1": "t1",
    ".hada_t2": "t2",
}
_WHAT = "LoHa factors (hada_w1_a/b, hada_w2_a/b)"


def _torch_in(a: np.ndarray, layout: Layout) -> np.ndarray:
    """A fan-in factor ``(*fan_in, r)`` as torch's ``[r, in]`` (a Conv's ``(*window, in)`` as ``in``-major)."""
    if layout.kind == "conv":
        n = a.ndim
        a = np.transpose(a, (n - 1, n - 2, *range(n - 2)))
        return np.reshape(a, (a.shape[0], -1))
    return np.reshape(a, (-1, a.shape[-1])).T


def _ours_in(t: np.ndarray, layout: Layout, fan_in: tuple[int, ...]) -> np.ndarray:
    """Torch's ``[r, in]`` as our fan-in factor ``(*fan_in, r)`` (inverse of :func:`_torch_in`)."""
    if layout.kind == "conv":
        t = np.reshape(t, (t.shape[0], fan_in[-1], *fan_in[:-1]))
        return np.transpose(t, (*range(2, t.ndim), 1, 0))
    return np.reshape(t.T, (*fan_in, t.shape[0]))


def _tensors(target: hfc.Target, layer: int | None) -> dict[str, np.ndarray]:
    out = {}
    for i in (1, 2):
        a, b = target.array(f"a{i}", layer), target.array(f"b{i}", layer)
        out[f".hada_w{i}_a"] = np.reshape(b, (b.shape[0], -1)).T
        out[f".hada_w{i}_b"] = _torch_in(a, target.layout)
    return out


def _to_hf(req: hfc.Export) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of LoHa adapters."""
    tensors, names = hfc.write_modules(
        req, LohaWeights, _tensors, lambda t: hfc.check_rank_scale(t, req.cfg, t.node.rank, t.node.scale)
    )
    return {**_lycoris.config_fields(req, names, "LOHA"), "target_modules": hfc.target_modules(req, names)}, tensors


def _group_arrays(group: hfc.Group, layout: Layout, rank: int) -> dict[str, np.ndarray]:
    """Our ``{a1, b1, a2, b2}`` at ``group.path`` from its HF modules (stacked when ``{layer}``)."""
    _, fan_in, fan_out = layout.split(group.shape)
    n_in, n_out = math.prod(fan_in), math.prod(fan_out)
    out: dict[str, list[np.ndarray]] = {"a1": [], "b1": [], "a2": [], "b2": []}
    for name, entry in group.modules:
        for i in (1, 2):
            w_a, w_b = np.asarray(entry[f"w{i}_a"]), np.asarray(entry[f"w{i}_b"])
            if w_a.shape != (n_out, rank) or w_b.shape != (rank, n_in):
                raise ValueError(
                    f"HF module {name!r} has hada_w{i}_a {w_a.shape} and hada_w{i}_b {w_b.shape}; {group.path!r} of "
                    f"shape {group.shape} needs {(n_out, rank)} and {(rank, n_in)} per layer (rank {rank}). Does the "
                    "adapter belong to this base model?"
                )
            out[f"a{i}"].append(_ours_in(w_b, layout, fan_in))
            out[f"b{i}"].append(np.reshape(w_a.T, (rank, *fan_out)))
    return {k: group.stack(v) for k, v in out.items()}


def _from_hf(req: hfc.Import) -> tuple[LohaConfig, dict[str, Any]]:
    """A ``LohaConfig`` and adapter tree from a PEFT ``LOHA`` adapter."""
    fields, groups = _lycoris.groups(req, "LOHA", _SUFFIXES, _WHAT)
    layouts = dict(req.layouts or {})
    arrays, used_layouts, ranks, alphas = {}, {}, {}, {}
    for group in groups:
        for name, entry in group.modules:
            missing = sorted({"w1_a", "w1_b", "w2_a", "w2_b"} - set(entry))
            if missing:
                hf_names = [f"hada_{m}" for m in missing]
                raise ValueError(f"HF module {name!r} lacks LoHa tensors {hf_names}; the file is incomplete.")
        tensor_ranks = [int(np.shape(e["w1_b"])[0]) if np.ndim(e["w1_b"]) == 2 else None for _, e in group.modules]
        ranks[group.path], alphas[group.path] = hfc.group_rank_alpha(fields.rank_alpha, group, tensor_ranks)
        used_layouts[group.path] = _lycoris.layout_of(group, layouts, fields)
        arrays[group.path] = _group_arrays(group, used_layouts[group.path], ranks[group.path])
    cfg = LohaConfig(**hfc.per_path_args(fields.r, fields.alpha, ranks, alphas, arrays, req.dtype))
    return cfg, hfc.build_adapters(cfg, req.params, used_layouts, arrays)


LohaConfig.codec = hfc.PeftCodec(
    "LOHA",
    "LoHaConfig",
    _lycoris.LOHA_FIELDS,
    _to_hf,
    _from_hf,
    tensor_parts=frozenset(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
)
