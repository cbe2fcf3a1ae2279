"""Quantised frozen weights for QLoRA: int8 (per output channel) and NF4 (block-wise, double-quantised scales).

A :class:`QuantizedArray` is a registered pytree dataclass that stands where a float kernel stood in a params tree.
Its array fields are the stored codes and scales; its static fields say how to read them (the kind, block sizes,
the per-layer logical shape, the original dtype). Every array field keeps the weight's leading stack axes
(``nn.scan``/``nnx.vmap`` stacks) as its own leading axes, so a scan slices a quantised kernel exactly like a float
one; the logical shape is those leading axes plus the static per-layer shape.

``quantize`` replaces the weights a method config (or a target spec) selects, ``dequantize`` turns quantised
leaves back into arrays. Both are pure functions over params pytrees. The framework adapters
(``jaxpeft.linen.apply``, ``jaxpeft.nnx``) dequantise inside each adapted layer call under ``jax.checkpoint``, so the
full-precision weight is a per-call transient that is recomputed in the backward pass, never a residual kept
across the step; ``jaxpeft.merge``/``unmerge`` dequantise, fold and requantise.

References:
  Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs", 2023 (NF4, double quantisation).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxpeft._paths import leaves_with_paths, map_with_paths
from jaxpeft._select import Layout, LayoutEntry, TargetSpec, select_targets

__all__ = [
    "INT8_ERROR",
    "KINDS",
    "NF4_CODE",
    "NF4_HALF_GAP",
    "QUANTIZABLE_KINDS",
    "QuantizedArray",
    "dequantize",
    "is_quantized",
    "quantize",
    "quantize_array",
    "requantize",
    "selection_view",
]

#: The quantisation kinds ``quantize`` knows.
KINDS = ("int8", "nf4")
#: Layer kinds whose weight can be quantised (embeddings stay in their dtype, as in QLoRA and bitsandbytes).
QUANTIZABLE_KINDS = ("dense", "dense_general", "einsum", "conv")
#: The NormalFloat4 code book (QLoRA, Appendix E; bitsandbytes' ``NF4`` map): quantiles of N(0, 1) scaled to
#: [-1, 1] with an exact zero.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
#: Half the widest gap of ``NF4_CODE`` (between -1 and -0.696): the largest NF4 rounding error per unit of scale.
NF4_HALF_GAP = (NF4_CODE[1] - NF4_CODE[0]) / 2
#: The largest int8 rounding error per unit of a column's absolute maximum (half a step of ``absmax / 127``).
INT8_ERROR = 1.0 / 254
_NF4_BLOCK = 64
_NF4_GROUP = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A frozen weight stored as int8 or NF4 codes; ``dequantize`` gives the array back.

    Layouts (``*stack`` are the weight's leading stack axes). Every array keeps the weight's axes, in order, so a
    weight's ``PartitionSpec`` is a spec for its arrays too (``array_specs``):

    - ``int8``: ``codes`` int8 ``(*stack, *layer_shape)``; ``scales`` float32 ``(*stack, *fan_out)``, one per
      output channel (``absmax / 127`` over the fan-in axes); ``group_scales`` is None. Value = code · scale.
    - ``nf4``: blocks of ``block_size`` (64, or fewer where the axis is shorter or 64 does not divide it) run along
      the *block axis*, the last fan-in axis, within each column of the other axes. ``codes`` uint8: the weight's
      shape with the block axis ``d`` replaced by ``n_blocks · block_size / 2`` (``n_blocks = ceil(d / block_size)``,
      zero padded), two 4-bit indices into ``NF4_CODE`` a byte (high nibble first, neighbours along the block
      axis); ``scales`` uint8: the block axis replaced by ``n_blocks``, each block's absolute maximum quantised to
      8 bits relative to its group of ``group_size`` (256) blocks along the last axis (rounded up, so no value is
      clipped); ``group_scales`` float32: ``scales``' shape with the last axis replaced by its number of groups,
      each group's largest absmax. Value = ``NF4_CODE[code] · scale / 255 · group_scale``.

    ``shape``, ``ndim``, ``size`` and ``dtype`` describe the logical (dequantised) array, so target selection,
    layouts and shape checks treat a quantised weight like the float one it replaced; ``nbytes`` is what is stored.
    """

    codes: Any
    scales: Any
    group_scales: Any = None
    kind: str = dataclasses.field(default="nf4", metadata={"static": True})
    layer_shape: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    dtype: Any = dataclasses.field(default=np.dtype("float32"), metadata={"static": True})
    fan_in: int = dataclasses.field(default=1, metadata={"static": True})
    block_size: int = dataclasses.field(default=_NF4_BLOCK, metadata={"static": True})
    group_size: int = dataclasses.field(default=_NF4_GROUP, metadata={"static": True})

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The leading stack axes, read from the codes (they shrink when ``nn.scan`` slices the leaves)."""
        shape = tuple(self.codes.shape)
        return shape[: len(shape) - len(self.layer_shape)]

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.stack_shape, *self.layer_shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes and scales), not the logical array's."""
        leaves = jax.tree.leaves(self)
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)

    @property
    def sharding(self) -> Any:
        """The weight's sharding, which is the codes' (they keep the weight's axes), or None when they have none.

        A ``NamedSharding`` here carries the weight's spec, so ``jaxpeft.sharding.adapter_specs`` and a checkpoint
        restore derive adapter shardings from a sharded quantised base as from a float one.
        """
        return getattr(self.codes, "sharding", None)

    def array_specs(self, weight_spec: PartitionSpec, mesh: Any) -> QuantizedArray:
        """The ``PartitionSpec`` of each stored array for the weight sharded as ``weight_spec`` on ``mesh``.

        Each array takes the weight's mesh axes on the weight axes it keeps (int8 scales: the stack and fan-out
        axes). An entry whose mesh axes do not divide the weight's axis is dropped (replicated), and so is the
        block axis's unless whole blocks fall on every shard (NF4: the mesh axes divide the number of blocks), and
        the last axis's of ``group_scales`` unless whole groups do; so every device dequantises its own shard of
        the weight without communication. The codes' spec is then also a valid spec of the weight.

        Args:
          weight_spec: the float weight's spec (e.g. from ``jaxpeft.sharding.base_specs`` on the float params).
          mesh: a ``Mesh``, or its axis sizes (``{"fsdp": 2, "tp": 2}``).

        Returns:
          A ``QuantizedArray`` of ``PartitionSpec`` objects (``jax.tree.map`` it with the arrays to place them).
        """
        sizes = _axis_sizes(mesh)
        shape = self.shape
        if len(weight_spec) > len(shape):
            raise ValueError(
                f"`weight_spec`={weight_spec} has more entries than the quantised weight's {len(shape)} axes {shape}."
            )
        entries = [*weight_spec, *([None] * (len(shape) - len(weight_spec)))]
        entries = [e if _divides(d, e, sizes) else None for d, e in zip(shape, entries, strict=True)]
        n_stack = len(self.stack_shape)
        if self.kind == "int8":
            fan_out = entries[n_stack + self.fan_in :]
            return dataclasses.replace(
                self, codes=PartitionSpec(*entries), scales=PartitionSpec(*entries[:n_stack], *fan_out)
            )
        axis = n_stack + self.fan_in - 1
        if not _divides(_blocks(shape[axis], self.block_size), entries[axis], sizes):
            entries[axis] = None  # a block would straddle two shards
        groups = list(entries)
        if shape[-1] % (self.group_size * _count(groups[-1], sizes)) != 0:
            groups[-1] = None  # a group would straddle two shards
        return dataclasses.replace(
            self, codes=PartitionSpec(*entries), scales=PartitionSpec(*entries), group_scales=PartitionSpec(*groups)
        )

    def __repr__(self) -> str:
        if not hasattr(self.codes, "shape"):  # a tree.map'd copy holding something else than arrays
            return f"QuantizedArray(kind={self.kind!r}, codes={self.codes!r}, scales={self.scales!r})"
        return f"QuantizedArray(kind={self.kind!r}, shape={self.shape}, dtype={jnp.dtype(self.dtype).name})"


def _axis_sizes(mesh: Any) -> dict[str, int]:
    shape = mesh if isinstance(mesh, Mapping) else getattr(mesh, "shape", None)
    if not isinstance(shape, Mapping):
        raise ValueError(f"`mesh`={mesh!r} is not a Mesh or a mapping of axis sizes like {{'fsdp': 2, 'tp': 4}}.")
    return {str(k): int(v) for k, v in shape.items()}


def _count(entry: Any, sizes: Mapping[str, int]) -> int:
    """How many shards the mesh axes of a spec entry (None, a name or several) cut an axis into."""
    names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    return math.prod(sizes[n] for n in names)


def _divides(size: int, entry: Any, sizes: Mapping[str, int]) -> bool:
    return size % _count(entry, sizes) == 0


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray` (use as ``is_leaf`` to keep them whole while flattening)."""
    return isinstance(x, QuantizedArray)


# ------------------------------------------------------------------------------------------------ int8


def _int8(w: jax.Array, n_stack: int, fan_in: int) -> tuple[jax.Array, jax.Array]:
    axes = tuple(range(n_stack, n_stack + fan_in))
    w32 = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=axes) / 127.0
    safe = jnp.expand_dims(jnp.where(scale > 0, scale, 1.0), axes)
    codes = jnp.clip(jnp.round(w32 / safe), -127, 127).astype(jnp.int8)
    return codes, scale


def _int8_values(q: QuantizedArray) -> jax.Array:
    n_stack = len(q.stack_shape)
    scale = jnp.expand_dims(q.scales, tuple(range(n_stack, n_stack + q.fan_in)))
    return q.codes.astype(jnp.float32) * scale


# ------------------------------------------------------------------------------------------------ nf4


def _code_book() -> jax.Array:
    return jnp.asarray(NF4_CODE, jnp.float32)


def _blocks(n: int, block: int) -> int:
    return -(-n // block)


def _block_length(d: int, block: int) -> int:
    """The NF4 block length along an axis of ``d`` values: ``block`` where it divides ``d``, else the even length
    of ``ceil(d / block)`` nearly equal blocks (so a short or odd axis pads at most one value a block)."""
    length = -(-d // _blocks(d, block))
    return length + length % 2


def _nf4(w: jax.Array, axis: int, block: int, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(codes, block scale codes, group maxima)`` of ``w`` with blocks of ``block`` along ``axis``."""
    shape = tuple(w.shape)
    pre, d, post = shape[:axis], shape[axis], shape[axis + 1 :]
    n_blocks = _blocks(d, block)
    padded = jnp.pad(w.astype(jnp.float32), [(0, n_blocks * block - d) if i == axis else (0, 0) for i in range(w.ndim)])
    values = jnp.reshape(padded, (*pre, n_blocks, block, *post))
    absmax = jnp.max(jnp.abs(values), axis=axis + 1)  # (*pre, n_blocks, *post): the scales' shape
    # Double quantisation: each block's absmax as 8 bits of the largest absmax of its group (``group`` blocks along
    # the last axis), rounded up (less a 1/1024 step of slack, so that requantising dequantised values reproduces
    # the same codes).
    last = absmax.shape[-1]
    n_groups = _blocks(last, group)
    padded_max = jnp.pad(absmax, [(0, 0)] * (absmax.ndim - 1) + [(0, n_groups * group - last)])
    grouped = jnp.reshape(padded_max, (*absmax.shape[:-1], n_groups, group))
    group_max = jnp.max(grouped, axis=-1)
    safe_max = jnp.where(group_max > 0, group_max, 1.0)[..., None]
    block_codes = jnp.clip(jnp.ceil(grouped / safe_max * 255.0 - 2.0**-10), 0, 255)
    block_codes = jnp.reshape(block_codes, (*absmax.shape[:-1], n_groups * group))[..., :last].astype(jnp.uint8)
    scale = jnp.expand_dims(_block_scales(block_codes, group_max, group), axis + 1)
    normalised = values / jnp.where(scale > 0, scale, 1.0)
    book = _code_book()
    codes = jnp.searchsorted((book[1:] + book[:-1]) / 2, normalised).astype(jnp.uint8)
    pairs = jnp.reshape(codes, (*pre, n_blocks * block // 2, 2, *post))
    high, low = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (high << 4) | low, block_codes, group_max


def _block_scales(block_codes: jax.Array, group_max: jax.Array, group: int) -> jax.Array:
    """Each block's dequantised absmax, float32, shaped like ``block_codes`` (groups run along the last axis)."""
    last = block_codes.shape[-1]
    per_block = jnp.repeat(group_max, group, axis=-1)[..., :last]
    return block_codes.astype(jnp.float32) / 255.0 * per_block


def _nf4_axis(q: QuantizedArray) -> int:
    """The block axis of an NF4 weight: its last fan-in axis."""
    return len(q.stack_shape) + q.fan_in - 1


def _nf4_values(q: QuantizedArray) -> jax.Array:
    axis = _nf4_axis(q)
    shape = q.shape
    pre, d, post = shape[:axis], shape[axis], shape[axis + 1 :]
    codes = jnp.stack([q.codes >> 4, q.codes & 15], axis=axis + 1)
    codes = jnp.reshape(codes, (*pre, -1, q.block_size, *post))
    scale = jnp.expand_dims(_block_scales(q.scales, q.group_scales, q.group_size), axis + 1)
    values = jnp.take(_code_book(), codes.astype(jnp.int32), axis=0) * scale
    values = jnp.reshape(values, (*pre, -1, *post))
    return jax.lax.slice_in_dim(values, 0, d, axis=axis)


# ------------------------------------------------------------------------------------------------ public functions


@functools.partial(jax.jit, static_argnames=("kind", "n_stack", "fan_in", "block", "group", "dtype"))
def _quantize_jit(
    w: jax.Array, kind: str, n_stack: int, fan_in: int, block: int, group: int, dtype: np.dtype
) -> QuantizedArray:
    layer_shape = tuple(w.shape[n_stack:])
    if kind == "int8":
        codes, scale = _int8(w, n_stack, fan_in)
        return QuantizedArray(codes, scale, None, "int8", layer_shape, dtype, fan_in, block, group)
    axis = n_stack + fan_in - 1
    length = _block_length(w.shape[axis], block)
    packed, block_codes, group_max = _nf4(w, axis, length, group)
    return QuantizedArray(packed, block_codes, group_max, "nf4", layer_shape, dtype, fan_in, length, group)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"`kind`={kind!r}; expected one of {KINDS} ('nf4' as in QLoRA, 'int8' per channel).")
    return kind


def quantize_array(w: jax.Array, layout: Layout, kind: str = "nf4", *, path: str = "weight") -> QuantizedArray:
    """One weight of ``layout`` quantised as ``kind`` (its stack axes stay leading axes of every stored array).

    Error bounds, per element, in exact arithmetic (the dequantised value is then rounded to ``dtype``):

    - ``int8``: ``|w - ŵ| ≤ m / 254`` with ``m`` the absolute maximum of the element's output channel over the
      fan-in axes (``INT8_ERROR``); zero columns stay exactly zero.
    - ``nf4``: ``|w - ŵ| ≤ 0.152 · m̂`` (``NF4_HALF_GAP``) with ``m̂`` the block's dequantised absmax, and
      ``m ≤ m̂ < m + M / 255`` (``m`` the block's absmax over 64 values, ``M`` the largest absmax of its group of
      256 blocks); values that are zero, or equal to ``±m``, within ``M / 255`` of it, come back closest.

    Raises:
      ValueError: ``kind`` is unknown, the weight is not floating, or (outside ``jit``) it holds inf or NaN.
    """
    _check_kind(kind)
    dtype = jnp.dtype(w.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"cannot quantise {path!r}: it is {dtype.name}, not floating. Leave it out of the targets.")
    if len(w.shape) != layout.ndim:
        raise ValueError(f"{path!r} has shape {tuple(w.shape)} but its layout {layout} describes {layout.ndim} axes.")
    try:
        finite = bool(jnp.all(jnp.isfinite(w)))
    except jax.errors.ConcretizationTypeError:
        finite = True
    if not finite:
        raise ValueError(f"cannot quantise {path!r}: it holds inf or NaN.")
    return _quantize_jit(w, kind, layout.stack, layout.fan_in, _NF4_BLOCK, _NF4_GROUP, np.dtype(dtype))


def requantize(w: jax.Array, like: QuantizedArray) -> QuantizedArray:
    """``w`` (logical shape ``like.shape``, any float dtype) quantised exactly as ``like`` is: same kind, blocks
    and logical dtype. Requantising ``dequantize(q)`` gives back ``q``'s codes."""
    if tuple(w.shape) != like.shape:
        raise ValueError(f"requantize: the values have shape {tuple(w.shape)}, the quantised array {like.shape}.")
    n_stack = len(like.stack_shape)
    return _quantize_jit(w, like.kind, n_stack, like.fan_in, like.block_size, like.group_size, np.dtype(like.dtype))


def _dequantize_one(q: QuantizedArray, dtype: Any) -> jax.Array:
    values = _int8_values(q) if q.kind == "int8" else _nf4_values(q)
    return values.astype(dtype if dtype is not None else q.dtype)


def dequantize(tree: Any, dtype: Any = None) -> Any:
    """``tree`` with every :class:`QuantizedArray` replaced by its values (in ``dtype``, default its own dtype).

    Takes one quantised array or any pytree holding some (a params tree); other leaves are returned unchanged.
    Pure and jit-able: the result is a transient array wherever it is consumed inside ``jit``.
    """
    return jax.tree.map(lambda x: _dequantize_one(x, dtype) if is_quantized(x) else x, tree, is_leaf=is_quantized)


def selection_view(params: Any) -> tuple[Any, dict[str, QuantizedArray]]:
    """A flat ``{path: leaf}`` view of ``params`` in which each quantised weight is one ``jax.ShapeDtypeStruct``.

    Target selection flattens params to their array leaves; a quantised weight must be selected as one weight of
    its logical shape, not as its codes and scales. Returns the view (``params`` itself when nothing is
    quantised) and the quantised leaves by path, to put back into the selected rows.
    """
    flat = leaves_with_paths(params, is_leaf=is_quantized)
    quantized = {path: leaf for path, leaf in flat if is_quantized(leaf)}
    if not quantized:
        return params, {}
    view = {path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_quantized(leaf) else leaf for path, leaf in flat}
    return view, quantized


def _select(params: Any, targets: Any, layouts: Mapping[str, LayoutEntry] | None) -> list[tuple[str, Any, Layout]]:
    select = getattr(targets, "select", None)
    if callable(select) and not callable(targets):  # a method config (jaxpeft.MethodConfig)
        rows: list[tuple[str, Any, Layout]] = select(params, layouts)
        return rows
    spec: TargetSpec = targets
    view, quantized = selection_view(params)
    return [(p, quantized.get(p, leaf), lay) for p, leaf, lay in select_targets(view, spec, (), layouts)]


def quantize(
    params: Any,
    targets: Any,
    *,
    kind: str = "nf4",
    layouts: Mapping[str, LayoutEntry] | None = None,
) -> Any:
    """``params`` with each weight that ``targets`` selects stored as a :class:`QuantizedArray` (QLoRA's base).

    Everything else (norms, biases, embeddings, weights the selection leaves out) is returned unchanged; the
    input is not modified. Selection follows ``jaxpeft.plan`` exactly, so quantising with the LoRA config you
    train with quantises exactly the adapted weights. See :func:`.quantize_array` for the per-element error bounds.

    Args:
      params: the base params (Linen ``params``, ``jaxpeft.nnx.base_params(model)``, a plain dict).
      targets: a method config (``jaxpeft.LoraConfig(...)``: its ``targets``/``exclude``), or a target spec in any
        form ``jaxpeft.LoraConfig(targets=...)`` takes (``"all-linear"``, module names, a regex, a predicate).
      kind: ``"nf4"`` (4-bit NormalFloat, blocks of 64, double-quantised scales: ~0.52 bytes a weight) or
        ``"int8"`` (per output channel: ~1 byte a weight).
      layouts: kernel layouts for weights with more than 2 dims, e.g. ``jaxpeft.linen.infer_layouts(model, x)``
        (needed for scan-stacked, DenseGeneral, Einsum and Conv kernels).

    Returns:
      The params with the selected weights quantised.

    Raises:
      ValueError: an unknown ``kind``; the selection errors of ``jaxpeft.plan``; a selected embedding (QLoRA keeps
        embeddings in their dtype); a selected weight that is already quantised, not floating, or not finite.

    Example:
      >>> import jax.numpy as jnp, jaxpeft
      >>> params = {"dense": {"kernel": jnp.linspace(-1, 1, 12).reshape(4, 3), "bias": jnp.zeros(3)}}
      >>> qparams = jaxpeft.quantize(params, ["dense"], kind="int8")
      >>> q = qparams["dense"]["kernel"]
      >>> type(q).__name__, q.kind, q.shape
      ('QuantizedArray', 'int8', (4, 3))
      >>> error = jnp.abs(jaxpeft.dequantize(qparams)["dense"]["kernel"] - params["dense"]["kernel"]).max()
      >>> bool(error <= jaxpeft.quant.INT8_ERROR)  # a column's absmax is 1 here
      True
    """
    _check_kind(kind)
    table: dict[str, QuantizedArray] = {}
    for path, leaf, layout in _select(params, targets, layouts):
        if is_quantized(leaf):
            raise ValueError(
                f"{path!r} is already quantised ({leaf.kind}); quantise each weight once, or dequantise first "
                "(jaxpeft.quant.dequantize)."
            )
        if layout.kind not in QUANTIZABLE_KINDS:
            raise ValueError(
                f"cannot quantise {path!r}: it is a weight of kind {layout.kind!r}; jaxpeft quantises "
                f"{QUANTIZABLE_KINDS} weights and keeps embeddings in their dtype (as QLoRA does). Narrow the "
                "targets, or add it to the config's `exclude`."
            )
        table[path] = quantize_array(leaf, layout, kind, path=path)
    return map_with_paths(lambda path, x: table.get(path, x), params, is_leaf=is_quantized)
