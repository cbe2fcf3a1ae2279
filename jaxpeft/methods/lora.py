"""LoRA: the config, the adapter node ``LoraWeights`` and its forward rule ``base(x) + s·(x·A)·B``."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft._select import Layout
from jaxpeft.api import fold_weight
from jaxpeft.hf._lora_format import lora_codec
from jaxpeft.methods._factors import ZERO_INITS, LowRankConfig, LowRankNode
from jaxpeft.protocol import STATIC, Adapter, LayerAdapter, adapter_items

__all__ = ["LoraConfig", "LoraWeights", "to_plain_lora"]

# Deprecated homes of the shared helpers (now ``jaxpeft.methods._factors``), kept for code written against 0.2.
from jaxpeft.methods._factors import (
    RankFields,  # noqa: F401
    check_dtype,  # noqa: F401
    check_factors,  # noqa: F401
    factor_axes,  # noqa: F401
    factors_delta,  # noqa: F401
    is_number,  # noqa: F401
)

_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
# Layer kinds whose weight is one linear map (input features -> output features), as PEFT's nn.Linear.
_DECOMPOSABLE = ("dense", "dense_general", "einsum")


@dataclasses.dataclass(frozen=True)
class LoraConfig(LowRankConfig):
    """LoRA hyper-parameters; frozen, hashable (static under ``jax.jit``) and JSON round-trippable.

    Args:
      rank: the rank r of ``ΔW = A·B``.
      alpha: scaling numerator: ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``).
      targets: ``"all-linear"``, a regex over leaf paths, a list of module names (HF ``target_modules``), or a
        predicate ``fn(path, leaf) -> bool``.
      exclude: the same forms (not ``"all-linear"``), removed from the selection.
      rank_pattern: ``{path regex: rank}``; the first matching entry overrides ``rank`` for that leaf.
      alpha_pattern: ``{path regex: alpha}``, likewise.
      dropout: dropout rate on the adapter branch's input, applied only when a dropout key is given.
      use_rslora: rank-stabilised scaling ``alpha / sqrt(rank)``.
      init: ``"kaiming"`` (HF default: A kaiming-uniform, B zeros) or ``"gaussian"`` (A ~ N(0, 1/r²), B zeros).
        Embeddings always start with A zeros and B ~ N(0, 1), as in HF PEFT. Either way ΔW = 0 at init.
        The base-adjusting inits of HF PEFT start from the weight instead, and move ``s·A·B`` out of the base:
        ``"pissa"`` (A, B from the top-``r`` singular triplets, ``s·A·B = U_r S_r V_rᵀ``), ``"pissa_niter_<n>"``
        (the same from a randomised SVD with ``n`` subspace iterations, seeded by the init key) and ``"olora"``
        (``B = Q[:, :r]ᵀ``, ``A = R[:r]ᵀ`` of the QR decomposition of the torch-layout weight). The decomposition
        runs in float32 per stack slice (fan-in and fan-out axes flattened); the factors get ``dtype``. Their
        adapters are the identity only over the residual weights ``W - s·A·B``, so ``jaxpeft.init`` refuses
        them: use :func:`jaxpeft.init_adjusted` (``jaxpeft.linen.init_adjusted``; ``jaxpeft.nnx.adapt`` swaps the
        residual in itself). Dense, DenseGeneral and Einsum weights only (HF PEFT decomposes nn.Linear only), with
        ``rank`` at most the smaller side of each weight, and LoRA only (not ``DoraConfig``). ``merge`` and
        ``jaxpeft.checkpoint`` work as usual over the residual params (merged = original ``W`` + the trained
        update, as in PEFT); to export to HF PEFT or to use the update over the original weights, convert with
        :func:`to_plain_lora`.
      dtype: dtype of the adapter arrays (float32 by default, also over a bf16 base). The adapted contraction
        casts A and B to the activation dtype; activations are never cast up.

    References:
      Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
      Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023.
      Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models", 2024.
      Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", 2024.

    Example:
      >>> import jaxpeft
      >>> cfg = jaxpeft.LoraConfig(rank=8, alpha=16, targets="all-linear")
      >>> cfg.to_dict()["method"], cfg.rank, cfg.alpha
      ('lora', 8, 16.0)
      >>> jaxpeft.config_from_dict(cfg.to_dict()) == cfg  # JSON round trip
      True
    """

    method: ClassVar[str] = "lora"
    inits: ClassVar[tuple[str, ...]] = (*ZERO_INITS, "pissa", "olora")

    def check_init(self) -> None:
        if isinstance(self.init, str) and _PISSA_NITER.fullmatch(self.init):
            return
        if self.init not in self.inits:
            raise ValueError(
                f"`init`={self.init!r}; expected one of {self.inits} or 'pissa_niter_<n>' (e.g. 'pissa_niter_4')."
            )

    @property
    def base_adjustment(self) -> str | None:
        """``"init='pissa'"`` (or the ``pissa_niter_<n>``/``olora`` init) when it changes the base; else None."""
        return None if self.init in ZERO_INITS else f"init={self.init!r}"

    def adjust_base(self, path: str, weight: Any, node: Adapter) -> jax.Array:
        """The residual ``W - s·A·B`` of PiSSA/OLoRA, formed in float32 from the stored factors, in ``weight``'s dtype.

        Built from the factors as stored (already in ``dtype``), so the adapted model over the residual equals the
        original model up to the rounding of the residual to the weight's dtype.
        """
        if not isinstance(node, LoraWeights):
            raise TypeError(f"adapter {path!r} is a {type(node).__name__}; LoraConfig.adjust_base takes LoraWeights.")
        if quant.is_quantized(weight):
            raise ValueError(_quantized_message(path, self.init))
        return fold_weight(weight, node.delta(weight.shape), -1)

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        if self.base_adjustment is not None:
            for path, leaf, layout in rows:
                self._check_decomposable(path, tuple(leaf.shape), layout)
        self.check_patterns(rows)

    def _check_decomposable(self, path: str, shape: tuple[int, ...], layout: Layout) -> None:
        if layout.kind not in _DECOMPOSABLE:
            raise ValueError(
                f"`init`={self.init!r} cannot initialise {path!r}, a {layout.kind!r} weight: the base-adjusting inits "
                f"decompose linear maps only ({', '.join(_DECOMPOSABLE)}), like HF PEFT's nn.Linear. Leave it out of "
                "`targets` (e.g. `exclude`), or adapt it in a second config with init='kaiming'."
            )
        _, fan_in, fan_out = layout.split(shape)
        rank, smaller = self.rank_for(path), min(math.prod(fan_in), math.prod(fan_out))
        if rank > smaller:
            raise ValueError(
                f"`init`={self.init!r} needs rank <= min(fan_in, fan_out) = {smaller} for {path!r} (shape {shape}); "
                f"got rank {rank}. Lower `rank` or set it for this path in `rank_pattern`."
            )

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> Adapter:
        if self.base_adjustment is not None:
            a, b = self.decompose(path, weight, layout, key)
        else:
            a, b = self.init_factors(path, weight.shape, layout, key)
        return LoraWeights(a, b, self.scale_for(path), self.dropout, layout=layout)

    def decompose(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """PiSSA's or OLoRA's initial ``(A, B)`` from the values of ``weight`` (float32 maths, ``dtype`` result).

        The kernel is flattened to ``(stack, fan_in, fan_out)`` and each stack slice decomposed on its own
        (``vmap``); PiSSA with ``pissa_niter_<n>`` draws one random test matrix per slice from ``key``.
        """
        if isinstance(weight, jax.ShapeDtypeStruct):
            raise ValueError(
                f"`init`={self.init!r} decomposes the base weight {path!r}, so `params` must hold arrays, not "
                "jax.ShapeDtypeStruct (wrap the whole init in jax.eval_shape for shapes only)."
            )
        if quant.is_quantized(weight):
            raise ValueError(_quantized_message(path, self.init))
        shape = tuple(weight.shape)
        self._check_decomposable(path, shape, layout)
        stack, fan_in, fan_out = layout.split(shape)
        rank, scale = self.rank_for(path), self.scale_for(path)
        w = jnp.reshape(weight.astype(jnp.float32), (math.prod(stack), math.prod(fan_in), math.prod(fan_out)))
        if self.init == "olora":
            a, b = jax.vmap(lambda m: _olora(m, rank))(w)
        elif self.init == "pissa":
            a, b = jax.vmap(lambda m: _pissa(m, rank, scale))(w)
        else:
            niter = int(cast(re.Match, _PISSA_NITER.fullmatch(self.init)).group(1))
            keys = jax.random.split(key, w.shape[0])
            a, b = jax.vmap(lambda m, k: _pissa_lowrank(m, rank, scale, niter, k))(w, keys)
        dtype = jnp.dtype(self.dtype)
        return jnp.reshape(a, (*stack, *fan_in, rank)).astype(dtype), jnp.reshape(b, (*stack, rank, *fan_out)).astype(
            dtype
        )


_HI = jax.lax.Precision.HIGHEST


def _quantized_message(path: str, init: str) -> str:
    return (
        f"`init`={init!r} cannot adjust {path!r}: the weight is quantised (jaxpeft.quantize), and the residual "
        "W - s·A·B must be formed from the full-precision weight. Initialise on the float params, then quantise the "
        "residual params that jaxpeft.init_adjusted returns."
    )


def _pissa_factors(u: jax.Array, s: jax.Array, vh: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
    """``A = U·√(S/scale)``, ``B = √(S/scale)·Vh``: then ``scale·A·B = U·S·Vh``."""
    root = jnp.sqrt(s / scale)
    return u * root[None, :], root[:, None] * vh


def _pissa(m: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """PiSSA on one ``(fan_in, fan_out)`` kernel: the top-``rank`` singular triplets (full SVD)."""
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    return _pissa_factors(u[:, :rank], s[:rank], vh[:rank], scale)


def _pissa_lowrank(m: jax.Array, rank: int, scale: float, niter: int, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PiSSA from a randomised SVD (Halko et al., as ``torch.svd_lowrank`` with ``q=rank``, ``niter`` iterations)."""
    omega = jax.random.normal(key, (m.shape[1], rank), jnp.float32)
    q, _ = jnp.linalg.qr(jnp.matmul(m, omega, precision=_HI))
    for _ in range(niter):
        q, _ = jnp.linalg.qr(jnp.matmul(m.T, q, precision=_HI))
        q, _ = jnp.linalg.qr(jnp.matmul(m, q, precision=_HI))
    u, s, vh = jnp.linalg.svd(jnp.matmul(q.T, m, precision=_HI), full_matrices=False)
    return _pissa_factors(jnp.matmul(q, u, precision=_HI), s, vh, scale)


def _host_qr(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The reduced QR of ``m`` (``(..., rows, cols)``, float32) computed by NumPy's LAPACK on the host.

    Not ``jnp.linalg.qr``: on a 2-core CPU, XLA's concurrent scheduler deadlocks on a program holding several
    LAPACK QR custom calls (a jitted OLoRA init of two layers hung). The QR runs once, at init; NumPy's
    Householder QR is LAPACK's ``geqrf``/``orgqr``, as torch's (PEFT's) is.
    """
    k = min(m.shape[-2], m.shape[-1])
    out = (
        jax.ShapeDtypeStruct((*m.shape[:-1], k), jnp.float32),
        jax.ShapeDtypeStruct((*m.shape[:-2], k, m.shape[-1]), jnp.float32),
    )

    def qr(a: Any) -> tuple[np.ndarray, np.ndarray]:
        q, r = np.linalg.qr(np.asarray(a, np.float32))
        return np.asarray(q, np.float32), np.asarray(r, np.float32)

    q, r = jax.pure_callback(qr, out, m.astype(jnp.float32), vmap_method="broadcast_all")
    return q, r


def _olora(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA on one ``(fan_in, fan_out)`` kernel: ``mᵀ = Q·R`` (torch layout); ``A = R[:r]ᵀ``, ``B = Q[:, :r]ᵀ``."""
    q, r = _host_qr(m.T)
    return r[:rank].T, q[:, :rank].T


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraWeights(LowRankNode, LayerAdapter):
    """One LoRA adapter: ``ΔW = scale · A·B`` with A ``(*stack, *fan_in, r)`` and B ``(*stack, r, *fan_out)``.

    A pytree node whose leaves are ``a`` and ``b``; ``scale``, ``dropout`` and ``layout`` (required, keyword) are
    static metadata, so gradients, optimizer updates and ``jax.jit`` see only the two arrays. Its forward never forms
    ``W + ΔW``: the adapted layer computes ``base(x) + scale·(dropout(x)·A)·B``.
    """

    a: Any
    b: Any
    scale: float = dataclasses.field(metadata=STATIC)
    dropout: float = dataclasses.field(default=0.0, metadata=STATIC)
    layout: Layout = dataclasses.field(metadata=STATIC, kw_only=True)


LoraConfig.codec = lora_codec(LoraWeights, LoraConfig, dora=False)


# ------------------------------------------------------------------------------------------------ conversion


def _plain_pattern(items: Any, factor: float, kind: type) -> tuple[tuple[str, Any], ...]:
    return tuple((p, kind(v * factor)) for p, v in items)


def _lora_node(node: Adapter, name: str, path: str) -> LoraWeights:
    if not isinstance(node, LoraWeights):
        raise ValueError(f"`{name}` adapter {path!r} is a {type(node).__name__}, not LoraWeights.")
    return node


def to_plain_lora(cfg: LoraConfig, trained: Any, initial: Any) -> tuple[LoraConfig, dict[str, Any]]:
    """Trained PiSSA/OLoRA adapters as plain LoRA over the ORIGINAL weights, as PEFT's conversion does.

    With ``W = W_res + s·A0·B0`` at init and ``W_res + s·A·B`` after training, the update over the original weight
    is ``s·A·B - s·A0·B0 = s·[A | A0]·[B ; -B0]``: a LoRA of rank ``2r`` at the same scale. The returned config
    has ``rank`` (and every ``rank_pattern`` entry) doubled, ``alpha`` (and ``alpha_pattern``) doubled (with
    ``use_rslora``: times √2), and ``init='kaiming'``, so each adapter's scale is unchanged and the config fits
    ``jaxpeft.hf.export_adapters``, ``jaxpeft.checkpoint`` and ``jaxpeft.init`` shapes. Guarantee: the converted
    adapters over the original params compute the trained PiSSA/OLoRA model (over the residual params) up to
    float rounding; ``merge(original, converted) ≈ merge(residual, trained)``. Works for any ``LoraConfig``
    (for ``kaiming``/``gaussian`` inits the second half is the initial adapter, whose product is zero).

    Args:
      cfg: the ``LoraConfig`` both adapter trees were made with.
      trained: the adapters after training.
      initial: the adapters ``jaxpeft.init_adjusted`` returned (same paths and shapes).

    Returns:
      ``(plain_cfg, adapters)``: a ``LoraConfig`` and ``LoraWeights`` nodes of rank ``2r``.

    Raises:
      TypeError: ``cfg`` is not a ``LoraConfig`` (DoRA's update is not linear in its factors).
      ValueError: the two trees differ in paths or shapes, or do not match ``cfg``.
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(
            f"`cfg` is a {type(cfg).__name__}; to_plain_lora converts LoraConfig adapters only (a DoRA or other "
            "update is not a difference of low-rank products)."
        )
    table, start = dict(adapter_items(trained)), dict(adapter_items(initial))
    if sorted(table) != sorted(start):
        missing, extra = sorted(set(table) - set(start)), sorted(set(start) - set(table))
        raise ValueError(
            f"`trained` and `initial` differ in paths: only in trained {missing[:4]}, only in initial {extra[:4]}; "
            "pass the adapters jaxpeft.init_adjusted returned for the same config."
        )
    factor = math.sqrt(2.0) if cfg.use_rslora else 2.0
    plain = dataclasses.replace(
        cfg,
        rank=2 * cfg.rank,
        alpha=cfg.alpha * factor,
        rank_pattern=_plain_pattern(cfg.rank_pattern, 2, int),
        alpha_pattern=_plain_pattern(cfg.alpha_pattern, factor, float),
        init="kaiming",
    )
    out: dict[str, Any] = {}
    for path in sorted(table):
        node, node0 = _lora_node(table[path], "trained", path), _lora_node(start[path], "initial", path)
        shapes = {k: tuple(v.shape) for k, v in leaves_with_paths(node)}
        shapes0 = {k: tuple(v.shape) for k, v in leaves_with_paths(node0)}
        if shapes != shapes0 or node.layout != node0.layout:
            raise ValueError(
                f"adapter {path!r}: trained {shapes} and initial {shapes0} (or their layouts) differ; pass the "
                "adapters of the same init."
            )
        if node.rank != cfg.rank_for(path) or not math.isclose(node.scale, cfg.scale_for(path), rel_tol=1e-6):
            raise ValueError(
                f"adapter {path!r} has rank {node.rank} and scale {node.scale}, but `cfg` gives rank "
                f"{cfg.rank_for(path)} and scale {cfg.scale_for(path)}; pass the config the adapters were made with."
            )
        a = jnp.concatenate([node.a, node0.a.astype(node.a.dtype)], axis=-1)
        b = jnp.concatenate([node.b, -node0.b.astype(node.b.dtype)], axis=node.layout.stack)
        out = set_path(out, path, LoraWeights(a, b, plain.scale_for(path), node.dropout, layout=node.layout))
    return plain, out
