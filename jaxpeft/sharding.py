"""Shard adapters like their base weights: per-array specs derived from each adapter node's weight axes.

An adapter array runs along some axes of its base weight (LoRA's A along the stack and fan-in axes, B along the
stack and fan-out axes, DoRA's magnitude and IA3's vectors along the axis they scale) and has axes of its own (the
rank). ``adapter_specs`` gives each array the base weight's mesh axes on the axes it shares with it and replicates
its own axes; an axis whose size the mesh axes do not divide falls back to replicated. Methods say which axes they
share through ``Adapter.weight_axes()``; a method that does not say is replicated.

Base specs come from wherever the user already has them: the params' own ``NamedSharding``s, a tree of
``PartitionSpec``s, or Flax logical-axis annotations turned into mesh specs with the user's rules
(``nn.logical_to_mesh(nn.get_partition_spec(variables), rules)["params"]``, or ``nnx.get_partition_spec``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, map_with_paths, path_str
from jaxpeft._select import Layout
from jaxpeft.api import init as method_init
from jaxpeft.protocol import Adapter, MethodConfig, adapter_items

__all__ = ["adapter_shardings", "adapter_specs", "describe", "init", "init_optimizer", "optimizer_shardings"]


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding)) or quant.is_quantized(x)


def _spec_of(path: str, x: Any) -> PartitionSpec:
    if quant.is_quantized(x):
        raise ValueError(
            f"the base weight {path!r} is quantised: its codes are laid out per block, not like the weight. Pass "
            "the PartitionSpecs (or NamedShardings) of the float weights instead."
        )
    if x is None:
        return PartitionSpec()
    if isinstance(x, PartitionSpec):
        return x
    if isinstance(x, NamedSharding):
        return x.spec
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding.spec
    if sharding is not None and len(sharding.device_set) == 1:
        return PartitionSpec()
    raise ValueError(
        f"the base weight {path!r} has no PartitionSpec or NamedSharding (got {type(x).__name__}); pass a tree of "
        "PartitionSpec, NamedSharding or arrays placed with a NamedSharding."
    )


def _mesh_of(tree: Any) -> Mesh | None:
    for leaf in jax.tree.leaves(tree, is_leaf=_is_spec_leaf):
        sharding = leaf if isinstance(leaf, NamedSharding) else getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh  # type: ignore[return-value]
    return None


def _divides(size: int, entry: Any, mesh: Any) -> bool:
    names = entry if isinstance(entry, tuple) else (entry,)
    return size % math.prod(mesh.shape[n] for n in names) == 0


def _node_specs(path: str, node: Adapter, base: PartitionSpec, ndim: int, mesh: Any) -> Adapter:
    full = (*tuple(base), *([None] * (ndim - len(base))))
    axes = node.weight_axes()
    flat, treedef = jax.tree_util.tree_flatten_with_path(node)
    specs = []
    for kp, leaf in flat:
        field = path_str(kp)
        along = axes.get(field) if axes is not None else None
        if along is None:
            along = (None,) * leaf.ndim
        if len(along) != leaf.ndim:
            raise ValueError(
                f"adapter {path!r} ({type(node).__name__}).weight_axes() gives {len(along)} axes for `{field}`, "
                f"which has {leaf.ndim}."
            )
        entries = [full[i] if i is not None else None for i in along]
        if mesh is not None:
            entries = [e if e is None or _divides(leaf.shape[d], e, mesh) else None for d, e in enumerate(entries)]
        specs.append(PartitionSpec(*entries))
    out: Adapter = jax.tree_util.tree_unflatten(treedef, specs)
    return out


def adapter_specs(adapters: Any, params: Any, *, mesh: Mesh | None = None) -> Any:
    """A tree like ``adapters`` with a ``PartitionSpec`` per adapter array, derived from its base weight's.

    Args:
      adapters: the adapter tree (arrays or ``jax.ShapeDtypeStruct``).
      params: the base params' shardings: a params-shaped tree of ``PartitionSpec``/``NamedSharding``/``None``
        (replicated), or the params themselves placed with ``NamedSharding``s.
      mesh: the mesh, for the divisibility fallback (an axis the mesh axes do not divide is replicated); taken
        from ``params`` when they hold ``NamedSharding``s.

    Raises:
      ValueError: an adapter path has no base weight in ``params``, or a spec cannot be read.
    """
    mesh = mesh if mesh is not None else _mesh_of(params)
    base = dict(leaves_with_paths(params, is_leaf=_is_spec_leaf))
    out: dict[str, Any] = {}
    for path, node in adapter_items(adapters):
        if path not in base:
            raise ValueError(f"adapter {path!r} has no base weight in `params`; pass the params' own shardings.")
        ndim = node.layout.ndim
        spec = _spec_of(path, base[path])
        if len(spec) > ndim:
            raise ValueError(f"the base weight {path!r} has spec {spec} with more entries than its {ndim} axes.")
        out[path] = _node_specs(path, node, spec, ndim, mesh)
    return _nest(adapters, out)


def _nest(adapters: Any, table: Mapping[str, Any]) -> Any:
    """``table`` (path -> node of specs) in the structure of ``adapters``."""
    paths = [p for p, _ in adapter_items(adapters)]
    treedef = jax.tree_util.tree_structure(adapters, is_leaf=lambda x: isinstance(x, Adapter))
    return jax.tree_util.tree_unflatten(treedef, [table[p] for p in paths])


def adapter_shardings(adapters: Any, params: Any, *, mesh: Mesh | None = None) -> Any:
    """``adapter_specs`` as ``NamedSharding``s on ``mesh`` (by default the mesh of ``params``' shardings)."""
    mesh = mesh if mesh is not None else _mesh_of(params)
    if mesh is None:
        raise ValueError("no mesh: pass `mesh=` or params placed with NamedShardings.")
    specs = adapter_specs(adapters, params, mesh=mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def init(
    cfg: MethodConfig,
    params: Any,
    *,
    key: jax.Array,
    layouts: Mapping[str, Layout] | None = None,
    shardings: Any = None,
    mesh: Mesh | None = None,
) -> Any:
    """``jaxpeft.init`` whose adapters are created already sharded (``jit`` with ``out_shardings``, no host copy).

    Args:
      cfg, params, key, layouts: as for ``jaxpeft.init``; ``params`` are typically already sharded arrays.
      shardings: the base shardings when ``params`` do not carry them (a tree of ``PartitionSpec`` with ``mesh``,
        or of ``NamedSharding``).
      mesh: the mesh (default: the one of ``params``/``shardings``).
    """

    def make(p: Any, k: jax.Array) -> Any:
        return method_init(cfg, p, key=k, layouts=layouts)

    abstract = jax.eval_shape(make, params, key)
    out = adapter_shardings(abstract, shardings if shardings is not None else params, mesh=mesh)
    return jax.jit(make, out_shardings=out)(params, key)


def describe(adapters: Any) -> str:
    """A table of every adapter array: path, shape and its sharding spec (or the device it lives on)."""
    rows = [("path", "shape", "spec")]
    for path, node in adapter_items(adapters):
        for field, leaf in leaves_with_paths(node):
            sharding = getattr(leaf, "sharding", None)
            spec = str(sharding.spec) if isinstance(sharding, NamedSharding) else str(sharding)
            rows.append((f"{path}/{field}", str(tuple(leaf.shape)), spec))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def optimizer_shardings(opt_state: Any, trainable_shardings: Any) -> Any:
    """Shardings for an optimizer state (arrays or ``jax.eval_shape``) that follow the trainable arrays'.

    Each state leaf whose path ends with a trainable leaf's path and has its shape (Adam's ``mu``/``nu``, ...)
    takes that leaf's sharding; everything else (step counts, scalars) is replicated on the same mesh.
    """
    flat = leaves_with_paths(trainable_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if not flat:
        raise ValueError("`trainable_shardings` holds no NamedSharding.")
    mesh = flat[0][1].mesh
    table = sorted(flat, key=lambda item: -len(item[0]))

    def pick(path: str, leaf: Any) -> NamedSharding:
        for trainable_path, sharding in table:
            suffix = path == trainable_path or path.endswith("/" + trainable_path)
            if suffix and len(sharding.spec) <= len(getattr(leaf, "shape", ())):
                return sharding
        return NamedSharding(mesh, PartitionSpec())

    return map_with_paths(pick, opt_state)


def init_optimizer(tx: Any, trainable: Any, trainable_shardings: Any) -> Any:
    """``tx.init(trainable)`` created sharded like ``trainable`` (see ``optimizer_shardings``)."""
    out = optimizer_shardings(jax.eval_shape(tx.init, trainable), trainable_shardings)
    return jax.jit(tx.init, out_shardings=out)(trainable)
