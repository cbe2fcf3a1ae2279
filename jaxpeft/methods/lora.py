"""LoRA: the config, the adapter node ``LoraWeights`` and its forward rule ``base(x) + s·(x·A)·B``."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft._select import ALL_LINEAR, Layout, TargetSpec, compile_regex, match_pattern
from jaxpeft.methods.base import STATIC, Adapter, LayerCall, MethodConfig, adapter_items, check_ndim, fold_weight

__all__ = ["LoraConfig", "LoraWeights", "to_plain_lora"]

_INITS = ("kaiming", "gaussian", "pissa", "olora")
_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")
# Layer kinds whose weight is one linear map (input features -> output features), as PEFT's nn.Linear.
_DECOMPOSABLE = ("dense", "dense_general", "einsum")


def _freeze_pattern(value: Any, name: str, kind: type) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, Mapping):
        items = tuple(value.items())
    elif (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and all(isinstance(kv, Sequence) and not isinstance(kv, str) and len(kv) == 2 for kv in value)
    ):
        items = tuple((kv[0], kv[1]) for kv in value)
    else:
        raise ValueError(f"`{name}`={value!r}; expected a mapping {{path regex: number}}, e.g. {{'q_proj': 16}}.")
    for pattern, number in items:
        if not isinstance(pattern, str):
            raise ValueError(f"`{name}` keys must be path regexes, got {pattern!r}.")
        if not is_number(number) or not math.isfinite(number) or number <= 0:
            raise ValueError(f"`{name}`[{pattern!r}]={number!r}; expected a positive finite number.")
        if kind is int and int(number) != number:
            raise ValueError(f"`{name}`[{pattern!r}]={number!r}; ranks are whole numbers.")
    return tuple((p, kind(n)) for p, n in items)


def is_number(value: Any) -> bool:
    """A real number, not a bool or a string (``"0.1"`` and ``True`` are refused where a rate or scale is meant)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_dtype(value: str) -> str:
    """The canonical name of a floating adapter dtype that JAX can hold; ``ValueError`` otherwise."""
    try:
        dtype = jnp.dtype(value)
    except TypeError as err:
        raise ValueError(f"`dtype`={value!r} is not a dtype name; use e.g. 'float32'.") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`dtype`={value!r}; adapters need a floating dtype such as 'float32'.")
    if dtype.itemsize == 8 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            f"`dtype`={value!r} needs 64-bit JAX (jax.config.update('jax_enable_x64', True)); without it the arrays "
            "would silently be float32. Use 'float32'."
        )
    return dtype.name


class RankFields:
    """What configs with ``rank``, ``alpha``, ``rank_pattern``/``alpha_pattern`` and ``dtype`` fields share.

    A mixin for frozen dataclass configs (LoRA, DoRA, LoHa, LoKr): the checks of those fields, their per-path
    lookups and the check that every pattern matches a target. Its ``__post_init__`` freezes the patterns and
    the selection (``MethodConfig.__post_init__``), after the subclass has run ``check_rank_alpha`` and its own
    checks.
    """

    rank: int
    alpha: float
    rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...]
    alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...]
    dtype: str

    def check_rank_alpha(self, alpha_hint: str) -> None:
        """Validate ``rank``, ``alpha`` (its error ends with ``alpha_hint``) and ``dtype``; store them canonically."""
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"`rank`={self.rank!r}; expected a positive integer such as 8.")
        if not is_number(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"`alpha`={self.alpha!r}; expected a positive finite number ({alpha_hint}.")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # MethodConfig's: the selection fields
        object.__setattr__(self, "rank_pattern", _freeze_pattern(self.rank_pattern, "rank_pattern", int))
        object.__setattr__(self, "alpha_pattern", _freeze_pattern(self.alpha_pattern, "alpha_pattern", float))
        for field in ("rank_pattern", "alpha_pattern"):
            for pattern, _ in getattr(self, field):
                compile_regex(pattern, field)

    def rank_for(self, path: str) -> int:
        """The rank at ``path`` (``rank_pattern`` first, then ``rank``)."""
        items = cast(tuple[tuple[str, int], ...], self.rank_pattern)
        return next((r for p, r in items if match_pattern(p, path)), self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha at ``path`` (``alpha_pattern`` first, then ``alpha``)."""
        items = cast(tuple[tuple[str, float], ...], self.alpha_pattern)
        return next((a for p, a in items if match_pattern(p, path)), self.alpha)

    def check_patterns(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        """Raise when a ``rank_pattern``/``alpha_pattern`` key matches none of the selected targets."""
        paths = [p for p, _, _ in rows]
        for field in ("rank_pattern", "alpha_pattern"):
            for pattern, _ in getattr(self, field):
                if not any(match_pattern(pattern, p) for p in paths):
                    raise ValueError(
                        f"`{field}` key {pattern!r} matches none of the {len(paths)} targets (e.g. {paths[0]!r}); "
                        "fix the regex or drop the entry."
                    )


@dataclasses.dataclass(frozen=True)
class LoraConfig(RankFields, MethodConfig):
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
    """

    method: ClassVar[str] = "lora"
    reads_weight_values: ClassVar[bool] = False
    restore_free: ClassVar[tuple[str, ...]] = ("dropout", "init")
    json_mappings: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")

    rank: int = 8
    alpha: float = 8.0
    targets: TargetSpec = ALL_LINEAR
    exclude: TargetSpec = ()
    rank_pattern: Mapping[str, int] | tuple[tuple[str, int], ...] = ()
    alpha_pattern: Mapping[str, float] | tuple[tuple[str, float], ...] = ()
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.check_rank_alpha("HF's lora_alpha), e.g. 16")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout`={self.dropout!r}; expected a rate (a number) in [0, 1), e.g. 0.05.")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"`use_rslora`={self.use_rslora!r}; expected True or False (not a string).")
        if not isinstance(self.init, str) or not (self.init in _INITS or _PISSA_NITER.fullmatch(self.init)):
            raise ValueError(
                f"`init`={self.init!r}; expected one of {_INITS} or 'pissa_niter_<n>' (e.g. 'pissa_niter_4')."
            )
        if self.base_adjustment is not None and self.method != LoraConfig.method:
            raise ValueError(
                f"`init`={self.init!r} is not supported by {type(self).__name__}: jaxpeft implements the "
                "base-adjusting inits (PiSSA, OLoRA) for plain LoRA only. Use LoraConfig(init=...), or "
                f"{type(self).__name__} with init='kaiming'."
            )
        object.__setattr__(self, "dropout", float(self.dropout))
        super().__post_init__()

    def scale_for(self, path: str) -> float:
        """``alpha / rank`` (or ``alpha / sqrt(rank)`` with ``use_rslora``) for the adapter at ``path``."""
        rank = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def base_adjustment(self) -> str | None:
        """``"init='pissa'"`` (or the ``pissa_niter_<n>``/``olora`` init) when it changes the base; else None."""
        return None if self.init in ("kaiming", "gaussian") else f"init={self.init!r}"

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

    def factor_shapes(self, path: str, shape: Sequence[int], layout: Layout) -> tuple[tuple[int, ...], ...]:
        """``(A shape, B shape)`` of the adapter at ``path`` on a weight of ``shape``."""
        stack, fan_in, fan_out = layout.split(shape)
        rank = self.rank_for(path)
        return (*stack, *fan_in, rank), (*stack, rank, *fan_out)

    def init_factors(self, path: str, shape: Sequence[int], layout: Layout, key: jax.Array) -> tuple[Any, Any]:
        """HF PEFT's initial ``(A, B)``: ``A·B = 0``."""
        dtype = jnp.dtype(self.dtype)
        a_shape, b_shape = self.factor_shapes(path, shape, layout)
        if layout.kind == "embed":
            return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
        if self.init == "kaiming":
            bound = 1.0 / math.sqrt(layout.fan_in_size(shape))
            a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        else:
            a = jax.random.normal(key, a_shape, dtype) / self.rank_for(path)
        return a, jnp.zeros(b_shape, dtype)

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
        return LoraWeights(a, b, self.scale_for(path), self.dropout, layout)

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


def factors_delta(a: jax.Array, b: jax.Array, scale: float, layout: Layout, shape: Sequence[int]) -> jax.Array:
    """``scale · A·B`` as a float32 array of the weight's ``shape`` (stack axes batched)."""
    shape = tuple(shape)
    stack = math.prod(layout.split(shape)[0])
    rank = a.shape[-1]
    a2 = jnp.reshape(a.astype(jnp.float32), (stack, -1, rank))
    b2 = jnp.reshape(b.astype(jnp.float32), (stack, rank, -1))
    return jnp.reshape(jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * scale, shape)


def factor_axes(layout: Layout) -> dict[str, tuple[int | None, ...]]:
    """A runs along the stack and fan-in axes, B along the stack and fan-out axes; the rank axis is their own."""
    stack, fan_in, fan_out = layout.axes()
    return {"a": (*stack, *fan_in, None), "b": (*stack, None, *fan_out)}


def check_factors(a: Any, b: Any, layout: Layout, weight_shape: tuple[int, ...]) -> str | None:
    """Why factors A, B do not fit a weight of ``weight_shape`` under ``layout`` (None when they do)."""
    if problem := check_ndim(layout, weight_shape):
        return problem
    stack, fan_in, fan_out = layout.split(weight_shape)
    rank = a.shape[-1] if a.ndim else 0
    want_a, want_b = (*stack, *fan_in, rank), (*stack, rank, *fan_out)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        return f"expected A {want_a} and B {want_b} (rank {rank})"
    return None


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True)
class LoraWeights(Adapter):
    """One LoRA adapter: ``ΔW = scale · A·B`` with A ``(*stack, *fan_in, r)`` and B ``(*stack, r, *fan_out)``.

    A pytree node whose leaves are ``a`` and ``b``; ``scale``, ``dropout`` and ``layout`` are static metadata,
    so gradients, optimizer updates and ``jax.jit`` see only the two arrays. Its forward never forms
    ``W + ΔW``: the adapted layer computes ``base(x) + scale·(dropout(x)·A)·B``.
    """

    a: Any
    b: Any
    scale: float = dataclasses.field(metadata=STATIC)
    dropout: float = dataclasses.field(default=0.0, metadata=STATIC)
    layout: Layout = dataclasses.field(default=Layout(), metadata=STATIC)

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def describe(self) -> str:
        return f"r={self.rank} scale={self.scale:g}"

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        return factor_axes(self.layout)

    def delta(self, kernel_shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        """``scale · A·B`` reshaped to ``kernel_shape`` (computed in float32, returned in ``dtype``)."""
        return factors_delta(self.a, self.b, self.scale, self.layout, kernel_shape).astype(dtype)

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        return check_factors(self.a, self.b, self.layout, weight_shape)

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        return fold_weight(weight, self.delta(weight.shape), sign), None

    def forward(self, call: LayerCall) -> jax.Array:
        y = call.base(call.x)
        if call.kind == "embed":
            delta = call.lowrank(call.x, self.a, self.b, self.scale, dtype=y.dtype)
        elif call.kind == "attend":
            delta = call.lowrank(call.x.astype(y.dtype), self.a, self.b, self.scale)
        else:
            x = call.dropout(call.x.astype(y.dtype), self.dropout)
            delta = call.lowrank(x, self.a, self.b, self.scale)
        return y + delta.astype(y.dtype)


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
    if type(cfg) is not LoraConfig:
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
        out = set_path(out, path, LoraWeights(a, b, plain.scale_for(path), node.dropout, node.layout))
    return plain, out
