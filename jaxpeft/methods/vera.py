"""VeRA: frozen random projections shared by all layers, and two trained vectors per layer, ``Λ_b·B·Λ_d·A``; and its
PEFT ``VERA`` codec.

HF tensors: ``<module>.vera_lambda_d`` ``[r]`` and ``.vera_lambda_b`` ``[out]`` (no ``.weight``; kernels with several
fan-out axes flattened), and the projections every module shares, ``base_model.vera_A`` ``[r, max_in]`` and
``base_model.vera_B`` ``[max_out, r]`` (``max_in``/``max_out``: the largest in/out features of the adapted modules),
which PEFT slices per module as ``vera_A[:, :in]`` and ``vera_B[:out, :]``. By default jaxpeft regenerates its
projections from ``projection_prng_key`` (:func:`.shared_projections`) and never stores them; a file whose projections
are not those (made by PEFT, from torch's random generator) imports with them stored in each node as frozen arrays
(``VeraConfig(store_projections=True)``), and exports back the same shared matrices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._select import ALL_LINEAR, Layout, TargetSpec
from jaxpeft.api import fold_weight
from jaxpeft.hf import codec as hfc
from jaxpeft.methods._factors import check_dtype, check_flag, check_kinds, check_rate, factors_delta
from jaxpeft.protocol import FROZEN, STATIC, LayerAdapter, LayerCall, MethodConfig, check_ndim

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
    """VeRA's frozen ``A (fan_in, r)`` and ``B (r, fan_out)``, float32: :func:`.projection` scaled like HF PEFT.

    A is ``U(±√(6/bound_fan_in))`` (PEFT's kaiming bound of its shared ``vera_A``, whose fan-in is the largest of all
    targets), B ``U(±√(6/r))``. Every entry depends only on its indices, so the matrices of a smaller layer are
    exactly the top-left blocks of a larger one's (HF PEFT's ``vera_A[:, :in]``/``vera_B[:out, :]`` slices).
    """
    a = projection(seed, 0, fan_in, rank) * math.sqrt(6.0 / bound_fan_in)
    b = projection(seed, 1, fan_out, rank).T * math.sqrt(6.0 / rank)
    return a, b


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VeraWeights(LayerAdapter):
    """One VeRA adapter: ``ΔW = A·diag(λ_d)·B·diag(λ_b)`` (kernel layout: A ``(*fan_in, r)``, B ``(r, *fan_out)``).

    The trained leaves are the vectors ``lambda_d`` ``(*stack, r)`` and ``lambda_b`` ``(*stack, *fan_out)``. By
    default the frozen projections A and B are a pure function of the static ``seed`` and the layer's sizes
    (:func:`.shared_projections`), regenerated inside the forward: they take no storage in the adapter tree, the
    checkpoint or the optimizer, and get no gradient. With stored projections (``VeraConfig(store_projections=True)``,
    e.g. imported from PEFT) they are the frozen fields ``proj_a`` ``(*stack, *fan_in, r)`` and ``proj_b``
    ``(*stack, r, *fan_out)`` instead: saved and exported, never trained. A is kaiming-uniform
    ``U(±√(6/shared_fan_in))``, with ``shared_fan_in`` the largest flattened fan-in over all the targets of the
    config (the width of HF PEFT's shared ``vera_A``; None: this layer's own fan-in), B ``U(±√(6/r))``, as HF
    PEFT's ``_kaiming_init``. The forward is
    ``base(x) + (dropout(x)·(A ⊙ λ_d))·(B ⊙ λ_b)``: LoRA's low-rank path with scaled factors, never ``W + ΔW``.
    """

    lambda_d: Any
    lambda_b: Any
    seed: int = dataclasses.field(default=0, metadata=STATIC)
    fan_in_shape: tuple[int, ...] = dataclasses.field(default=(), metadata=STATIC)
    dropout: float = dataclasses.field(default=0.0, metadata=STATIC)
    layout: Layout = dataclasses.field(metadata=STATIC, kw_only=True)
    shared_fan_in: int | None = dataclasses.field(default=None, metadata=STATIC)
    proj_a: Any = dataclasses.field(default=None, metadata=FROZEN)
    proj_b: Any = dataclasses.field(default=None, metadata=FROZEN)

    @property
    def rank(self) -> int:
        return int(self.lambda_d.shape[-1])

    @property
    def bound_fan_in(self) -> int:
        """The fan-in that sets A's kaiming bound, which is ``shared_fan_in`` or this layer's flattened fan-in."""
        return math.prod(self.fan_in_shape) if self.shared_fan_in is None else self.shared_fan_in

    def describe(self) -> str:
        return f"r={self.rank} " + ("stored projections" if self.proj_a is not None else f"seed={self.seed}")

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        stack, fan_in, fan_out = self.layout.axes()
        return {
            "lambda_d": (*stack, None),
            "lambda_b": (*stack, *fan_out),
            "proj_a": (*stack, *fan_in, None),
            "proj_b": (*stack, None, *fan_out),
        }

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        if problem := check_ndim(self.layout, weight_shape):
            return problem
        stack, fan_in, fan_out = self.layout.split(weight_shape)
        want_d, want_b = (*stack, self.rank), (*stack, *fan_out)
        if fan_in != self.fan_in_shape or tuple(self.lambda_b.shape) != want_b or self.lambda_d.shape[:-1] != stack:
            return f"expected fan-in {self.fan_in_shape}, lambda_d {want_d} and lambda_b {want_b}"
        if self.proj_a is not None or self.proj_b is not None:
            want_a, want_b = (*stack, *fan_in, self.rank), (*stack, self.rank, *fan_out)
            got_a, got_b = (None if p is None else tuple(p.shape) for p in (self.proj_a, self.proj_b))
            if (got_a, got_b) != (want_a, want_b):
                return f"expected stored projections A {want_a} and B {want_b}, got {got_a} and {got_b}"
        elif self.bound_fan_in < math.prod(fan_in):
            return f"its shared projection's fan-in {self.bound_fan_in} is below the weight's {math.prod(fan_in)}"
        return None

    def projections(self) -> tuple[jax.Array, jax.Array]:
        """The frozen ``(A, B)`` of this layer in float32: the stored ones (``(*stack, *fan_in, r)``,
        ``(*stack, r, *fan_out)``), else regenerated ``(*fan_in, r)``, ``(r, *fan_out)`` (constants: no gradient)."""
        if self.proj_a is not None:
            return jnp.asarray(self.proj_a, jnp.float32), jnp.asarray(self.proj_b, jnp.float32)
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
      dtype: dtype of the vectors (and of stored projections).
      store_projections: keep each layer's slices of A and B in its node as frozen arrays (``proj_a``, ``proj_b``)
        instead of regenerating them; ``jaxpeft.hf`` imports PEFT-made files this way (their projections come from
        torch's random generator). Costs ``r·(fan_in + fan_out)`` frozen entries per layer; never trained.

    As in HF PEFT, A's kaiming bound comes from the largest fan-in of all the selected targets (the width of PEFT's
    shared ``vera_A``; ``jaxpeft.init`` finds it through :meth:`for_targets`), so one A serves every layer. The
    difference from HF PEFT, by design: A and B are regenerated from ``projection_prng_key`` (with jaxpeft's own
    hash, :func:`.projection`) instead of stored, so their values are not PyTorch's; ``jaxpeft.hf`` writes them
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
    store_projections: bool = False
    #: The largest flattened fan-in of the selection, set by :meth:`for_targets` (not a constructor argument, not
    #: in JSON); None in a config you build, whose ``init_target`` alone then treats each weight as the only target.
    largest_fan_in: int | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"`rank`={self.rank!r}; expected a positive integer such as 256.")
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < 2**32:
            raise ValueError(f"`projection_prng_key`={key!r}; expected an integer seed in [0, 2**32), e.g. 0.")
        if not hfc.is_number(self.d_initial) or not math.isfinite(self.d_initial):
            raise ValueError(f"`d_initial`={self.d_initial!r}; expected a finite number, e.g. 0.1.")
        object.__setattr__(self, "d_initial", float(self.d_initial))
        object.__setattr__(self, "dropout", check_rate("dropout", self.dropout))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        check_flag("store_projections", self.store_projections)
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
        node = VeraWeights(lambda_d, lambda_b, self.projection_prng_key, fan_in, self.dropout, layout=layout)
        node = dataclasses.replace(node, shared_fan_in=shared)
        if not self.store_projections:
            return node
        a, b = node.projections()
        a = jnp.broadcast_to(a.astype(self.dtype), (*stack, *a.shape))
        b = jnp.broadcast_to(b.astype(self.dtype), (*stack, *b.shape))
        return dataclasses.replace(node, shared_fan_in=None, proj_a=a, proj_b=b)


# ----------------------------------------------------------------------------------------------- PEFT codec

#: The keys of the projections all modules share (outside ``base_model.model.``).
SHARED_KEYS = ("base_model.vera_A", "base_model.vera_B")
_SUFFIXES = {".vera_lambda_d": "d", ".vera_lambda_b": "b"}
_FIELDS = hfc.FieldTable(
    (
        "peft_type",
        "r",
        "target_modules",
        "layers_to_transform",
        "layers_pattern",
        "projection_prng_key",
        "save_projection",
        "vera_dropout",
        "d_initial",
        "init_weights",
        "bias",
    ),
    {**hfc.HARMLESS_COMMON, **hfc.FAN_IN_FAN_OUT},
    hfc.REFUSED_SAVED,
)


def _hash_projections(seed: int, rank: int, max_in: int, max_out: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``vera_A`` ``[r, max_in]`` and ``vera_B`` ``[max_out, r]`` of jaxpeft's projections (float32)."""
    a, b = shared_projections(seed, rank, max_in, max_out, max_in)
    return np.ascontiguousarray(np.asarray(a).T), np.ascontiguousarray(np.asarray(b).T)


def _sizes(targets: Sequence[hfc.Target]) -> tuple[int, int]:
    """The largest flattened fan-in and fan-out of the targets (the widths of PEFT's shared matrices)."""
    max_in = max(math.prod(t.layout.split(t.shape)[1]) for t in targets)
    max_out = max(math.prod(t.layout.split(t.shape)[2]) for t in targets)
    return max_in, max_out


def _stored_projections(targets: Sequence[hfc.Target], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's shared ``vera_A`` ``[r, max_in]``/``vera_B`` ``[max_out, r]`` rebuilt from the stored per-layer
    projections, checked: every layer's must be the top-left blocks of one pair (PEFT's format has no other)."""
    max_in, max_out = _sizes(targets)
    pieces = [
        (t.path, np.reshape(t.array("proj_a", i), (-1, rank)).T, np.reshape(t.array("proj_b", i), (rank, -1)).T)
        for t in targets
        for _, i in t.layers()
    ]
    vera_a = next(a for _, a, _ in pieces if a.shape[1] == max_in).astype(np.float32)
    vera_b = next(b for _, _, b in pieces if b.shape[0] == max_out).astype(np.float32)
    for path, a, b in pieces:
        if not (np.array_equal(a, vera_a[:, : a.shape[1]]) and np.array_equal(b, vera_b[: b.shape[0]])):
            raise ValueError(
                f"adapter {path!r} stores VeRA projections that are not blocks of the other layers' (PEFT's file holds "
                "one shared vera_A [r, max_in] and vera_B [max_out, r], each layer reading its top-left block). "
                "Export adapters that share their projections, e.g. the ones imported from one PEFT file."
            )
    return vera_a, vera_b


def _check_node(target: hfc.Target, cfg: VeraConfig, max_in: int) -> None:
    node, path = target.node, target.path
    if (node.rank, node.seed, node.dropout) != (cfg.rank, cfg.projection_prng_key, cfg.dropout):
        raise ValueError(
            f"adapter {path!r} has rank {node.rank}, projection_prng_key {node.seed} and dropout {node.dropout}, but "
            f"`cfg` gives {cfg.rank}, {cfg.projection_prng_key} and {cfg.dropout}; pass the config the adapters were "
            "made with."
        )
    if (node.proj_a is not None) != cfg.store_projections:
        raise ValueError(
            f"adapter {path!r} {'stores' if node.proj_a is not None else 'does not store'} its projections but "
            f"`cfg.store_projections`={cfg.store_projections}; pass the config the adapters were made with."
        )
    if node.proj_a is None and node.bound_fan_in != max_in:
        raise ValueError(
            f"adapter {path!r} scales its projection A for a largest fan-in of {node.bound_fan_in}, but the largest "
            f"fan-in of the exported adapters is {max_in}. PEFT sizes its one shared vera_A (and A's bound) to the "
            "largest fan-in of the adapted modules, so the file would compute another model. Export the whole "
            "adapter tree jaxpeft.init made with this config."
        )


def _to_hf(req: hfc.Export) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of VeRA adapters, with the shared projections (``save_projection=True``)."""
    cfg: VeraConfig = req.cfg
    found: list[hfc.Target] = []

    def vectors(target: hfc.Target, layer: int | None) -> dict[str, np.ndarray]:
        d, b = target.array("lambda_d", layer), target.array("lambda_b", layer)
        return {".vera_lambda_d": d, ".vera_lambda_b": np.reshape(b, (-1,))}

    tensors, names = hfc.write_modules(req, VeraWeights, vectors, found.append)
    max_in, max_out = _sizes(found)
    for target in found:
        _check_node(target, cfg, max_in)
    if cfg.store_projections:
        shared = _stored_projections(found, cfg.rank)
    else:
        shared = _hash_projections(cfg.projection_prng_key, cfg.rank, max_in, max_out)
    tensors |= dict(zip(SHARED_KEYS, shared, strict=True))
    config = {
        "auto_mapping": None,
        "bias": "none",
        "d_initial": cfg.d_initial,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "peft_type": "VERA",
        "projection_prng_key": cfg.projection_prng_key,
        "r": cfg.rank,
        "revision": None,
        "save_projection": True,
        "target_modules": hfc.target_modules(req, names),
        "vera_dropout": cfg.dropout,
    }
    return config, tensors


def _read_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """The checked fields of a ``peft_type: "VERA"`` config; missing fields take PEFT's defaults."""
    hfc.check_bias_none(config, "VeRA vectors")
    if hfc.bool_field(config, "save_projection", True) is not True:
        raise ValueError(
            f"{hfc.CONFIG_NAME} has `save_projection`=false: the file lacks VeRA's shared projections vera_A/vera_B, "
            "and PEFT regenerates them from torch's random generator (projection_prng_key), which jaxpeft cannot "
            "reproduce. Save the adapter in PEFT with save_projection=True (PEFT's default), then import it."
        )
    key = config.get("projection_prng_key", 0)
    if not hfc.is_int(key) or not 0 <= key < 2**32:
        raise hfc.fail("projection_prng_key", key, "a whole number in [0, 2**32)")
    d_initial = config.get("d_initial", 0.1)
    if not hfc.is_number(d_initial) or not math.isfinite(d_initial):
        raise hfc.fail("d_initial", d_initial, "a finite number, e.g. 0.1")
    return {
        "r": hfc.rank_value("r", config.get("r", 256)),
        "projection_prng_key": key,
        "d_initial": float(d_initial),
        "vera_dropout": hfc.rate_value(config, "vera_dropout"),
        "identity_init": hfc.bool_field(config, "init_weights", True),  # True: lambda_b zeros
        "selection": hfc.read_selection(config, layers=True),
    }


def _vectors(group: hfc.Group, layout: Layout, rank: int) -> dict[str, np.ndarray]:
    """Our ``{lambda_d, lambda_b}`` at ``group.path`` from its HF modules (stacked when ``{layer}``)."""
    fan_out = layout.split(group.shape)[2]
    ds, bs = [], []
    for name, entry in group.modules:
        if set(entry) != {"d", "b"}:
            raise ValueError(f"HF module {name!r} has only one of vera_lambda_d and vera_lambda_b; it is incomplete.")
        d, b = np.asarray(entry["d"]), np.asarray(entry["b"])
        if d.shape != (rank,) or b.shape != (math.prod(fan_out),):
            raise ValueError(
                f"HF module {name!r} has vera_lambda_d {d.shape} and vera_lambda_b {b.shape}; {group.path!r} of shape "
                f"{group.shape} with r={rank} needs {(rank,)} and {(math.prod(fan_out),)} per layer. Does the adapter "
                "belong to this base model?"
            )
        ds.append(d)
        bs.append(np.reshape(b, fan_out))
    return {"lambda_d": group.stack(ds), "lambda_b": group.stack(bs)}


def _projection_slices(
    group: hfc.Group, layout: Layout, shared: Sequence[np.ndarray], rank: int
) -> dict[str, np.ndarray]:
    """The stored ``proj_a``/``proj_b`` of ``group``: its top-left blocks of the file's shared matrices."""
    _, fan_in, fan_out = layout.split(group.shape)
    a = np.reshape(shared[0][:, : math.prod(fan_in)].T, (*fan_in, rank))
    b = np.reshape(shared[1][: math.prod(fan_out)].T, (rank, *fan_out))
    n = len(group.modules)
    return {"proj_a": group.stack([a] * n), "proj_b": group.stack([b] * n)}


def _from_hf(req: hfc.Import) -> tuple[VeraConfig, dict[str, Any]]:
    """A ``VeraConfig`` and adapter tree from a PEFT ``VERA`` adapter (projections regenerated when they are
    jaxpeft's, stored as frozen arrays otherwise)."""
    fields = _read_fields(req.config)
    missing = [k for k in SHARED_KEYS if k not in req.tensors]
    if missing:
        raise ValueError(
            f"the adapter file has no {hfc.listed(missing)}, although {hfc.CONFIG_NAME} has save_projection=true (PEFT "
            "refuses it too); the file is incomplete."
        )
    shared = [np.asarray(req.tensors[k], np.float32) for k in SHARED_KEYS]
    rest = {k: v for k, v in req.tensors.items() if k not in SHARED_KEYS}
    what = "VeRA vectors (vera_lambda_d, vera_lambda_b) or projections"
    groups = hfc.read_groups(req, fields["selection"], _SUFFIXES, what, fields["identity_init"], "init_weights", rest)
    layouts = dict(req.layouts or {})
    arrays, used_layouts = {}, {}
    for group in groups:
        used_layouts[group.path] = hfc.import_layout(group, "linear", layouts.get(group.path))
        arrays[group.path] = _vectors(group, used_layouts[group.path], fields["r"])
    sizes = [used_layouts[g.path].split(g.shape)[1:] for g in groups]
    max_in = max(math.prod(fan_in) for fan_in, _ in sizes)
    max_out = max(math.prod(fan_out) for _, fan_out in sizes)
    rank = fields["r"]
    for key, have, want in zip(SHARED_KEYS, shared, ((rank, max_in), (max_out, rank)), strict=True):
        if have.shape != want:
            raise ValueError(
                f"the adapter file's {key!r} has shape {have.shape}, but PEFT sizes it {want} for r={rank} and the "
                f"adapted modules' largest in/out features ({max_in}, {max_out}); the file does not belong to this "
                "base model, or it adapts modules this import does not."
            )
    ours = _hash_projections(fields["projection_prng_key"], rank, max_in, max_out)
    store = not all(np.allclose(h, w, rtol=1e-6, atol=1e-7) for h, w in zip(shared, ours, strict=True))
    if store:  # PEFT's own projections (torch's RNG): carried as frozen arrays
        for group in groups:
            arrays[group.path] |= _projection_slices(group, used_layouts[group.path], shared, rank)
    cfg = VeraConfig(
        rank=rank,
        targets=hfc.exact_paths(arrays),
        projection_prng_key=fields["projection_prng_key"],
        d_initial=fields["d_initial"],
        dropout=fields["vera_dropout"],
        dtype=hfc.adapter_dtype(
            (v for f in arrays.values() for k, v in f.items() if k.startswith("lambda")), req.dtype
        ),
        store_projections=store,
    )
    return cfg, hfc.build_adapters(cfg, req.params, used_layouts, arrays)


VeraConfig.codec = hfc.PeftCodec(
    "VERA",
    "VeraConfig",
    _FIELDS,
    _to_hf,
    _from_hf,
    tensor_parts=frozenset(("vera_lambda_d", "vera_lambda_b", "vera_A", "vera_B")),
    shared_keys=SHARED_KEYS,
)
