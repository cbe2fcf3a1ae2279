"""The adapted contractions: low-rank branches ``s·(x·A)·B`` for dense, einsum, conv and embedding layers.

Every function here takes call-level factors (stack axes already sliced away, as inside ``lax.scan``) and
computes in the activation dtype: A and B are cast down to it, activations are never cast up. None of them
forms ``W + ΔW``, so differentiating with respect to the factors never produces a gradient for the kernel.
The ``*_lowrank`` functions take arrays; the ``lora_*``/``*_delta`` functions take any object with ``a``,
``b``, ``scale`` and ``dropout`` attributes (``jaxpeft.LoraWeights``) for hand-written JAX models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxpeft._select import Layout

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
    "dropout",
    "einsum_delta",
    "einsum_lowrank",
    "einsum_plan",
    "embed_delta",
    "embed_lowrank",
    "lora_conv",
    "lora_dense",
    "lora_einsum",
    "lora_embed",
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


def dense_lowrank(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    *,
    axes: Sequence[int] | None = None,
    precision: Any = None,
) -> jax.Array:
    """``scale · (x·A)·B`` for a dense (or DenseGeneral) layer, in ``x.dtype``.

    Args:
      x: activations; their ``axes`` (default: the trailing ``A.ndim - 1``) are contracted with A's fan-in.
      a: A ``(*fan_in, r)``.
      b: B ``(r, *fan_out)``.
      scale: multiplies the rank-``r`` intermediate (cheapest place).
      axes: input axes to contract, in the order of A's fan-in axes.
      precision: passed to the contractions.

    Returns:
      ``(*x_rest, *fan_out)``.
    """
    n_in = a.ndim - 1 if axes is None else len(axes)
    _check_call_level(a, n_in, "dense_lowrank")
    axes = tuple(range(x.ndim - n_in, x.ndim)) if axes is None else tuple(ax % x.ndim for ax in axes)
    dims = ((axes, tuple(range(n_in))), ((), ()))
    h = jax.lax.dot_general(x, a.astype(x.dtype), dims, precision=precision)
    h = h * jnp.asarray(scale, x.dtype)
    return jnp.tensordot(h, b.astype(x.dtype), axes=1, precision=precision)


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


def einsum_plan(subscripts: str) -> EinsumPlan:
    """Split an ``nn.Einsum``-style ``"input,kernel->output"`` string into low-rank contractions.

    Kernel letters shared by input and output are stack (batch) axes and must lead; letters only in the input
    are fan-in; letters only in the output are fan-out. A kernel ordered otherwise has layout ``unsupported``.
    """
    clean = subscripts.replace(" ", "")
    if "->" not in clean or clean.count(",") != 1:
        raise ValueError(f"einsum {subscripts!r}: expected two operands and an explicit output, 'btd,dnh->btnh'.")
    lhs, out = clean.split("->")
    x_spec, k_spec = lhs.split(",")
    if "." in k_spec:
        return EinsumPlan(
            Layout(kind="unsupported", reason="its kernel subscripts use an ellipsis."), "", "", "", "", ""
        )
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
    if reason:
        return EinsumPlan(Layout(kind="unsupported", reason=reason), "", "", "", "", "")
    used = set(clean)
    r = next(c for c in "rzyxwvutsqponmlkjihgfedcbaRZYXWVUTSQPONMLKJIHGFEDCBA" if c not in used)
    h_spec = "".join(c for c in x_spec if c not in fan_in) + r
    layout = Layout(stack=len(stack), fan_in=len(fan_in), fan_out=len(fan_out), kind="einsum")
    return EinsumPlan(layout, stack + fan_in + r, h_spec, stack + r + fan_out, x_spec, out, stack, fan_in, fan_out)


def _supported_plan(subscripts: str) -> EinsumPlan:
    p = einsum_plan(subscripts)
    if p.layout.kind == "unsupported":
        raise ValueError(f"einsum {subscripts!r} cannot be adapted: {p.layout.reason}")
    return p


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
    p = _supported_plan(subscripts)
    h = jnp.einsum(f"{p.x_spec},{p.a_spec}->{p.h_spec}", x, a.astype(x.dtype), precision=precision)
    h = h * jnp.asarray(scale, x.dtype)
    return jnp.einsum(f"{p.h_spec},{p.b_spec}->{p.out_spec}", h, b.astype(x.dtype), precision=precision)


def einsum_delta(
    subscripts: str,
    x: jax.Array,
    lora: Factors,
    *,
    dropout_key: jax.Array | None = None,
    precision: Any = None,
) -> jax.Array:
    """The LoRA branch of ``jnp.einsum(subscripts, x, kernel)``: ``scale · (dropout(x)·A)·B``."""
    _supported_plan(subscripts)
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
    h = jnp.matmul(q, b.astype(q.dtype).T, precision=precision) * jnp.asarray(scale, q.dtype)
    return jnp.matmul(h, a.astype(q.dtype).T, precision=precision)


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
