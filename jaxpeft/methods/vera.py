"""VeRA: frozen random projections shared by all layers, and two trained vectors per layer, ``Λ_b·B·Λ_d·A``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft._select import ALL_LINEAR, Layout, TargetSpec
from jaxpeft.methods.base import STATIC, Adapter, LayerCall, MethodConfig, check_ndim, fold_weight
from jaxpeft.methods.loha import check_kinds
from jaxpeft.methods.lora import check_dtype, factors_delta, is_number

__all__ = ["VeraConfig", "VeraWeights", "projection", "shared_projections"]

VERA_KINDS = ("dense", "dense_general", "einsum")
_GOLDEN = 0x9E3779B9


def _mix(h: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash (``lowbias32``, C. Wellons): every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def projection(seed: int, which: int, rows: int, cols: int) -> jax.Array:
    """Entries ``[0, rows) × [0, cols)`` of VeRA's shared random matrix ``which`` (0: A, 1: B), uniform in [-1, 1).

    Entry ``(i, j)`` is a hash of ``(seed, which, i, j)`` alone, so a smaller layer reads exactly the top-left block
    a larger one reads (HF PEFT's slicing of one shared matrix), and the values are defined by this function, not
    by JAX's PRNG (whose bits changed with ``jax_threefry_partitionable``): a checkpoint of the trained vectors
    means the same model in every JAX version. Float32; ``O(rows·cols)`` integer operations, no storage.
    """
    i = jax.lax.broadcasted_iota(jnp.uint32, (rows, cols), 0)
    j = jax.lax.broadcasted_iota(jnp.uint32, (rows, cols), 1)
    base = _mix(jnp.uint32(seed) ^ _mix(jnp.uint32(which + 1) * jnp.uint32(_GOLDEN)))
    h = _mix(_mix(base ^ i) ^ (j * jnp.uint32(_GOLDEN)))
    return (h >> 8).astype(jnp.float32) * (2.0 / (1 << 24)) - 1.0


def shared_projections(
    seed: int, rank: int, fan_in: int, fan_out: int, bound_fan_in: int
) -> tuple[jax.Array, jax.Array]:
    """VeRA's frozen ``A (fan_in, r)`` and ``B (r, fan_out)``, float32: :func:`projection` scaled like HF PEFT.

    A is ``U(±√(6/bound_fan_in))`` (PEFT's kaiming bound of its shared ``vera_A``, whose fan-in is the largest of all
    targets), B ``U(±√(6/r))``. Every entry depends only on its indices, so the matrices of a smaller layer are
    exactly the top-left blocks of a larger one's (HF PEFT's ``vera_A[:, :in]``/``vera_B[:out, :]`` slices).
    """
    a = projection(seed, 0, fan_in, rank) * math.sqrt(6.0 / bound_fan_in)
    b = projection(seed, 1, fan_out, rank).T * math.sqrt(6.0 / rank)
    return a, b


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VeraWeights(Adapter):
    """One VeRA adapter: ``ΔW = A·diag(λ_d)·B·diag(λ_b)`` (kernel layout: A ``(*fan_in, r)``, B ``(r, *fan_out)``).

    The leaves are the trained vectors ``lambda_d`` ``(*stack, r)`` and ``lambda_b`` ``(*stack, *fan_out)``;
    nothing else. The frozen projections A and B are a pure function of the static ``seed`` and the layer's
    sizes (:func:`shared_projections`), regenerated inside the forward: they take no storage in the adapter tree, the
    checkpoint or the optimizer, and get no gradient. A is kaiming-uniform ``U(±√(6/shared_fan_in))``, with
    ``shared_fan_in`` the largest flattened fan-in over all the targets of the config (the width of HF PEFT's shared
    ``vera_A``; None: this layer's own fan-in), B ``U(±√(6/r))``, as HF PEFT's ``_kaiming_init``. The forward is
    ``base(x) + (dropout(x)·(A ⊙ λ_d))·(B ⊙ λ_b)``: LoRA's low-rank path with scaled factors, never ``W + ΔW``.
    """

    lambda_d: Any
    lambda_b: Any
    seed: int = dataclasses.field(default=0, metadata=STATIC)
    fan_in_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=STATIC)
    dropout: float = dataclasses.field(default=0.0, metadata=STATIC)
    layout: Layout = dataclasses.field(default=Layout(), metadata=STATIC)
    shared_fan_in: int | None = dataclasses.field(default=None, metadata=STATIC)

    @property
    def rank(self) -> int:
        return int(self.lambda_d.shape[-1])

    @property
    def bound_fan_in(self) -> int:
        """The fan-in that sets A's kaiming bound: ``shared_fan_in``, or this layer's flattened fan-in."""
        return math.prod(self.fan_in_shape) if self.shared_fan_in is None else self.shared_fan_in

    def describe(self) -> str:
        return f"r={self.rank} seed={self.seed}"

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        stack, _, fan_out = self.layout.axes()
        return {"lambda_d": (*stack, None), "lambda_b": (*stack, *fan_out)}

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        if problem := check_ndim(self.layout, weight_shape):
            return problem
        stack, fan_in, fan_out = self.layout.split(weight_shape)
        want_d, want_b = (*stack, self.rank), (*stack, *fan_out)
        if fan_in != self.fan_in_shape or tuple(self.lambda_b.shape) != want_b or self.lambda_d.shape[:-1] != stack:
            return f"expected fan-in {self.fan_in_shape}, lambda_d {want_d} and lambda_b {want_b}"
        if self.bound_fan_in < math.prod(fan_in):
            return f"its shared projection's fan-in {self.bound_fan_in} is below the weight's {math.prod(fan_in)}"
        return None

    def projections(self) -> tuple[jax.Array, jax.Array]:
        """The frozen ``(A (*fan_in, r), B (r, *fan_out))`` of this layer, float32 (constants: no gradient)."""
        rank, n_in = self.rank, math.prod(self.fan_in_shape)
        fan_out = tuple(self.lambda_b.shape[self.layout.stack :])
        a, b = shared_projections(self.seed, rank, n_in, math.prod(fan_out), self.bound_fan_in)
        return jnp.reshape(a, (*self.fan_in_shape, rank)), jnp.reshape(b, (rank, *fan_out))

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """``(A ⊙ λ_d, B ⊙ λ_b)`` laid out like LoRA's A ``(*stack, *fan_in, r)`` and B ``(*stack, r, *fan_out)``."""
        a, b = self.projections()
        n_in = len(self.fan_in_shape)
        d = self.lambda_d.astype(jnp.float32)
        lb = self.lambda_b.astype(jnp.float32)
        d = jnp.reshape(d, (*d.shape[:-1], *([1] * n_in), d.shape[-1]))
        lb = jnp.expand_dims(lb, self.layout.stack)
        return a * d, b * lb

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        a, b = self.factors()
        return fold_weight(weight, factors_delta(a, b, 1.0, self.layout, weight.shape), sign), None

    def forward(self, call: LayerCall) -> jax.Array:
        if call.kind not in VERA_KINDS:
            raise ValueError(f"VeRA cannot adapt a `{call.kind}` call; it adapts {VERA_KINDS} layers.")
        y = call.base(call.x)
        a, b = self.factors()
        x = call.dropout(call.x.astype(y.dtype), self.dropout)
        return y + call.lowrank(x, a, b, 1.0).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class VeraConfig(MethodConfig):
    """VeRA hyper-parameters (HF PEFT's ``VeraConfig``); frozen, hashable and JSON round-trippable.

    Args:
      rank: the rank r of the shared projections (HF's default 256; VeRA wants it large, the cost is two vectors).
      targets: ``"all-linear"``, a regex over leaf paths, module names, or a predicate (as for ``LoraConfig``).
      exclude: removed from the selection.
      projection_prng_key: the seed of the shared projections A and B (one pair for every target).
      d_initial: the initial value of every ``λ_d`` entry (``λ_b`` starts at 0, so ``ΔW = 0`` at init).
      dropout: dropout rate on the adapter branch's input, applied only when a dropout key is given.
      dtype: dtype of the vectors.

    As in HF PEFT, A's kaiming bound comes from the largest fan-in of all the selected targets (the width of PEFT's
    shared ``vera_A``; ``jaxpeft.init`` finds it through :meth:`for_targets`), so one A serves every layer. The
    difference from HF PEFT, by design: A and B are regenerated from ``projection_prng_key`` (with jaxpeft's own
    hash, :func:`projection`) instead of stored, so their values are not PyTorch's; ``jaxpeft.hf`` writes them
    into the file (PEFT's ``save_projection=True``) on export. Dense,
    DenseGeneral and Einsum kernels (fan-in and fan-out flattened); each layer of a scanned stack has its own
    vectors over the same A and B.

    References:
      Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", 2024.
    """

    method: ClassVar[str] = "vera"
    reads_weight_values: ClassVar[bool] = False
    restore_free: ClassVar[tuple[str, ...]] = ("dropout", "d_initial")

    rank: int = 256
    targets: TargetSpec = ALL_LINEAR
    exclude: TargetSpec = ()
    projection_prng_key: int = 0
    d_initial: float = 0.1
    dropout: float = 0.0
    dtype: str = "float32"
    #: The largest flattened fan-in of the selection, set by :meth:`for_targets` (not a constructor argument, not
    #: in JSON); None in a config you build, whose ``init_target`` alone then treats each weight as the only target.
    largest_fan_in: int | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"`rank`={self.rank!r}; expected a positive integer such as 256.")
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < 2**32:
            raise ValueError(f"`projection_prng_key`={key!r}; expected an integer seed in [0, 2**32), e.g. 0.")
        if not is_number(self.d_initial) or not math.isfinite(self.d_initial):
            raise ValueError(f"`d_initial`={self.d_initial!r}; expected a finite number, e.g. 0.1.")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout`={self.dropout!r}; expected a rate (a number) in [0, 1), e.g. 0.05.")
        object.__setattr__(self, "d_initial", float(self.d_initial))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        super().__post_init__()

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        check_kinds("VeRA", VERA_KINDS, rows)

    def for_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> VeraConfig:
        """This config with ``largest_fan_in``: the largest flattened fan-in of ``rows`` (PEFT's ``vera_A`` width)."""
        sizes = [math.prod(layout.split(tuple(leaf.shape))[1]) for _, leaf, layout in rows]
        new = dataclasses.replace(self)
        object.__setattr__(new, "largest_fan_in", max(sizes, default=None))
        return new

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("largest_fan_in", None)
        return out

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> VeraWeights:
        problem = check_ndim(layout, tuple(weight.shape))
        if problem is not None:
            raise ValueError(f"VeRA cannot adapt {path!r}: {problem}.")
        stack, fan_in, fan_out = layout.split(weight.shape)
        lambda_d = jnp.full((*stack, self.rank), self.d_initial, self.dtype)
        lambda_b = jnp.zeros((*stack, *fan_out), self.dtype)
        shared = math.prod(fan_in) if self.largest_fan_in is None else max(self.largest_fan_in, math.prod(fan_in))
        return VeraWeights(lambda_d, lambda_b, self.projection_prng_key, fan_in, self.dropout, layout, shared)
