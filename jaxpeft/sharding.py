"""Shard adapters like their base weights: per-array specs derived from each adapter node's weight axes.

An adapter array runs along some axes of its base weight (LoRA's A along the stack and fan-in axes, B along the
stack and fan-out axes, DoRA's magnitude and IA3's vectors along the axis they scale) and has axes of its own (the
rank). ``adapter_specs`` gives each array the base weight's mesh axes on the axes it shares with it and replicates
its own axes; an axis whose size the mesh axes do not divide falls back to replicated. Methods say which axes they
share through ``Adapter.weight_axes()``; a method that does not say is replicated.

Base specs come from wherever the user already has them: the params' own ``NamedSharding`` objects, a tree of
``PartitionSpec`` objects, or Flax logical-axis annotations turned into mesh specs with the user's rules
(``nn.logical_to_mesh(nn.get_partition_spec(variables), rules)["params"]``, or ``nnx.get_partition_spec``). A model
without any gets them from its layouts: ``base_specs`` derives FSDP × tensor-parallel specs for every weight
(column- or row-parallel kernels, embeddings, small leaves replicated), and ``describe_base_specs`` prints why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, map_with_paths, path_str
from jaxpeft._select import VECTOR_KINDS, Layout, LayoutEntry, TargetSpec, default_layout, matcher
from jaxpeft.analysis import _human as _human_bytes
from jaxpeft.api import init as method_init
from jaxpeft.protocol import Adapter, MethodConfig, adapter_items

__all__ = [
    "MIN_SIZE",
    "ROW_PARALLEL",
    "adapter_shardings",
    "adapter_specs",
    "base_specs",
    "describe",
    "describe_base_specs",
    "host_batch",
    "host_rows",
    "init",
    "init_optimizer",
    "optimizer_shardings",
]


def host_rows(sharding: NamedSharding, global_rows: int, axis: int = 0) -> slice:
    """The rows (entries along ``axis``) of a global batch of ``global_rows`` that this process feeds.

    In a multi-process job each process reads only these rows of every global batch (all of them on one host)
    and passes them to :func:`host_batch`. ``sharding`` is the batch's, e.g. ``NamedSharding(mesh, P("data"))``;
    ``axis`` is the batch axis of the arrays it places.
    """
    shape = tuple(global_rows if i == axis else 1 for i in range(axis + 1))
    index = [idx[axis] for idx in sharding.addressable_devices_indices_map(shape).values() if idx is not None]
    if not index:  # a sharding with no index map: every row
        return slice(0, global_rows)
    starts = [i.start or 0 for i in index]
    stops = [global_rows if i.stop is None else i.stop for i in index]
    return slice(min(starts), max(stops))


def host_batch(local: Any, sharding: NamedSharding, global_rows: int, axis: int = 0) -> Any:
    """Global ``jax.Array`` objects of ``global_rows`` rows from this process's rows (a pytree of host arrays).

    Each leaf holds the rows :func:`host_rows` gives this process, along ``axis``; the result is placed with
    ``sharding`` (``jax.make_array_from_process_local_data``) and is the same global batch on every process. On one
    host it is ``jax.device_put(local, sharding)``.

    Raises:
      ValueError: a leaf whose row count is not this process's share (names the leaf, both counts and the fix).
    """
    rows = host_rows(sharding, global_rows, axis)
    want = rows.stop - rows.start

    def place(path: str, x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim <= axis or x.shape[axis] != want:
            got = x.shape[axis] if x.ndim > axis else f"no axis {axis}"
            raise ValueError(
                f"batch leaf {path!r} has {got} rows on axis {axis}; this process feeds rows {rows.start}:{rows.stop} "
                f"({want}) of the global {global_rows}. Read exactly those rows: "
                "jaxpeft.sharding.host_rows(sharding, global_rows)."
            )
        shape = (*x.shape[:axis], global_rows, *x.shape[axis + 1 :])
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return map_with_paths(place, local)


def _is_spec_leaf(x: Any) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding)) or quant.is_quantized(x)


def _spec_of(path: str, x: Any) -> PartitionSpec:
    if quant.is_quantized(x):  # its codes keep the weight's axes: their spec is the weight's
        return _spec_of(path, x.codes)
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
        (replicated), or the params themselves placed with ``NamedSharding`` objects.
      mesh: the mesh, for the divisibility fallback (an axis the mesh axes do not divide is replicated); taken
        from ``params`` when they hold ``NamedSharding`` objects.

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
    """``adapter_specs`` as ``NamedSharding`` objects on ``mesh`` (by default the mesh of ``params``' shardings)."""
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


# ------------------------------------------------------------------------------------------------ base specs

#: The kernels ``base_specs`` makes row-parallel unless told otherwise (a regex over paths): the projections that
#: bring a tensor-parallel activation back to the model width. Llama/Mistral/Qwen ``o_proj``/``down_proj``,
#: BART/CLIP/OPT ``out_proj``/``fc2``, T5 ``o``/``wo``, GPT-2 ``c_proj``, GPT-NeoX ``dense_4h_to_h``, Gemma
#: ``attn_vec_einsum``, BERT ``attention/output/dense`` and ``output/dense``, Flax ``MultiHeadAttention``'s ``out``.
ROW_PARALLEL = r"(^|/)(o_proj|out_proj|down_proj|o|out|wo|c_proj|fc2|dense_4h_to_h|attn_vec_einsum|output/dense)/[^/]+$"
#: Entries below which ``base_specs`` replicates a leaf it has no layout for (2**20: 4 MiB of float32).
MIN_SIZE = 2**20

#: A mesh axis name, several (sharded over their product), or None for none.
MeshAxes = str | Sequence[str] | None
#: The leaf names that get a default layout when ``layouts`` does not mention them (2-D only, see ``default_layout``).
_DEFAULT_LAYOUT_NAMES = ("kernel", "embedding")


@dataclasses.dataclass(frozen=True)
class _BaseRow:
    """One leaf of ``base_specs``: its spec (for a quantised weight, a ``QuantizedArray`` of them) and why."""

    path: str
    shape: tuple[int, ...]
    spec: Any
    rule: str  # column, row, embed, fsdp or replicated
    why: str  # the rule and its notes, as the plan prints them
    nbytes: int
    shards: float  # how many pieces the spec cuts the leaf into (a quantised weight: its bytes over one device's)


def _mesh_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    shape = mesh if isinstance(mesh, Mapping) else getattr(mesh, "shape", None)
    if not isinstance(shape, Mapping):
        raise ValueError(f"`mesh`={mesh!r} is not a Mesh or a mapping of axis sizes like {{'fsdp': 2, 'tp': 4}}.")
    return {str(k): int(v) for k, v in shape.items()}


def _mesh_axes(axes: MeshAxes, what: str, sizes: Mapping[str, int]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(present, absent)``: the named mesh axes that ``sizes`` has, and those it has not (they are skipped)."""
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"`{what}`={axes!r}: expected a mesh axis name, several, or None; got {name!r}.")
    return tuple(n for n in names if n in sizes), tuple(n for n in names if n not in sizes)


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _place(
    entries: list[Any], shape: tuple[int, ...], group: Sequence[int], axes: tuple[str, ...], sizes: Mapping[str, int]
) -> int | None:
    """Puts ``axes`` on the first weight axis of ``group`` whose size they divide; that axis, or None."""
    n = math.prod(sizes[a] for a in axes)
    for i in group:
        if shape[i] % n == 0:
            entries[i] = _entry(axes)
            return i
    return None


def _not_divided(axes: tuple[str, ...], sizes: Mapping[str, int], label: str, dims: Sequence[int]) -> str:
    n = math.prod(sizes[a] for a in axes)
    what = str(dims[0]) if len(dims) == 1 else str(tuple(dims))
    return f"{'×'.join(axes)}={n} does not divide {label} {what}"


def _layout_spec(
    shape: tuple[int, ...],
    layout: Layout,
    row: bool,
    fsdp: tuple[str, ...],
    tp: tuple[str, ...],
    sizes: Mapping[str, int],
) -> tuple[PartitionSpec, str, list[str]]:
    """A weight with a layout: stack axes whole, fan-in/fan-out on ``fsdp``/``tp`` (column) or the other way."""
    _, fan_in, fan_out = layout.axes()
    if layout.kind == "conv":
        fan_in = fan_in[-1:]  # the window axes stay whole: only the input features are sharded
    if layout.kind == "embed":
        rule, groups = "embed", ((fan_in, tp, "vocab"), (fan_out, fsdp, "features"))
    elif row:
        rule, groups = "row", ((fan_in, tp, "fan-in"), (fan_out, fsdp, "fan-out"))
    else:
        rule, groups = "column", ((fan_in, fsdp, "fan-in"), (fan_out, tp, "fan-out"))
    entries: list[Any] = [None] * len(shape)
    notes = [
        _not_divided(axes, sizes, label, [shape[i] for i in group])
        for group, axes, label in groups
        if axes and _place(entries, shape, group, axes, sizes) is None
    ]
    return PartitionSpec(*entries), rule, notes


def _loose_spec(
    shape: tuple[int, ...], fsdp: tuple[str, ...], sizes: Mapping[str, int], min_size: int
) -> tuple[PartitionSpec, str, list[str]]:
    """A leaf without a layout: replicated under ``min_size`` entries, else ``fsdp`` on its largest axis."""
    if math.prod(shape) < min_size or not shape:
        return PartitionSpec(), "replicated", ["no layout, under min_size"]
    if not fsdp:
        return PartitionSpec(), "replicated", ["no layout, no fsdp axis"]
    entries: list[Any] = [None] * len(shape)
    largest_first = sorted(range(len(shape)), key=lambda i: -shape[i])
    if _place(entries, shape, largest_first, fsdp, sizes) is None:
        return PartitionSpec(), "replicated", ["no layout, " + _not_divided(fsdp, sizes, "any axis of", shape)]
    return PartitionSpec(*entries), "fsdp", ["no layout, largest axis it divides"]


def _shards(spec: PartitionSpec, sizes: Mapping[str, int]) -> int:
    names = [a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))]
    return math.prod(sizes[a] for a in names)


def _quantized_spec(
    leaf: quant.QuantizedArray, spec: PartitionSpec, sizes: Mapping[str, int]
) -> tuple[quant.QuantizedArray, str, float]:
    """``(specs of its arrays, the plan's note, bytes over bytes per device)`` of a quantised weight spec'd ``spec``."""
    arrays = leaf.array_specs(spec, sizes)
    specs = jax.tree.leaves(arrays, is_leaf=lambda x: isinstance(x, PartitionSpec))
    pairs = zip(jax.tree.leaves(leaf), specs, strict=True)
    per_device = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize / _shards(s, sizes) for x, s in pairs)
    note = f"quantised {leaf.kind}, codes {arrays.codes}"
    if leaf.kind == "nf4":
        note += f" (blocks of {leaf.block_size} along axis {len(leaf.stack_shape) + leaf.fan_in - 1})"
        note += f", group scales {arrays.group_scales}"
    return arrays, note, leaf.nbytes / per_device if per_device else 1.0


def _nbytes(leaf: Any, shape: tuple[int, ...]) -> int:
    if quant.is_quantized(leaf):
        return int(leaf.nbytes)
    dtype = getattr(leaf, "dtype", None)
    return math.prod(shape) * jnp.dtype(dtype if dtype is not None else np.asarray(leaf).dtype).itemsize


def _base_rows(
    params: Any,
    layouts: Mapping[str, LayoutEntry] | None,
    mesh: Mesh | Mapping[str, int],
    fsdp: MeshAxes,
    tp: MeshAxes,
    row_parallel: TargetSpec | None,
    min_size: int,
) -> tuple[list[_BaseRow], Any, dict[str, int], list[str]]:
    """``(rows, treedef of params, mesh axis sizes, skipped axes as "fsdp='x'")``: the work of ``base_specs``."""
    sizes = _mesh_sizes(mesh)
    fsdp_axes, fsdp_absent = _mesh_axes(fsdp, "fsdp", sizes)
    tp_axes, tp_absent = _mesh_axes(tp, "tp", sizes)
    shared = sorted(set(fsdp_axes) & set(tp_axes))
    if shared:
        raise ValueError(
            f"`fsdp`={fsdp!r} and `tp`={tp!r} share the mesh axis {shared[0]!r}; a mesh axis can shard only one axis "
            "of a weight. Give them different mesh axes."
        )
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"`min_size`={min_size!r} is not an int >= 0 (entries; 0 shards every leaf it can).")
    is_row = matcher(ROW_PARALLEL if row_parallel is None else row_parallel, "row_parallel")
    table = dict(layouts or {})
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_quantized)
    paths = [path_str(kp) for kp, _ in flat]
    if table and paths and not table.keys() & set(paths):
        raise ValueError(
            f"`layouts` names no leaf of `params`: params paths look like {paths[0]!r}, layout paths like "
            f"{next(iter(table))!r}. Pass the params the layouts were inferred for (a Linen model's "
            "variables['params'], not the whole variables dict)."
        )
    rows = []
    for path, (_, leaf) in zip(paths, flat, strict=True):
        shape = tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)))
        entry = table.get(path)
        layout = entry if isinstance(entry, Layout) and entry.kind not in VECTOR_KINDS else None
        if entry is None and path.rsplit("/", 1)[-1] in _DEFAULT_LAYOUT_NAMES:
            layout = default_layout(path, shape)
        if layout is not None and layout.ndim != len(shape):
            raise ValueError(
                f"{path!r} has shape {shape} but its layout {layout} describes {layout.ndim} axes; re-infer the "
                "layouts from the same model."
            )
        if layout is not None:
            spec, rule, notes = _layout_spec(shape, layout, is_row(path, leaf, entry), fsdp_axes, tp_axes, sizes)
        else:
            spec, rule, notes = _loose_spec(shape, fsdp_axes, sizes, min_size)
        stored: Any = spec
        shards: float = _shards(spec, sizes)
        if quant.is_quantized(leaf):  # a spec per code and scale array, along the weight's axes
            stored, note, shards = _quantized_spec(leaf, spec, sizes)
            notes = [*notes, note]
        why = rule + (": " + "; ".join(notes) if notes else "")
        rows.append(_BaseRow(path, shape, stored, rule, why, _nbytes(leaf, shape), shards))
    skipped = [f"{what}={name!r}" for what, names in (("fsdp", fsdp_absent), ("tp", tp_absent)) for name in names]
    return rows, treedef, sizes, skipped


def base_specs(
    params: Any,
    layouts: Mapping[str, LayoutEntry] | None = None,
    *,
    mesh: Mesh | Mapping[str, int],
    fsdp: MeshAxes = "fsdp",
    tp: MeshAxes = "tp",
    row_parallel: TargetSpec | None = None,
    min_size: int = MIN_SIZE,
) -> Any:
    """FSDP × tensor-parallel ``PartitionSpec`` objects for a base model's params, derived from each weight's layout.

    No per-model table: the layouts jaxpeft already learns (``jaxpeft.linen.infer_layouts(model, x)``,
    ``jaxpeft.nnx.infer_layouts(model)``, ``jaxpeft.layouts_of(adapters)`` or a hand-written ``{path: Layout}``) say
    which axes of every kernel are stacked layers, fan-in and fan-out, and the rules below turn that into specs:

    - column-parallel kernels (q/k/v, gate/up, every kernel ``row_parallel`` does not match): fan-in on ``fsdp``,
      fan-out on ``tp``;
    - row-parallel kernels (``row_parallel``; by default the o/out/down projections of ``ROW_PARALLEL``): fan-in
      on ``tp``, fan-out on ``fsdp``, so the tensor-parallel output of a column-parallel layer feeds them as is;
    - embeddings ``(vocab, features)``: vocab on ``tp``, features on ``fsdp`` (as Megatron and MaxText do);
    - stack axes (``nn.scan``/``nnx.vmap`` layers, einsum batch axes) stay whole; where fan-in or fan-out is
      several axes (``DenseGeneral`` heads), the mesh axes go on the first one they divide; a conv kernel shards
      only its input features, never its window;
    - leaves without a layout (biases, norm scales, a ``self.param`` of a custom module, a layout
      ``jaxpeft.Unsupported``): replicated below ``min_size`` entries, else ``fsdp`` on their largest axis it
      divides (stack axes cannot be told apart there: pass a layout to do better). A 2-D ``kernel``/``embedding``
      that ``layouts`` does not mention gets the default ``(in, out)``/``(vocab, features)`` layout;
    - quantised weights (``jaxpeft.QuantizedArray``): the float weight's spec by the rules above, turned into a
      spec per code and scale array by ``QuantizedArray.array_specs`` (they keep the weight's axes; an NF4 block
      axis stays whole unless whole blocks fall on every shard). The result goes to ``adapter_specs`` as is: the
      codes' spec is the weight's.

    An axis that its mesh axes do not divide is replicated, and named mesh axes that ``mesh`` lacks are skipped,
    so one call serves one device, data parallel only, FSDP only and FSDP × TP. Every spec is valid for its leaf on
    ``mesh`` (each mesh axis at most once, dividing the axis it shards); only shapes are read, so ``params`` may be
    ``jax.ShapeDtypeStruct`` objects or host arrays. ``describe_base_specs`` (same arguments) prints the plan with why.

    Args:
      params: the base params: a Linen ``variables["params"]``, ``jaxpeft.nnx.base_params(model)`` (to shard an
        ``nnx.State``, put the specs in it with ``nnx.replace_by_pure_dict``), or any pytree of arrays.
      layouts: ``{path: Layout | Unsupported}`` for the leaves of ``params``; None: only the defaults above.
      mesh: the ``Mesh``, or only its axis sizes (``{"fsdp": 4, "tp": 2}``) to plan for a mesh you do not have.
      fsdp: the mesh axis that shards weights FSDP-style, several (sharded over their product), or None.
      tp: the tensor-parallel mesh axis, several, or None.
      row_parallel: which kernels are row-parallel, in the forms of ``targets``: a regex over paths (``re.search``),
        module names (``["o_proj", "down_proj"]``) or ``fn(path, leaf) -> bool``; None: ``ROW_PARALLEL``; ``()``:
        none. It applies to dense, einsum and conv kernels, not to embeddings.
      min_size: entries from which a leaf without a layout is sharded (``MIN_SIZE``: 2**20, 4 MiB of float32).

    Returns:
      A tree like ``params`` with a ``PartitionSpec`` per array (a quantised weight: a ``QuantizedArray`` of
      them), ready for ``jax.tree.map(lambda s: NamedSharding(mesh, s), specs)`` and ``adapter_specs``.

    Raises:
      ValueError: ``fsdp`` and ``tp`` share a mesh axis; ``layouts`` names no leaf of ``params`` (e.g. the whole
        Linen variables dict was passed); a layout does not fit its leaf's rank; a bad ``min_size``/``row_parallel``.
    """
    rows, treedef, _, _ = _base_rows(params, layouts, mesh, fsdp, tp, row_parallel, min_size)
    return jax.tree_util.tree_unflatten(treedef, [r.spec for r in rows])


def describe_base_specs(
    params: Any,
    layouts: Mapping[str, LayoutEntry] | None = None,
    *,
    mesh: Mesh | Mapping[str, int],
    fsdp: MeshAxes = "fsdp",
    tp: MeshAxes = "tp",
    row_parallel: TargetSpec | None = None,
    min_size: int = MIN_SIZE,
) -> str:
    """The plan of ``base_specs`` (same arguments) as a table: path, shape, spec and the rule that chose it.

    The rule is ``column``, ``row``, ``embed``, ``fsdp`` (no layout, large) or ``replicated``, followed by what
    changed it (an axis its mesh axes do not divide, a leaf under ``min_size``, a quantised weight). The last line
    counts the rules and gives the bytes each device holds against the whole model's; a named mesh axis that the
    mesh lacks is listed as skipped.
    """
    rows, _, sizes, skipped = _base_rows(params, layouts, mesh, fsdp, tp, row_parallel, min_size)
    table = [("path", "shape", "spec", "rule")]
    table += [(r.path, str(r.shape), str(r.spec.codes if quant.is_quantized(r.spec) else r.spec), r.why) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]
    counts = {rule: sum(r.rule == rule for r in rows) for rule in ("column", "row", "embed", "fsdp", "replicated")}
    total = sum(r.nbytes for r in rows)
    per_device = sum(r.nbytes / r.shards for r in rows)
    mesh_text = " × ".join(f"{k}={v}" for k, v in sizes.items()) or "no axes"
    share = f" ({100 * per_device / total:.0f}%)" if total else ""
    lines.append(
        f"{len(rows)} leaves on mesh {mesh_text}: "
        + ", ".join(f"{n} {rule}" for rule, n in counts.items() if n)
        + f"; {_human_bytes(per_device)} of {_human_bytes(total)} per device{share}"
    )
    if skipped:
        lines.append(f"not in the mesh, skipped: {', '.join(skipped)}")
    return "\n".join(lines)
