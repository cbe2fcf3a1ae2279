"""The adapted contractions: low-rank branches ``s·(x·A)·B`` for dense, einsum, conv and embedding layers.

Every function here takes call-level factors (stack axes already sliced away, as inside ``lax.scan``) and
computes in the activation dtype: A and B are cast down to it, activations are never cast up. None of them
forms ``W + ΔW``, so differentiating with respect to the factors never produces a gradient for the kernel. The
dense, einsum and tied-head branches share one ``jax.custom_vjp`` (``lowrank_chain``) whose backward pass
transposes only rank-``r`` matrices, never the activations.
The ``*_lowrank`` functions take arrays; the ``lora_*``/``*_delta`` functions take any object with ``a``,
``b``, ``scale`` and ``dropout`` attributes (``jaxpeft.LoraWeights``) for hand-written JAX models.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxpeft._select import Layout, Unsupported

__all__ = [
    "EinsumPlan",
    "Factors",
    "attend_delta",
    "attend_lowrank",
    "broadcast_to_spec",
    "conv_delta",
    "conv_lowrank",
    "dense_delta",
    "dense_lowrank",
    "dense_lowrank_grouped",
    "dense_lowrank_rows",
    "dropout",
    "einsum_delta",
    "einsum_layout",
    "einsum_lowrank",
    "einsum_plan",
    "embed_delta",
    "embed_lowrank",
    "lora_conv",
    "lora_dense",
    "lora_einsum",
    "lora_embed",
    "lowrank_chain",
]


class Factors(Protocol):
    """What the ``*_delta``/``lora_*`` helpers read from an adapter: ``jaxpeft.LoraWeights`` has it."""

    @property
    def a(self) -> Any: ...
    @property
    def b(self) -> Any: ...
    @property
    def scale(self) -> float: ...
    @property
    def dropout(self) -> float: ...


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of ``x`` at ``rate``; the identity when ``rate`` is 0 or ``key`` is None."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def _check_call_level(a: jax.Array, n_in: int, where: str) -> None:
    if a.ndim != n_in + 1:
        raise ValueError(
            f"{where}: adapter A has shape {a.shape} but the input contracts {n_in} axes; stacked adapters "
            "must be sliced like their kernel (e.g. jax.tree.map(lambda t: t[i], adapter) inside lax.scan)."
        )


# ------------------------------------------------------------------------------------------------ low-rank chain
#
# ``scale · (x·F1)·F2`` with a hand-written backward pass. Autodiff transposes the forward contraction
# ``x·A`` into ``dA = xᵀ·dh``, a dot whose *large* operand contracts over its leading (token) axes; XLA then
# materialises ``xᵀ`` (a copy the size of the activations) before the matmul, for every adapted layer, every step.
# The backward below orders each contraction so that the operand contracted over tokens is the rank-``r`` one
# (``dAᵀ = dhᵀ·x``, then a transpose of the small ``(r, fan_in)`` result), and saves only ``x`` (which the
# autodiff rule saves too) and the rank-``r`` intermediate ``h``.


def _fresh_letters(used: str, n: int) -> str:
    pool = [c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in used]
    if len(pool) < n:
        raise ValueError(f"einsum: not enough free letters to name {n} ellipsis axes.")
    return "".join(pool[:n])


def _contract(lhs: jax.Array, lhs_spec: str, rhs: jax.Array, rhs_spec: str, out_spec: str, precision: Any) -> jax.Array:
    """``einsum(f"{lhs_spec},{rhs_spec}->{out_spec}")`` as one ``dot_general`` with the operands in this order.

    ``jnp.einsum`` may swap the operands; the order decides which one XLA transposes, so it is fixed here. Letters
    of one operand only that the output drops are summed first.
    """
    for spec, name in ((lhs_spec, "lhs"), (rhs_spec, "rhs")):
        other = rhs_spec if name == "lhs" else lhs_spec
        drop = tuple(i for i, c in enumerate(spec) if c not in other and c not in out_spec)
        if drop:
            arr = jnp.sum(lhs if name == "lhs" else rhs, axis=drop)
            spec = "".join(c for i, c in enumerate(spec) if i not in drop)
            if name == "lhs":
                lhs, lhs_spec = arr, spec
            else:
                rhs, rhs_spec = arr, spec
    batch = [c for c in lhs_spec if c in rhs_spec and c in out_spec]
    contract = [c for c in lhs_spec if c in rhs_spec and c not in out_spec]
    dims = (
        (tuple(lhs_spec.index(c) for c in contract), tuple(rhs_spec.index(c) for c in contract)),
        (tuple(lhs_spec.index(c) for c in batch), tuple(rhs_spec.index(c) for c in batch)),
    )
    out = jax.lax.dot_general(lhs, rhs, dims, precision=precision)
    got = (
        "".join(batch)
        + "".join(c for c in lhs_spec if c not in rhs_spec)
        + "".join(c for c in rhs_spec if c not in lhs_spec)
    )
    return out if got == out_spec else jnp.transpose(out, [got.index(c) for c in out_spec])


def _lowrank_chain_fwd(
    specs: tuple[str, str, str, str, str], x: jax.Array, f1: jax.Array, f2: jax.Array, scale: float, precision: Any
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
    x_s, f1_s, h_s, f2_s, out_s = specs
    h = _contract(x, x_s, f1, f1_s, h_s, precision) * jnp.asarray(scale, x.dtype)
    return _contract(h, h_s, f2, f2_s, out_s, precision), (x, f1, f2, h)


def _lowrank_chain_bwd(
    specs: tuple[str, str, str, str, str],
    scale: float,
    precision: Any,
    res: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    g: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    x_s, f1_s, h_s, f2_s, out_s = specs
    x, f1, f2, h = res
    g = g.astype(x.dtype)
    # products over the token axes put the rank-r operand first: only it (and the small result) is transposed
    gh = _contract(g, out_s, f2, f2_s, h_s, precision) * jnp.asarray(scale, x.dtype)
    dx = _contract(gh, h_s, f1, f1_s, x_s, precision)
    df1 = _contract(gh, h_s, x, x_s, f1_s, precision)
    df2 = _contract(h, h_s, g, out_s, f2_s, precision)
    return dx, df1.astype(f1.dtype), df2.astype(f2.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def _lowrank_chain(
    specs: tuple[str, str, str, str, str], x: jax.Array, f1: jax.Array, f2: jax.Array, scale: float, precision: Any
) -> jax.Array:
    return _lowrank_chain_fwd(specs, x, f1, f2, scale, precision)[0]


_lowrank_chain.defvjp(_lowrank_chain_fwd, _lowrank_chain_bwd)


def lowrank_chain(
    x_spec: str,
    f1_spec: str,
    h_spec: str,
    f2_spec: str,
    out_spec: str,
    x: jax.Array,
    f1: jax.Array,
    f2: jax.Array,
    scale: float,
    *,
    precision: Any = None,
) -> jax.Array:
    """``scale · (x·F1)·F2`` as two einsums, in ``x.dtype``, with a backward pass that transposes no activation.

    The gradients are exactly those of the two einsums; only the contraction order of the backward pass differs
    from autodiff's: each product contracted over the token (non-factor) axes puts the rank-``r`` operand first, so
    XLA transposes a rank-``r`` matrix instead of the activations (``dF1ᵀ = dhᵀ·x``, then a transpose of the small
    result). Residuals kept for the backward pass: ``x``, the factors and the rank-``r`` intermediate. Like any
    ``jax.custom_vjp`` it supports reverse mode (grad, vjp) under jit, vmap, scan, remat and sharding, but not
    forward mode (``jax.jvp``); use ``jaxpeft.merged`` or plain einsums for that.

    Args:
      x_spec: einsum letters of ``x`` (may hold one ``...``).
      f1_spec: letters of the first factor (A; ``B`` for a tied head), e.g. ``"dr"``.
      h_spec: letters of the rank-``r`` intermediate ``x·F1`` (``...`` as in ``x_spec``).
      f2_spec: letters of the second factor, e.g. ``"ro"``.
      out_spec: letters of the output (``...`` as in ``x_spec``).
      x: activations.
      f1: first factor; cast to ``x.dtype`` (its gradient comes back in its own dtype).
      f2: second factor; cast likewise.
      scale: multiplies the rank-``r`` intermediate.
      precision: passed to every contraction.

    Returns:
      ``scale · einsum(einsum(x, F1 → h), F2 → out)``.
    """
    if "..." in x_spec:
        head, tail = x_spec.split("...")
        n = x.ndim - len(head) - len(tail)
        fresh = _fresh_letters(x_spec + f1_spec + h_spec + f2_spec + out_spec, n)
        x_spec, h_spec, out_spec = (s.replace("...", fresh) for s in (x_spec, h_spec, out_spec))
    specs = (x_spec, f1_spec, h_spec, f2_spec, out_spec)
    return _lowrank_chain(specs, x, f1.astype(x.dtype), f2.astype(x.dtype), float(scale), precision)


def dense_lowrank(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    *,
    axes: Sequence[int] | None = None,
    precision: Any = None,
) -> jax.Array:
    """``scale · (x·A)·B`` for a dense (or DenseGeneral) layer, in ``x.dtype`` (backward: see ``lowrank_chain``).

    Args:
      x: activations; their ``axes`` (default: the trailing ``A.ndim - 1``) are contracted with A's fan-in.
      a: A ``(*fan_in, r)``.
      b: B ``(r, *fan_out)``.
      scale: multiplies the rank-``r`` intermediate (cheapest place).
      axes: input axes to contract, in the order of A's fan-in axes.
      precision: passed to the contractions.

    Returns:
      ``(*x_rest, *fan_out)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxpeft.ops import dense_lowrank
      >>> x, a, b = jnp.ones((5, 4)), jnp.ones((4, 2)), jnp.ones((2, 3))
      >>> y = dense_lowrank(x, a, b, 0.5)  # 0.5 · (x·A)·B, never forming A·B
      >>> y.shape, y[0].tolist()
      ((5, 3), [4.0, 4.0, 4.0])
    """
    n_in = a.ndim - 1 if axes is None else len(axes)
    _check_call_level(a, n_in, "dense_lowrank")
    axes = tuple(range(x.ndim - n_in, x.ndim)) if axes is None else tuple(ax % x.ndim for ax in axes)
    n_out = b.ndim - 1
    letters = _fresh_letters("", x.ndim + n_out + 1)
    x_spec, fan_out, r = letters[: x.ndim], letters[x.ndim : x.ndim + n_out], letters[-1]
    fan_in = "".join(x_spec[ax] for ax in axes)
    rest = "".join(c for i, c in enumerate(x_spec) if i not in axes)
    return lowrank_chain(x_spec, fan_in + r, rest + r, r + fan_out, rest + fan_out, x, a, b, scale, precision=precision)


def _row_axes(
    where: str, x: jax.Array, ids: jax.Array, a: jax.Array, b: jax.Array, axes: Sequence[int] | None
) -> tuple[int, ...]:
    """The contracted axes of ``x`` (default: the trailing ``A.ndim - 2``) for a product with one adapter per row."""
    n_in = a.ndim - 2 if axes is None else len(axes)
    axes = tuple(range(x.ndim - n_in, x.ndim)) if axes is None else tuple(ax % x.ndim for ax in axes)
    if 0 in axes or ids.shape != (x.shape[0],) or a.ndim != n_in + 2 or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{where}: x {x.shape} (contracting axes {axes}) needs one id per row of its leading, uncontracted axis "
            f"(got ids {ids.shape}) and a bank A (n, *fan_in, r), B (n, r, *fan_out); got A {a.shape}, B {b.shape}."
        )
    return axes


def _rows_fwd(
    specs: tuple[str, str, str, str, str],
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    ids: jax.Array,
    scale: float,
    precision: Any,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    x_s, f1_s, h_s, f2_s, out_s = specs
    a_rows, b_rows = (jnp.take(f, ids, axis=0, mode="fill").astype(x.dtype) for f in (a, b))
    h = _contract(x, x_s, a_rows, f1_s, h_s, precision) * jnp.asarray(scale, x.dtype)
    return _contract(h, h_s, b_rows, f2_s, out_s, precision), (x, a, b, ids, h)


def _rows_bwd(
    specs: tuple[str, str, str, str, str], scale: float, precision: Any, res: tuple[jax.Array, ...], g: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    x_s, f1_s, h_s, f2_s, out_s = specs
    x, a, b, ids, h = res
    g = g.astype(x.dtype)
    a_rows, b_rows = (jnp.take(f, ids, axis=0, mode="fill").astype(x.dtype) for f in (a, b))
    gh = _contract(g, out_s, b_rows, f2_s, h_s, precision) * jnp.asarray(scale, x.dtype)
    dx = _contract(gh, h_s, a_rows, f1_s, x_s, precision)
    da = _contract(gh, h_s, x, x_s, f1_s, precision)
    db = _contract(h, h_s, g, out_s, f2_s, precision)
    n = a.shape[0]  # each adapter's gradient: the sum over its rows (ids outside [0, n) add to none)
    da_bank = jax.ops.segment_sum(da.astype(jnp.float32), ids, n).astype(a.dtype)
    db_bank = jax.ops.segment_sum(db.astype(jnp.float32), ids, n).astype(b.dtype)
    return dx, da_bank, db_bank, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _rows_chain(
    specs: tuple[str, str, str, str, str],
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    ids: jax.Array,
    scale: float,
    precision: Any,
) -> jax.Array:
    return _rows_fwd(specs, x, a, b, ids, scale, precision)[0]


_rows_chain.defvjp(_rows_fwd, _rows_bwd)


def dense_lowrank_rows(
    x: jax.Array,
    ids: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    *,
    axes: Sequence[int] | None = None,
    precision: Any = None,
) -> jax.Array:
    """``scale · (x[i]·A[ids[i]])·B[ids[i]]`` for each row ``i`` of ``x``'s leading axis: one adapter per example.

    Each row's factors are gathered from the bank and the row axis is a batch axis of both contractions, so the
    FLOPs are one adapter's. The backward pass (``lowrank_chain``'s contraction order) keeps only the bank, the
    ids, ``x`` and the rank-``r`` intermediate as residuals (the per-row factors are gathered again, never stored
    per scan step) and sums each row's factor gradient into its adapter (``segment_sum``). An id outside
    ``[0, n)`` reads NaN factors (its rows' outputs are NaN) and its gradient reaches no adapter.

    Args:
      x: activations ``(rows, ...)``; their ``axes`` (default: the trailing ``A.ndim - 2``; never axis 0) are
        contracted with A's fan-in.
      ids: ``(rows,)`` integer adapter ids.
      a: the bank's A ``(n, *fan_in, r)``.
      b: the bank's B ``(n, r, *fan_out)``.
      scale: multiplies the rank-``r`` intermediate.
      axes: input axes to contract, in the order of A's fan-in axes.
      precision: passed to the contractions.

    Returns:
      ``(*x_rest, *fan_out)`` in ``x.dtype`` (``x_rest`` starts with the row axis).
    """
    axes = _row_axes("dense_lowrank_rows", x, ids, a, b, axes)
    n_out = b.ndim - 2
    letters = _fresh_letters("", x.ndim + n_out + 1)
    x_spec, fan_out, r = letters[: x.ndim], letters[x.ndim : x.ndim + n_out], letters[-1]
    row, fan_in = x_spec[0], "".join(x_spec[ax] for ax in axes)
    rest = "".join(c for i, c in enumerate(x_spec) if i not in axes)
    specs = (x_spec, row + fan_in + r, rest + r, row + r + fan_out, rest + fan_out)
    return _rows_chain(specs, x, a, b, ids, float(scale), precision)


def dense_lowrank_grouped(
    x: jax.Array,
    ids: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    *,
    axes: Sequence[int] | None = None,
    precision: Any = None,
) -> jax.Array:
    """``scale · (x[i]·A[ids[i]])·B[ids[i]]`` as two grouped matmuls (``jax.lax.ragged_dot``) over tokens sorted by id.

    The tokens of every row are sorted by their row's adapter id (stable), the down- and up-projections run as
    one ``ragged_dot`` each against the whole bank (each adapter's factors read in place, never gathered per
    row), and the result is put back in row order. Rows whose id is outside ``[0, n)`` get zeros (the caller
    marks them). Its cost: the permutation of the input and the output (activation-sized moves); it pays off
    where ``ragged_dot`` has a native kernel (TPU, GPU) and rows are short (decoding); on CPU ``ragged_dot`` is a
    dense masked product, ``n`` times the FLOPs.

    Args:
      x: activations ``(rows, ...)``; their ``axes`` (default: the trailing ``A.ndim - 2``; never axis 0) are
        contracted with A's fan-in.
      ids: ``(rows,)`` integer adapter ids.
      a: the bank's A ``(n, *fan_in, r)``.
      b: the bank's B ``(n, r, *fan_out)``.
      scale: multiplies the rank-``r`` intermediate.
      axes: input axes to contract, in the order of A's fan-in axes.
      precision: passed to both grouped products.

    Returns:
      ``(*x_rest, *fan_out)``, in ``x.dtype``.
    """
    n, rank = a.shape[0], a.shape[-1]
    axes = _row_axes("dense_lowrank_grouped", x, ids, a, b, axes)
    rest = [i for i in range(x.ndim) if i not in axes]
    xt = jnp.transpose(x, (*rest, *axes))
    rest_shape, fan_in_size = xt.shape[: len(rest)], math.prod(a.shape[1:-1])
    fan_out_shape = b.shape[2:]
    tokens = xt.reshape(-1, fan_in_size)
    per_row = tokens.shape[0] // x.shape[0]
    token_ids = jnp.repeat(ids, per_row, total_repeat_length=tokens.shape[0])
    order = jnp.argsort(token_ids, stable=True)
    sizes = jnp.bincount(token_ids, length=n).astype(jnp.int32)
    af = a.reshape(n, fan_in_size, rank).astype(x.dtype)
    bf = b.reshape(n, rank, -1).astype(x.dtype)
    h = jax.lax.ragged_dot(jnp.take(tokens, order, axis=0), af, sizes, precision=precision)
    y = jax.lax.ragged_dot(h * jnp.asarray(scale, x.dtype), bf, sizes, precision=precision)
    out = jnp.zeros_like(y).at[order].set(y, unique_indices=True)
    return out.reshape(*rest_shape, *fan_out_shape)


def dense_delta(
    x: jax.Array,
    lora: Factors,
    *,
    axes: Sequence[int] | None = None,
    dropout_key: jax.Array | None = None,
    precision: Any = None,
) -> jax.Array:
    """``scale · (dropout(x)·A)·B``: the LoRA branch of a dense (or DenseGeneral) layer (see ``dense_lowrank``)."""
    x = dropout(x, lora.dropout, dropout_key)
    return dense_lowrank(x, lora.a, lora.b, lora.scale, axes=axes, precision=precision)


def lora_dense(
    x: jax.Array,
    kernel: jax.Array,
    lora: Factors,
    bias: jax.Array | None = None,
    *,
    dropout_key: jax.Array | None = None,
    precision: Any = None,
) -> jax.Array:
    """``x·W + bias + scale·(x·A)·B`` for a ``(in, out)`` kernel; never forms ``W + ΔW``."""
    y = jnp.matmul(x, kernel.astype(x.dtype), precision=precision)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y + dense_delta(x, lora, dropout_key=dropout_key, precision=precision)


@dataclasses.dataclass(frozen=True)
class EinsumPlan:
    """An einsum ``"in,kernel->out"`` split into its low-rank contractions ``in,A->h`` and ``h,B->out``.

    ``stack``, ``fan_in`` and ``fan_out`` are the kernel's letters of each kind, in kernel order.
    """

    layout: Layout
    a_spec: str
    h_spec: str
    b_spec: str
    x_spec: str
    out_spec: str
    stack: str = ""
    fan_in: str = ""
    fan_out: str = ""


def _einsum_split(subscripts: str) -> tuple[str, str, str, str, str, str, str]:
    """``(x_spec, kernel_spec, out_spec, stack, fan_in, fan_out, reason)``; ``reason`` is "" when adaptable."""
    clean = subscripts.replace(" ", "")
    if "->" not in clean or clean.count(",") != 1:
        raise ValueError(f"einsum {subscripts!r}: expected two operands and an explicit output, 'btd,dnh->btnh'.")
    lhs, out = clean.split("->")
    x_spec, k_spec = lhs.split(",")
    if "." in k_spec:
        return x_spec, k_spec, out, "", "", "", "its kernel subscripts use an ellipsis."
    x_letters = set(x_spec.replace(".", ""))
    stack = "".join(c for c in k_spec if c in x_letters and c in out)
    fan_in = "".join(c for c in k_spec if c in x_letters and c not in out)
    fan_out = "".join(c for c in k_spec if c not in x_letters and c in out)
    reason = ""
    if len(stack) + len(fan_in) + len(fan_out) != len(k_spec):
        reason = f"kernel subscripts {k_spec!r} have axes summed away inside the kernel."
    elif k_spec != stack + fan_in + fan_out:
        reason = (
            f"kernel subscripts {k_spec!r} are not ordered (shared, contracted, output) = "
            f"{stack + fan_in + fan_out!r}; reorder the kernel axes."
        )
    elif not fan_in or not fan_out:
        reason = f"kernel subscripts {k_spec!r} need at least one contracted and one output axis."
    return x_spec, k_spec, out, stack, fan_in, fan_out, reason


def einsum_layout(subscripts: str) -> Layout | Unsupported:
    """The kernel layout of an ``nn.Einsum``-style ``"input,kernel->output"``, or why it cannot be adapted.

    Kernel letters shared by input and output are stack (batch) axes and must lead; letters only in the input
    are fan-in; letters only in the output are fan-out. A kernel ordered otherwise is :class:`.Unsupported`.
    """
    _, _, _, stack, fan_in, fan_out, reason = _einsum_split(subscripts)
    if reason:
        return Unsupported(reason)
    return Layout(stack=len(stack), fan_in=len(fan_in), fan_out=len(fan_out), kind="einsum")


def einsum_plan(subscripts: str) -> EinsumPlan:
    """Split an adaptable ``"input,kernel->output"`` string into low-rank contractions (see :func:`einsum_layout`).

    Raises:
      ValueError: the einsum cannot be adapted (the message gives the reason).
    """
    x_spec, _, out, stack, fan_in, fan_out, reason = _einsum_split(subscripts)
    if reason:
        raise ValueError(f"einsum {subscripts!r} cannot be adapted: {reason}")
    used = set(subscripts.replace(" ", ""))
    r = next(c for c in "rzyxwvutsqponmlkjihgfedcbaRZYXWVUTSQPONMLKJIHGFEDCBA" if c not in used)
    h_spec = "".join(c for c in x_spec if c not in fan_in) + r
    layout = Layout(stack=len(stack), fan_in=len(fan_in), fan_out=len(fan_out), kind="einsum")
    return EinsumPlan(layout, stack + fan_in + r, h_spec, stack + r + fan_out, x_spec, out, stack, fan_in, fan_out)


def broadcast_to_spec(v: jax.Array, v_letters: str, spec: str, ndim: int) -> jax.Array:
    """``v`` (axes named by ``v_letters``) transposed and reshaped to broadcast against an array named ``spec``.

    ``spec`` may hold one ``...``; ``ndim`` is the target array's rank. Letters of ``spec`` not in
    ``v_letters`` get size-1 axes.
    """
    if "..." in spec:
        head, tail = spec.split("...")
        letters = [*head, *([None] * (ndim - len(head) - len(tail))), *tail]
    else:
        letters = list(spec)
    order = "".join(c for c in letters if c is not None and c in v_letters)
    v = jnp.einsum(f"{v_letters}->{order}", v) if order != v_letters else v
    sizes = dict(zip(order, v.shape, strict=True))
    return jnp.reshape(v, [sizes[c] if c is not None and c in sizes else 1 for c in letters])


def einsum_lowrank(
    subscripts: str, x: jax.Array, a: jax.Array, b: jax.Array, scale: float, *, precision: Any = None
) -> jax.Array:
    """``scale · (x·A)·B`` for ``jnp.einsum(subscripts, x, kernel)``, as two einsums, in ``x.dtype``."""
    p = einsum_plan(subscripts)
    return lowrank_chain(p.x_spec, p.a_spec, p.h_spec, p.b_spec, p.out_spec, x, a, b, scale, precision=precision)


def einsum_delta(
    subscripts: str,
    x: jax.Array,
    lora: Factors,
    *,
    dropout_key: jax.Array | None = None,
    precision: Any = None,
) -> jax.Array:
    """The LoRA branch of ``jnp.einsum(subscripts, x, kernel)``: ``scale · (dropout(x)·A)·B``."""
    einsum_plan(subscripts)
    x = dropout(x, lora.dropout, dropout_key)
    return einsum_lowrank(subscripts, x, lora.a, lora.b, lora.scale, precision=precision)


def lora_einsum(
    subscripts: str,
    x: jax.Array,
    kernel: jax.Array,
    lora: Factors,
    *,
    dropout_key: jax.Array | None = None,
    precision: Any = None,
) -> jax.Array:
    """``einsum(subscripts, x, W) + scale·(x·A)·B``; never forms ``W + ΔW``."""
    y = jnp.einsum(subscripts, x, kernel.astype(x.dtype), precision=precision)
    return y + einsum_delta(subscripts, x, lora, dropout_key=dropout_key, precision=precision)


def embed_lowrank(ids: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype: Any) -> jax.Array:
    """``scale · A[ids]·B``: gather rows of A (``(vocab, r)``), then multiply by B (``(r, features)``)."""
    h = jnp.take(a, ids, axis=0).astype(dtype) * jnp.asarray(scale, dtype)
    return jnp.matmul(h, b.astype(dtype))


def embed_delta(ids: jax.Array, lora: Factors, dtype: Any) -> jax.Array:
    """``scale · A[ids]·B`` (see ``embed_lowrank``)."""
    return embed_lowrank(ids, lora.a, lora.b, lora.scale, dtype)


def lora_embed(ids: jax.Array, table: jax.Array, lora: Factors) -> jax.Array:
    """``table[ids] + scale·A[ids]·B``."""
    y = jnp.take(table, ids, axis=0)
    return y + embed_delta(ids, lora, y.dtype)


def attend_lowrank(q: jax.Array, a: jax.Array, b: jax.Array, scale: float, *, precision: Any = None) -> jax.Array:
    """The low-rank branch of a tied output head ``q·Eᵀ``: ``scale · (q·Bᵀ)·Aᵀ``, so merged ≡ unmerged holds."""
    return lowrank_chain("...d", "rd", "...r", "vr", "...v", q, b, a, scale, precision=precision)


def attend_delta(q: jax.Array, lora: Factors, *, precision: Any = None) -> jax.Array:
    """The LoRA branch of a tied output head (see ``attend_lowrank``)."""
    return attend_lowrank(q, lora.a, lora.b, lora.scale, precision=precision)


def conv_lowrank(
    x: jax.Array, a: jax.Array, b: jax.Array, scale: float, conv: Callable[[jax.Array, jax.Array], jax.Array]
) -> jax.Array:
    """``scale · conv(x, A)·B``: A is a rank-``r`` kernel with the base conv's window, B a 1x1 projection.

    Args:
      x: channels-last activations.
      a: A ``(*window, in, r)``.
      b: B ``(r, out)``.
      scale: multiplies the rank-``r`` intermediate.
      conv: the base layer's convolution as ``conv(x, kernel)`` (same strides, padding, dilation; no bias).
    """
    h = conv(x, a.astype(x.dtype)) * jnp.asarray(scale, x.dtype)
    return jnp.tensordot(h, b.astype(h.dtype), axes=1)


def conv_delta(
    x: jax.Array,
    lora: Factors,
    conv: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """``scale · conv(dropout(x), A)·B`` (see ``conv_lowrank``)."""
    x = dropout(x, lora.dropout, dropout_key)
    return conv_lowrank(x, lora.a, lora.b, lora.scale, conv)


def lora_conv(
    x: jax.Array,
    kernel: jax.Array,
    lora: Factors,
    bias: jax.Array | None = None,
    *,
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    dilation: Sequence[int] | None = None,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """A channels-last convolution ``conv(x, W) + bias + scale·conv(x, A)·B`` (``W`` is ``(*window, in, out)``)."""
    n = kernel.ndim - 2
    spatial = "".join("DHW"[-n:]) if n <= 3 else None
    if spatial is None:
        raise ValueError(f"lora_conv: kernel of shape {kernel.shape} has more than 3 spatial axes.")
    dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))

    def conv(inp: jax.Array, k: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            inp, k, strides or (1,) * n, padding, rhs_dilation=dilation, dimension_numbers=dn
        )

    y = conv(x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y + conv_delta(x, lora, conv, dropout_key=dropout_key)
