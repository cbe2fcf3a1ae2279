"""plan / init / init_adjusted / merge / unmerge over parameter pytrees, and the one fold every merge path uses.

Everything here dispatches on the config object and the node's hook kind (``jaxpeft.protocol``): no method is named.
``fold_target`` is the only place that folds an adapter into a weight: the functional ``merge``/``unmerge``, the NNX
merge and the quantised merge all go through it, so they refuse the same things with the same messages (a
non-floating weight, an overflow of the weight's dtype, an adapter that does not fit, a model input).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, map_with_paths, set_path
from jaxpeft._select import Layout, LayoutEntry
from jaxpeft.protocol import (
    Adapter,
    MethodConfig,
    NotMergeableError,
    adapter_items,
    check_config,
    check_fits,
    frozen_fields,
    hook_kind,
    n_params,
    node_shapes,
    probe_call,
)

__all__ = [
    "Plan",
    "TargetInfo",
    "config_from_dict",
    "fold_target",
    "fold_weight",
    "init",
    "init_adjusted",
    "merge",
    "plan",
    "unmerge",
]


def config_from_dict(data: Mapping[str, Any], configs: Sequence[type[MethodConfig]] = ()) -> MethodConfig:
    """The config a ``to_dict`` came from, found by its ``method`` field among the built-ins and ``configs``.

    The built-ins are the registry's (``jaxpeft.methods.registry.BUILTIN``); a class in ``configs`` with the same
    ``method`` name takes precedence.
    """
    from jaxpeft.methods.registry import BUILTIN

    table = {c.method: c for c in (*BUILTIN, *configs)}
    method = data.get("method")
    if method not in table:
        raise ValueError(
            f"config has method={method!r}; known methods are {sorted(table)}. For a method of your own, pass its "
            "config class, e.g. configs=(MyConfig,)."
        )
    return table[method].from_dict(data)


# ------------------------------------------------------------------------------------------------ plan / init


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """One row of a dry run: which weight is adapted, its layout, and the (abstract) adapter node."""

    path: str
    shape: tuple[int, ...]
    layout: Layout
    node: Any

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The adapter's array shapes by field name."""
        return node_shapes(self.node)

    @property
    def n_params(self) -> int:
        """Every array entry of the node, frozen fields included."""
        return n_params(self.node)

    @property
    def n_trainable(self) -> int:
        """The node's trainable entries (its frozen fields, ``jaxpeft.FROZEN``, left out)."""
        return self.n_params - sum(n_params(getattr(self.node, f)) for f in frozen_fields(self.node))

    def __getattr__(self, name: str) -> Any:  # rank, scale, ... of the node, for convenience
        if name.startswith("_") or name == "node":
            raise AttributeError(name)
        return getattr(self.node, name)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The dry run of a config over a params tree: the rows that ``init`` would create."""

    targets: tuple[TargetInfo, ...]
    method: str = ""

    @property
    def n_params(self) -> int:
        """Every adapter array entry, frozen fields included."""
        return sum(t.n_params for t in self.targets)

    @property
    def n_trainable(self) -> int:
        """The trainable adapter entries (frozen fields left out)."""
        return sum(t.n_trainable for t in self.targets)

    def __str__(self) -> str:
        rows = [("path", "shape", "kind", self.method or "adapter", "params")]
        rows += [(t.path, str(t.shape), t.layout.kind, t.node.describe(), f"{t.n_params:,}") for t in self.targets]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        frozen = self.n_params - self.n_trainable
        tail = f" ({frozen:,} of them frozen)" if frozen else ""
        lines.append(f"{len(self.targets)} targets, {self.n_params:,} adapter parameters{tail}")
        return "\n".join(lines)


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)


def plan(cfg: MethodConfig, params: Any, *, layouts: Mapping[str, LayoutEntry] | None = None) -> Plan:
    """What ``init`` would adapt: path, shape, layout and the abstract adapter (shapes, parameter count) per target.

    Nothing is allocated: each target's adapter is built under ``jax.eval_shape``.

    Raises:
      ValueError: as ``select_targets`` (nothing matched, unknown layout, a layer that cannot be adapted, ...) and
        the method's own checks (e.g. a ``rank_pattern`` entry that matches no target).
    """
    cfg = check_config(cfg)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    rows = []
    selected = cfg.select(params, layouts)
    cfg = cfg.for_targets(selected)
    for path, leaf, layout in selected:
        node = jax.eval_shape(
            lambda w, k, path=path, layout=layout: cfg.init_target(path, w, layout, k), _abstract(leaf), key
        )
        rows.append(TargetInfo(path, tuple(leaf.shape), layout, node))
    return Plan(tuple(rows), cfg.method)


def init(
    cfg: MethodConfig,
    params: Any,
    *,
    key: jax.Array,
    layouts: Mapping[str, LayoutEntry] | None = None,
    check_identity: bool = True,
) -> dict:
    """The adapters of ``cfg`` for the weights of ``params`` it selects.

    The result is a nested dict mirroring the adapted paths, with an adapter node where each adapted weight is
    (e.g. ``adapters["layers"]["q_proj"]["kernel"].a`` for LoRA). Per-target keys are split from ``key`` in sorted
    path order, so the result does not depend on dict insertion order; the same key gives the same adapters.

    Guarantees: every built-in method but the prompt-learning ones starts as the identity (the adapted model's
    output equals the base model's), and ``init`` checks it for any method whose config claims it
    (``cfg.identity_at_init``): each new kind of node (type, layout and shapes) runs its hook once on a small
    probe call (``jaxpeft.protocol.probe_call``) over its weight, and a node whose output differs from the
    weight's plain output (beyond float rounding of the weight's dtype) is refused, naming the path and the
    deviation. The probe runs eagerly on concrete values only (not under ``jit``/``eval_shape``).

    Args:
      cfg: the method config (``LoraConfig``, ``DoraConfig``, ``IA3Config``, ... or your own ``MethodConfig``).
      params: the base parameters (arrays, or ``jax.ShapeDtypeStruct`` for methods that only read shapes); a
        quantised weight (``jaxpeft.quantize``) is dequantised only for a method that reads its values (DoRA).
      key: a ``jax.random`` key.
      layouts: kernel layouts for weights with more than 2 dims (``jaxpeft.linen.infer_layouts``).
      check_identity: run the identity check (default). False skips it, for a method you know is not the
        identity at init and whose config does not say so.

    Returns:
      The adapter tree.

    Raises:
      ValueError: a config that changes the base weights at init (``cfg.adjusts_base``: PiSSA, OLoRA): use
        :func:`init_adjusted`; a node that is not the identity at init (see above).

    Example:
      >>> import jax, jax.numpy as jnp, jaxpeft
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["dense"])
      >>> adapters = jaxpeft.init(cfg, params, key=jax.random.key(0))
      >>> node = adapters["dense"]["kernel"]  # the bias is not adapted: no entry for it
      >>> type(node).__name__, node.a.shape, node.b.shape, node.scale
      ('LoraWeights', (4, 2), (2, 3), 2.0)
      >>> bool((node.b == 0).all())  # B starts at zero, so the adapted model starts as the base
      True
    """
    cfg = check_config(cfg)
    if cfg.adjusts_base:
        raise ValueError(
            f"`cfg` ({type(cfg).__name__} with {cfg.base_adjustment}) changes the base weights at init: its "
            "adapters are the identity only over the residual weights, so jaxpeft.init alone would change the "
            "model. Use `params, adapters = jaxpeft.init_adjusted(cfg, params, key=key)` (jaxpeft.linen."
            "init_adjusted for a Linen model; jaxpeft.nnx.adapt adjusts the model itself) and train over those "
            "params."
        )
    rows = cfg.select(params, layouts)
    cfg = cfg.for_targets(rows)
    keys = jax.random.split(key, len(rows))
    adapters: dict[str, Any] = {}
    made = []
    for (path, leaf, layout), k in zip(rows, keys, strict=True):
        node = _init_target(cfg, path, leaf, layout, k)
        adapters = set_path(adapters, path, node)
        made.append((path, leaf, node))
    if check_identity and cfg.identity_at_init:
        check_identity_at_init(type(cfg).__name__, made)
    return adapters


def init_adjusted(
    cfg: MethodConfig,
    params: Any,
    *,
    key: jax.Array,
    layouts: Mapping[str, LayoutEntry] | None = None,
    check_identity: bool = True,
) -> tuple[Any, dict]:
    """``(new_params, adapters)``: the adapters of ``cfg`` and the base params they are the identity over.

    For a config that adjusts the base (``cfg.adjusts_base``: ``LoraConfig(init="pissa" | "pissa_niter_<n>" |
    "olora")``) each selected weight is replaced by ``cfg.adjust_base`` (PiSSA/OLoRA: the residual
    ``W - s·A·B`` formed in float32 and cast back to the weight's dtype); every other leaf of ``params`` is
    returned as is (same arrays, same tree structure). For any other config the result is
    ``(params, init(cfg, params, ...))``. Keys, selection, ordering and the identity check (over the new weights)
    are those of ``init``.

    Guarantees: at init the adapted model over ``new_params`` computes the original model's outputs up to the
    rounding of the residual (not bit-exact); ``merge(new_params, adapters)`` is the original weights up to that
    rounding, and after training ``merge(new_params, trained)`` is ``W + ΔW_trained`` (PEFT's PiSSA/OLoRA merge).
    Keep ``new_params`` as the base: the adapters mean nothing over the original weights until converted
    (``jaxpeft.to_plain_lora``).

    Raises:
      ValueError: as ``init``; a base-adjusting config over a quantised weight, a ``jax.ShapeDtypeStruct``
        (values are needed) or a non-floating weight.
    """
    cfg = check_config(cfg)
    if not cfg.adjusts_base:
        return params, init(cfg, params, key=key, layouts=layouts, check_identity=check_identity)
    rows = cfg.select(params, layouts)
    cfg = cfg.for_targets(rows)
    for path, leaf, _ in rows:
        if (problem := _not_adjustable(leaf)) is not None:
            raise ValueError(f"{cfg.base_adjustment} adjusts the base weight {path!r}, which {problem}.")
    keys = jax.random.split(key, len(rows))
    adapters: dict[str, Any] = {}
    new: dict[str, Any] = {}
    made = []
    for (path, leaf, layout), k in zip(rows, keys, strict=True):
        node = cfg.init_target(path, leaf, layout, k)
        adapters = set_path(adapters, path, node)
        new[path] = cfg.adjust_base(path, leaf, node)
        made.append((path, new[path], node))
    if check_identity and cfg.identity_at_init:
        check_identity_at_init(type(cfg).__name__, made, original={p: w for p, w, _ in rows})
    return map_with_paths(lambda path, w: new.get(path, w), params, is_leaf=quant.is_quantized), adapters


def _not_adjustable(leaf: Any) -> str | None:
    """Why a base-adjusting init cannot replace ``leaf`` (None when it can)."""
    if quant.is_quantized(leaf):
        return "is quantised (initialise on the float params, then quantise the returned params)"
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return "is a jax.ShapeDtypeStruct (its values are needed; wrap the call in jax.eval_shape for shapes only)"
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return f"is {jnp.dtype(leaf.dtype).name}, not floating"
    return None


def _init_target(cfg: MethodConfig, path: str, weight: Any, layout: Layout, key: jax.Array) -> Adapter:
    """``cfg.init_target``; a quantised weight is dequantised only for a method that reads weight values.

    A ``QuantizedArray`` has the logical shape and dtype, which is all a method with
    ``reads_weight_values = False`` (LoRA, IA3) reads. Others (DoRA's magnitude, a user's method by default) get
    the dequantised weight inside ``jit``, a transient that XLA may fuse into the method's reductions.
    """
    if quant.is_quantized(weight) and cfg.reads_weight_values:
        return _init_dequantized(cfg, path, weight, layout, key)
    return cfg.init_target(path, weight, layout, key)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _init_dequantized(cfg: MethodConfig, path: str, weight: Any, layout: Layout, key: jax.Array) -> Adapter:
    return cfg.init_target(path, quant.dequantize(weight), layout, key)


# ------------------------------------------------------------------------------------------------ identity


def _concrete(tree: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _first_slice(x: Any, n: int) -> Any:
    return x[(0,) * n] if n else x


def _probe_weight(weight: Any, node: Adapter, key: jax.Array) -> jax.Array:
    """The weight as float32 values (dequantised; standard normal for an abstract weight)."""
    if quant.is_quantized(weight):
        return quant.dequantize(weight, jnp.float32)
    if isinstance(weight, jax.ShapeDtypeStruct):
        return jax.random.normal(key, tuple(weight.shape), jnp.float32)
    return jnp.asarray(weight, jnp.float32)


def _deviation(node: Adapter, weight: Any, key: jax.Array, reference: Any = None) -> float:
    """The largest difference of the node's hook from the identity on a probe, relative to the output's scale.

    The identity is the plain layer over ``reference`` (the original weight of a base-adjusting init), by default
    over ``weight`` itself.
    """
    kind = hook_kind(node)
    values = _probe_weight(weight, node, key)
    plain = values if reference is None else _probe_weight(reference, node, key)
    if kind == "leaf":
        got = node.value(values)  # type: ignore[attr-defined]
        want = plain
    else:
        n = 0 if node.layout.kind == "einsum" else node.layout.stack
        call_node = jax.tree.map(lambda leaf: _first_slice(leaf, n), node).at_call(n).frozen_stopped()
        call = probe_call(call_node.layout, _first_slice(values, n), jax.random.fold_in(key, 1))
        got = cast(Any, call_node).forward(call)
        want = probe_call(call_node.layout, _first_slice(plain, n), jax.random.fold_in(key, 1)).base(call.x)
    got_np, want_np = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got_np.shape != want_np.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(want_np), initial=0.0)), 1e-6)
    return float(np.max(np.abs(got_np - want_np), initial=0.0)) / scale


def check_identity_at_init(
    config_name: str, made: Sequence[tuple[str, Any, Adapter]], original: Mapping[str, Any] | None = None
) -> None:
    """Refuse nodes that are not the identity at init: one probe per kind of node (type, layout, shapes).

    ``made`` holds ``(path, weight the node runs over, node)``; the check is skipped for model inputs
    (``InputAdapter``), for nodes or weights that are traced (under ``jit``/``eval_shape``) and for adapter banks.
    The tolerance is ``max(1e-4, 4·eps)`` of the weight's dtype, relative to the largest output.
    """
    seen: set[Any] = set()
    key = jax.random.key(0)
    for path, weight, node in made:
        kind = hook_kind(node)
        if kind == "input" or node.bank_size is not None or not _concrete((node, weight)):
            continue
        group = (type(node), node.layout, tuple(sorted(node_shapes(node).items())))
        if group in seen:
            continue
        seen.add(group)
        dtype = weight.dtype if jnp.issubdtype(weight.dtype, jnp.floating) else jnp.float32
        tol = max(1e-4, 4 * float(jnp.finfo(dtype).eps))
        if original is not None:  # a residual base: its rounding counts, relative to the original weight
            tol = max(tol, 4 * float(jnp.finfo(original[path].dtype).eps))
        try:
            deviation = _deviation(node, weight, key, None if original is None else original[path])
        except Exception as err:
            raise ValueError(
                f"the identity check at init ran {type(node).__name__} at {path!r} on a probe {node.layout.kind} call "
                f"(jaxpeft.protocol.probe_call) and it raised {type(err).__name__}: {err}. Fix the hook, or pass "
                "check_identity=False to skip the check."
            ) from err
        if not deviation <= tol:
            raise ValueError(
                f"{config_name} is not the identity at init: its {type(node).__name__} at {path!r} changes the "
                f"layer's output by {deviation:.3g} of its scale on a probe (allowed {tol:.1g}). A PEFT method must "
                "start from the base model (e.g. LoRA's B = 0): fix `init_target`, make the config's "
                "`identity_at_init` return False if that is intended, or pass check_identity=False."
            )


# ------------------------------------------------------------------------------------------------ merge


def fold_weight(w: jax.Array, delta: jax.Array, sign: int) -> jax.Array:
    """``w ± delta`` formed in float32 and cast back to ``w.dtype`` (a helper for ``fold`` methods)."""
    return (w.astype(jnp.float32) + sign * delta.astype(jnp.float32)).astype(w.dtype)


def _fold_arrays(node: Adapter, weight: Any, bias: jax.Array | None, sign: int) -> tuple[Any, Any]:
    """``node.fold`` on one weight, through its dequantised values when it is quantised (then requantised alike).

    Returns ``(new weight, new bias or None)`` in the weight's and bias's dtypes (a quantised weight: quantised
    again, with the same kind, blocks and logical dtype).
    """
    if quant.is_quantized(weight):
        after, new_bias = node.fold(quant.dequantize(weight, jnp.float32), bias, sign)  # type: ignore[attr-defined]
        new_bias = None if new_bias is None or bias is None else jnp.asarray(new_bias).astype(bias.dtype)
        return quant.requantize(after, weight), new_bias
    new_weight, new_bias = node.fold(weight, bias, sign)  # type: ignore[attr-defined]
    new_weight = jnp.asarray(new_weight).astype(weight.dtype)  # a fold never changes the params' dtypes
    new_bias = None if new_bias is None or bias is None else jnp.asarray(new_bias).astype(bias.dtype)
    return new_weight, new_bias


def _overflowed(before: Any, after: Any) -> bool:
    """Whether folding made a finite entry inf/NaN in ``after``'s dtype (False under ``jit``: values unknown).

    A quantised ``after`` is read as it will be used: its values dequantised in its logical dtype (a float16
    weight whose merged values pass 65504 is finite in float32 before requantising, inf after), and its scales.
    """
    try:
        if quant.is_quantized(after):
            scales = [x for x in jax.tree.leaves(after) if jnp.issubdtype(x.dtype, jnp.floating)]
            if not all(bool(jnp.all(jnp.isfinite(x))) for x in scales):
                return True
            after = quant.dequantize(after)
        if bool(jnp.all(jnp.isfinite(after))):
            return False
        return bool(jnp.any(jnp.isfinite(quant.dequantize(before)) & ~jnp.isfinite(after)))
    except jax.errors.ConcretizationTypeError:
        return False


def _overflow_error(path: str, node: Adapter, weight: Any, bias: jax.Array | None, sign: int, of_bias: bool) -> str:
    """The refusal of a fold that overflows its dtype, with the largest merged value (the fold redone in float32)."""
    target = bias if of_bias and bias is not None else weight
    dtype = jnp.dtype(target.dtype)
    w32 = quant.dequantize(weight, jnp.float32) if quant.is_quantized(weight) else weight.astype(jnp.float32)
    b32 = None if bias is None else bias.astype(jnp.float32)
    values = node.fold(w32, b32, sign)[1 if of_bias else 0]  # type: ignore[attr-defined]
    largest = float(jnp.max(jnp.abs(jnp.asarray(values, jnp.float32))))
    head = (
        f"folding the adapter into {path!r} overflows {dtype.name} (largest finite {float(jnp.finfo(dtype).max):g})"
        f": the merged values reach max |value| {largest:.4g}"
    )
    if not of_bias and quant.is_quantized(weight):
        return (
            f"{head}, and this {weight.kind}-quantised weight dequantises to {dtype.name} (its logical dtype), so "
            "it would hold inf and could not be unmerged. Merge into float32 params instead: quantise a float32 "
            "copy of the base (jaxpeft.quantize(params_f32, ...)), or merge into jaxpeft.dequantize(params, "
            "jnp.float32); or keep the adapters separate (jaxpeft.linen.apply, jaxpeft.nnx)."
        )
    return (
        f"{head}; the result would hold inf and could not be unmerged. Merge into float32 (or bfloat16) params "
        "instead, or keep the adapters separate (jaxpeft.linen.apply, jaxpeft.nnx)."
    )


def fold_target(
    path: str, node: Adapter, weight: Any, bias: jax.Array | None, sign: int, bias_path: str | None = None
) -> tuple[Any, jax.Array | None]:
    """``(weight, bias)`` at ``path`` with ``node`` folded in (``sign=+1``) or out (``-1``): the one fold.

    Every merge path (``jaxpeft.merge``/``unmerge``, ``jaxpeft.nnx.merge``/``unmerge``, quantised weights) calls
    this, so all refuse the same inputs with the same messages. The results keep the weight's and bias's dtypes
    (a node's fold computed in float32 is cast back here, and an overflow of that dtype is caught; a quantised
    weight is checked as it will be read: requantised, then dequantised in its logical dtype).

    Raises:
      NotMergeableError: a model input (``InputAdapter``), a method that cannot be merged, a non-floating weight
        (int8: folding would truncate); the message names ``path``.
      ValueError: the adapter does not fit the weight; outside ``jit``, a fold that overflows the weight's dtype
        (float16 beyond 65504; for a quantised weight its logical dtype), for the weight or the bias. The message
        names the path, the dtype and the largest merged value.
    """
    if hook_kind(node) == "input":
        raise NotMergeableError(
            f"adapter {path!r}: a {type(node).__name__} is a model input (virtual tokens), not a weight update, so "
            "it cannot be merged into the base weights; keep it separate and pass it to the model's hook."
        )
    check_fits(path, node, tuple(weight.shape))
    if not jnp.issubdtype(weight.dtype, jnp.floating):
        raise NotMergeableError(
            f"adapter {path!r}: the weight is {jnp.dtype(weight.dtype).name}, not floating; folding into it would "
            "truncate. Keep the adapters separate (jaxpeft.linen.apply, jaxpeft.nnx) or dequantise the weight first."
        )
    try:
        new_weight, new_bias = _fold_arrays(node, weight, bias, sign)
    except NotMergeableError as err:
        raise NotMergeableError(f"adapter {path!r}: {err}") from None
    if _overflowed(weight, new_weight):
        raise ValueError(_overflow_error(path, node, weight, bias, sign, of_bias=False))
    if new_bias is not None and bias is not None and _overflowed(bias, new_bias):
        raise ValueError(_overflow_error(bias_path or f"{path} (bias)", node, weight, bias, sign, of_bias=True))
    return new_weight, new_bias


def _fold(params: Any, adapters: Any, sign: int) -> Any:
    table = dict(adapter_items(adapters))
    flat = dict(leaves_with_paths(params, is_leaf=quant.is_quantized))
    missing = sorted(p for p in table if p not in flat)
    if missing:
        raise ValueError(
            f"adapters {missing[:4]} have no matching parameter; were the adapters made for this model's params?"
        )
    folded: dict[str, Any] = {}
    for path, node in table.items():
        module = path.rpartition("/")[0]
        bias_path = f"{module}/bias" if module else "bias"
        weight, bias = fold_target(path, node, flat[path], flat.get(bias_path), sign, bias_path)
        folded[path] = weight
        if bias is not None:
            folded[bias_path] = bias
    return map_with_paths(lambda path, w: folded.get(path, w), params, is_leaf=quant.is_quantized)


def merge(params: Any, adapters: Any, *, dequantize: Any = None) -> Any:
    """The params with every adapter folded into its weight (and bias, for methods that scale outputs).

    ``dequantize=jnp.bfloat16`` (any float dtype) first dequantises every quantised weight of ``params`` to that
    dtype (``jaxpeft.dequantize``) and folds there: the result holds no quantised array (``model.apply`` reads it
    directly) and keeps the whole adapter, where the default requantising merge loses part of it to rounding
    (measured on the example Llama in ``tests/test_quant.py``: the merged logits' error is 0.12 of the adapter's
    effect for NF4 and 0.010 for int8, and 3e-7 when dequantised to float32; the smaller the adapter's update
    against the quantisation step, the larger the part lost).

    Pure: returns new params and leaves the inputs untouched. The fold is computed in float32 and cast back to
    each weight's dtype, so the merged model's outputs match the adapted model's up to that rounding.

    A quantised weight (``jaxpeft.quant``, QLoRA) is dequantised, folded in float32 and requantised with the
    same kind and blocks, so the result is quantised again and the merged weight is ``Q(Ŵ + ΔW)`` rather than
    ``Ŵ + ΔW``. Per element the difference is at most one rounding of the new weight (``quant.quantize_array``):
    int8 ``m / 254`` with ``m`` the absolute maximum of the element's merged output channel; NF4
    ``0.152 · m̂`` with ``m̂ < m + M / 255`` (``m`` the merged block's absmax, ``M`` its group's largest). A zero
    update requantises to the same codes. Requantising rounds, so a merge into a quantised weight has no useful
    gradient: train with the adapters separate (``jaxpeft.linen.apply``, ``jaxpeft.nnx``), not through
    ``jaxpeft.merged``. The overflow check reads the requantised weight as it will be used, dequantised in its
    logical dtype (a float16 base quantised to NF4 is refused when the merged values pass 65504).

    ``unmerge(merge(p))`` of a quantised weight requantises twice, so it is not ``p``: per element it differs by at
    most the merge's rounding plus the unmerge's, half a level of each one's scale (int8: ``(m₁ + m₂) / 254`` per
    output channel; NF4: ``0.152 · (m̂₁ + m̂₂)`` per block, ``m̂₁`` the merged block's scale, ``m̂₂`` the
    unmerged one's). Exact undoing would need the pre-merge codes kept beside the merged ones (the base's memory
    again): keep the quantised params you merged into (``merge`` never changes them) and use those instead of
    ``unmerge``. Repeated cycles drift further rather than averaging out: requantising values plus rounding noise
    tends to raise a block's absmax (noise lifts the maximum), and the block's other values, whose codes mostly
    stay, scale up with it (NF4 block scales grew 2% a requantisation below). Measured on 256×256 weights
    ~ N(0, 0.05) (``|w| ≤ 0.24``) with a rank-8 update of std 0.005 (10% of the weights'), the largest
    ``|drift|`` after 1 / 5 / 20 merge-unmerge cycles (relative Frobenius drift in brackets): NF4
    0.040 / 0.11 / 0.45 (0.09 / 0.32 / 1.15), int8 0.0016 / 0.0062 / 0.024 (0.003 / 0.009 / 0.018).

    With a base-adjusting init (PiSSA/OLoRA, ``init_adjusted``) pass the residual params the adapters were made
    over: ``merge(residual, trained)`` is the original weights plus the trained update (``W - s·A0·B0 + s·A·B``),
    as PEFT's merge of such an adapter; over the original params it would count the initial ``s·A0·B0`` twice.

    Raises:
      NotMergeableError: a method that cannot be merged, a model input (prompt/prefix), or a non-floating (e.g.
        int8) weight (the message names the path and why).
      ValueError: an adapter with no parameter or that does not fit it; outside ``jit``, a fold that overflows the
        weight's dtype (float16 beyond 65504; a quantised weight's logical dtype), naming the path, the dtype and
        the largest merged value; ``dequantize`` that is not a floating dtype.

    Example:
      >>> import jax, jax.numpy as jnp, jaxpeft
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["dense"])
      >>> adapters = jaxpeft.init(cfg, params, key=jax.random.key(0))
      >>> trained = jax.tree.map(lambda x: jnp.full_like(x, 0.5), adapters)  # A = B = 0.5, as if trained
      >>> merged = jaxpeft.merge(params, trained)  # W + scale·A·B = 1 + 2·(0.5·0.5 + 0.5·0.5)
      >>> merged["dense"]["kernel"][0].tolist()
      [2.0, 2.0, 2.0]
      >>> params["dense"]["kernel"][0].tolist()  # the input is not modified
      [1.0, 1.0, 1.0]
    """
    if dequantize is not None:
        try:
            floating = jnp.issubdtype(jnp.dtype(dequantize), jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(
                f"`dequantize`={dequantize!r}; expected a float dtype to merge quantised weights into, e.g. "
                "jnp.bfloat16 or jnp.float32 (None requantises them)."
            )
        params = quant.dequantize(params, dequantize)
    return _fold(params, adapters, 1)


def unmerge(params: Any, adapters: Any) -> Any:
    """The inverse of ``merge`` up to float rounding: each adapter taken back out of its weight.

    A quantised weight is requantised again, so ``unmerge(merge(p))`` is within two roundings of ``p``, not ``p``
    (see ``merge`` for the bound and the measured drift of repeated cycles); keep the params you merged into.

    Raises:
      NotMergeableError: a method whose merge cannot be undone from the merged weights (e.g. DoRA: keep the
        params you merged into instead, ``merge`` never changes them); as ``merge``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxpeft
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["dense"])
      >>> trained = jax.tree.map(lambda x: jnp.full_like(x, 0.5), jaxpeft.init(cfg, params, key=jax.random.key(0)))
      >>> merged = jaxpeft.merge(params, trained)
      >>> restored = jaxpeft.unmerge(merged, trained)
      >>> restored["dense"]["kernel"][0].tolist()
      [1.0, 1.0, 1.0]
    """
    return _fold(params, adapters, -1)
