"""Adapter-only training checkpoints with orbax, for any method: adapters, trained extras, optimizer state, config.

This is the only jaxpeft module that imports orbax. A checkpoint step holds up to four orbax items:

- ``adapters``: each adapter node's arrays as plain nested dicts keyed by field,
  ``{..., "q_proj": {"kernel": {"a": A, "b": B}}}`` for LoRA, ``{"vector": l}`` for IA3
  (``StandardSave``: tensorstore/OCDBT arrays, framework-neutral, no pickle);
- ``extra``: any other trained tree saved beside the adapters (a classifier head, the norms: HF's
  ``modules_to_save``), as nested dicts keyed by path entries;
- ``opt_state``: the optimizer state's array leaves, likewise;
- ``meta``: JSON with the step, the method config (``cfg.to_dict()``), each adapter's type, array shapes and
  layout, the shapes of ``extra`` and ``opt_state``, and a fingerprint of the base params (path -> shape, dtype).

The base weights never enter a checkpoint. Restore reads against abstract targets: ``jax.eval_shape`` of the
method's own ``init`` on the current config and params (so the restored nodes carry the current static parts:
scale, dropout, layout) with the current shardings, so a checkpoint written on one mesh restores on another.
Every check (config, base fingerprint, adapter table, ``*_like`` trees, on-disk array metadata) runs before any
array is read on restore, and before anything is written on save; a difference is a ``ValueError`` that names
the differing fields or paths and says what to do.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxpeft._paths import leaves_with_paths, map_with_paths, set_path
from jaxpeft._select import Layout
from jaxpeft.methods.base import MethodConfig, adapter_items, config_from_dict, layouts_of
from jaxpeft.methods.base import init as method_init

__all__ = [
    "AdapterCheckpointer",
    "Restored",
    "fingerprint",
    "read_config",
    "restore_adapters",
    "save_adapters",
]

FORMAT = "jaxpeft.adapter_checkpoint"
VERSION = 2
_ADAPTERS, _EXTRA, _OPT, _META = "adapters", "extra", "opt_state", "meta"
#: How to restore an optional item that a step holds (for the error when neither a target nor ``skip`` is given).
_HOW = {
    _OPT: "opt_state_like=jax.eval_shape(tx.init, trainable) (the same optimizer over the same trees, e.g. "
    "`adapters` or `(adapters, extra)`)",
    _EXTRA: "extra_like=<the tree you saved as `extra`, or its jax.eval_shape>",
}
_MAX_LISTED = 8

ShardingSpec = jax.sharding.Sharding | Callable[[str, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a restore returns.

    Attributes:
      step: the restored step.
      adapters: the adapter tree (nodes with the current config's static parts: scale, dropout, layout).
      opt_state: the optimizer state in the structure of ``opt_state_like``; None when the step holds none or
        it was skipped.
      config: the config the checkpoint was saved with (same method class as the current one; fields in
        ``restore_free``, such as LoRA's dropout, may differ from the current config's).
      extra: the extra trained tree in the structure of ``extra_like``; None when the step holds none or it was
        skipped.
    """

    step: int
    adapters: dict[str, Any]
    opt_state: Any
    config: MethodConfig
    extra: Any = None


# ------------------------------------------------------------------------------------------------ tables


def _absolute(directory: str | os.PathLike[str]) -> str:
    text = os.fspath(directory)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def _shape_dtype(leaf: Any) -> list[Any]:
    """``[shape, dtype name]`` of an array or ``ShapeDtypeStruct`` (JSON-ready, compares equal to its JSON)."""
    return [[int(d) for d in leaf.shape], jnp.dtype(leaf.dtype).name]


def _shape_table(flat: Mapping[str, Any]) -> dict[str, list[Any]]:
    return {path: _shape_dtype(leaf) for path, leaf in sorted(flat.items())}


def fingerprint(params: Any) -> dict[str, Any]:
    """The base-model fingerprint stored in every checkpoint: ``{"digest": sha256, "params": {path: [shape, dtype]}}``.

    Only paths, shapes and dtypes enter it, never values; ``params`` may be abstract (``jax.ShapeDtypeStruct``).
    """
    table = _shape_table(dict(leaves_with_paths(params)))
    digest = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "params": table}


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        tree = set_path(tree, path, value)
    return tree


def _node_table(adapters: Any) -> dict[str, dict[str, Any]]:
    """``{path: {"type", "arrays": {field: [shape, dtype]}, "layout"}}`` of an (abstract or concrete) adapter tree."""
    table = {}
    for path, node in sorted(adapter_items(adapters)):
        lay = node.layout
        table[path] = {
            "type": type(node).__name__,
            "arrays": _shape_table(dict(leaves_with_paths(node))),
            "layout": {"stack": lay.stack, "fan_in": lay.fan_in, "fan_out": lay.fan_out, "kind": lay.kind},
        }
    return table


def _array_leaves(tree: Any, what: str, *, abstract: bool = False) -> dict[str, Any]:
    """``{path: array}`` of a tree to save (or, with ``abstract``, to restore into: ``ShapeDtypeStruct`` leaves
    too); Python numbers become numpy scalars. Raises on any other leaf and on paths that collide."""
    leaves = leaves_with_paths(tree)
    flat: dict[str, Any] = {}
    for path, leaf in leaves:
        if isinstance(leaf, (int, float, bool, np.number)):
            leaf = np.asarray(leaf)
        concrete_only = isinstance(leaf, jax.ShapeDtypeStruct) and not abstract
        if concrete_only or not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise ValueError(f"`{what}` leaf {path!r} is a {type(leaf).__name__}; only arrays can be checkpointed.")
        flat[path] = leaf
    counts = collections.Counter(p for p, _ in leaves)
    clashes = sorted({p for p, n in counts.items() if n > 1} | {q for p in flat for q in _prefixes(p) if q in flat})
    if clashes:
        raise ValueError(
            f"`{what}` has leaves whose paths collide once their keys are joined with '/': {clashes[:_MAX_LISTED]}; "
            "use keys without '/'."
        )
    return flat


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


# ------------------------------------------------------------------------------------------------ messages


def _listed(lines: list[str]) -> str:
    shown = "; ".join(lines[:_MAX_LISTED])
    return shown + (f"; and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else "")


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], str):
        return f"{tuple(value[0])} {value[1]}"  # [shape, dtype]
    if isinstance(value, Mapping):  # a layout
        return "Layout(" + ", ".join(f"{k}={v!r}" for k, v in value.items()) + ")"
    return str(tuple(value)) if isinstance(value, list) else str(value)


def _aspects(entry: Any) -> Any:
    """A node-table entry as ``{label: value}`` (``" type"``, ``".a"``, ``" layout"``); other entries unchanged."""
    if not isinstance(entry, Mapping) or "arrays" not in entry:
        return entry
    return {" type": entry["type"], **{f".{k}": v for k, v in entry["arrays"].items()}, " layout": entry["layout"]}


def _diff_table(
    saved: Mapping[str, Any], current: Mapping[str, Any], what: str, left: str = "checkpoint", right: str = "now"
) -> list[str]:
    """Lines naming each path whose entry differs between two ``{path: entry}`` tables.

    Adapter-node entries are compared aspect by aspect, so a line names only what differs, e.g.
    ``'inp/kernel'.a: checkpoint (8, 2) float32, now (6, 2) float32`` or ``'inp/kernel' type: ...``.
    """
    lines = [f"{p!r} missing {right} ({what})" for p in sorted(set(saved) - set(current))]
    lines += [f"{p!r} not in {left} ({what})" for p in sorted(set(current) - set(saved))]
    for p in sorted(set(saved) & set(current)):
        old, new = _aspects(saved[p]), _aspects(current[p])
        if old == new:
            continue
        if not isinstance(old, Mapping) or not isinstance(new, Mapping):
            lines.append(f"{p!r}: {left} {_show(old)}, {right} {_show(new)}")
            continue
        labels = [*old, *(k for k in new if k not in old)]
        lines += [
            f"{p!r}{k}: {left} {_show(old.get(k))}, {right} {_show(new.get(k))}"
            for k in labels
            if old.get(k) != new.get(k)
        ]
    return lines


def _config_diff(cfg: MethodConfig, saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(current)) - set(cfg.restore_free))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


# ------------------------------------------------------------------------------------------------ restore targets


def _target(path: str, leaf: Any, like: Any, sharding: ShardingSpec) -> jax.ShapeDtypeStruct:
    """The sharded abstract target of one array: ``like``'s sharding, else ``sharding``, else the first device."""
    plain = jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)
    found = getattr(like, "sharding", None)
    if found is None:
        if sharding is None:
            found = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        elif isinstance(sharding, jax.sharding.Sharding):
            found = sharding
        else:
            found = sharding(path, plain)
    return jax.ShapeDtypeStruct(plain.shape, plain.dtype, sharding=found)


@dataclasses.dataclass(frozen=True)
class _Target:
    """How one item is restored: the sharded abstract array per path, and a tree of the structure to rebuild."""

    arrays: dict[str, jax.ShapeDtypeStruct]
    like: Any

    def rebuild(self, restored: Any, item: str, step: int) -> Any:
        """``like`` filled with the restored arrays; raises if any leaf would stay missing or abstract."""
        found = dict(leaves_with_paths(restored))
        missing = sorted(set(self.arrays) - set(found))
        abstract = sorted(p for p, x in found.items() if not isinstance(x, jax.Array))
        if missing or abstract:
            raise ValueError(
                f"restoring step {step} would leave {item} leaves unfilled: missing {missing[:_MAX_LISTED]}, "
                f"abstract {abstract[:_MAX_LISTED]}; the checkpoint is incomplete."
            )
        return map_with_paths(lambda path, _: found[path], self.like)


def _aux_target(item: str, like: Any, saved: Mapping[str, Any] | None, where: str, sharding: ShardingSpec) -> _Target:
    """The target of an optional item (``opt_state``, ``extra``) from its ``*_like`` tree, checked against ``saved``."""
    if saved is None:
        raise ValueError(f"{where} has no `{item}` (it was saved without one); pass {item}_like=None.")
    flat = _array_leaves(like, f"{item}_like", abstract=True)
    diff = _diff_table(saved, _shape_table(flat), f"{item} leaf", right=f"in `{item}_like`")
    if diff:
        raise ValueError(
            f"`{item}_like` does not match the `{item}` saved in {where}: {_listed(diff)}. Pass {_HOW[item]}."
        )
    return _Target({p: _target(p, x, x, sharding) for p, x in flat.items()}, like)


def _check_skip(skip: Sequence[str], likes: Mapping[str, Any]) -> None:
    if isinstance(skip, str):
        raise ValueError(f"`skip`={skip!r} is a string; pass a tuple of item names, e.g. skip=({skip!r},).")
    unknown = sorted(set(skip) - set(likes))
    if unknown:
        raise ValueError(f"`skip`={tuple(skip)!r}: unknown items {unknown}; expected 'opt_state' and/or 'extra'.")
    both = [item for item in skip if likes[item] is not None]
    if both:
        raise ValueError(f"`skip` names {both[0]!r} but `{both[0]}_like` is given too; pass one or the other.")


# ------------------------------------------------------------------------------------------------ orbax


def _open_manager(directory: str, *, read_only: bool, **options: Any) -> ocp.CheckpointManager:
    """One orbax manager with every item registered (a fresh process can restore without having saved)."""
    if read_only and "://" not in directory and not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory!r}.")
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in (_ADAPTERS, _EXTRA, _OPT):
        handler = ocp.StandardCheckpointHandler()
        registry.add(item, ocp.args.StandardSave, handler)
        registry.add(item, ocp.args.StandardRestore, handler)
    json_handler = ocp.JsonCheckpointHandler()
    registry.add(_META, ocp.args.JsonSave, json_handler)
    registry.add(_META, ocp.args.JsonRestore, json_handler)
    # read_only: never create the directory nor remove a running job's in-progress temporary directories.
    manager_options = ocp.CheckpointManagerOptions(
        cleanup_tmp_directories=not read_only, create=not read_only, **options
    )
    return ocp.CheckpointManager(directory, options=manager_options, handler_registry=registry)


def _resolve_step(manager: ocp.CheckpointManager, directory: str, step: int | None) -> int:
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory!r}.")
    elif int(step) not in manager.all_steps():
        raise FileNotFoundError(
            f"`step`={step!r} is not in {directory!r}; complete steps are {sorted(manager.all_steps())}."
        )
    return int(step)


def _read_meta(manager: ocp.CheckpointManager, directory: str, step: int) -> dict[str, Any]:
    meta = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"step {step} in {directory!r} is not a jaxpeft adapter checkpoint.")
    if meta.get("version") != VERSION:
        raise ValueError(
            f"step {step} in {directory!r} has format version {meta.get('version')!r}; this jaxpeft reads "
            f"version {VERSION}."
        )
    return meta


# ------------------------------------------------------------------------------------------------ checkpointer


class AdapterCheckpointer:
    """Adapter-only checkpoints in a directory, through one orbax ``CheckpointManager``; any method.

    Use it as a context manager (or call ``close``): it waits for pending async saves on exit. Saves are atomic
    (orbax writes into a temporary directory and renames it when complete), so a save interrupted mid-way leaves
    every earlier checkpoint loadable; leftovers are removed when the next checkpointer opens the directory.

    Example::

      with jaxpeft.checkpoint.AdapterCheckpointer("ckpt", cfg, params, max_to_keep=3) as ckpt:
          for step in range(steps):
              (adapters, head), opt_state = train_step((adapters, head), opt_state, batch)
              ckpt.save(step, adapters, opt_state, extra=head)     # async; skipped off the save interval
      restored = jaxpeft.checkpoint.restore_adapters(
          "ckpt", cfg, params, opt_state_like=opt_state, extra_like=head)

    Args:
      directory: checkpoint root (resolved to an absolute path; created on first save).
      cfg: the method config; saved as JSON and compared on restore.
      params: the base params (arrays or ``jax.ShapeDtypeStruct``): only their paths, shapes and dtypes are
        kept (fingerprinted, and used to plan the adapters); never saved.
      max_to_keep: keep the newest N steps (None keeps all).
      save_interval_steps: ``save`` writes only steps divisible by this (unless ``force=True``).
      async_save: write in a background thread; ``wait``/``close`` block until done.
      layouts: kernel layouts as for ``jaxpeft.init``; by default the layouts the adapter nodes carry on save
        and the saved ones on restore.
      read_only: only restore: the directory must exist, is never created or cleaned, and ``save`` raises.
        (A training job's temporary directories are left alone, so an evaluator can read beside it.)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        cfg: MethodConfig,
        params: Any,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        layouts: Mapping[str, Layout] | None = None,
        read_only: bool = False,
    ) -> None:
        if not isinstance(cfg, MethodConfig):
            raise TypeError(f"`cfg` is a {type(cfg).__name__}; expected a method config such as jaxpeft.LoraConfig.")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"`max_to_keep`={max_to_keep!r}; expected a positive number of steps, or None for all.")
        if save_interval_steps < 1:
            raise ValueError(f"`save_interval_steps`={save_interval_steps!r}; expected a positive integer.")
        self._directory = _absolute(directory)
        self._read_only = read_only
        self._cfg = cfg
        self._config = cfg.to_dict()
        self._params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype), params)
        self._fingerprint = fingerprint(self._params)
        self._layouts = dict(layouts) if layouts is not None else None
        self._plan_cache: tuple[dict[str, Layout], Any, dict[str, Any]] | None = None
        self._manager = _open_manager(
            self._directory,
            read_only=read_only,
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
        )

    @property
    def directory(self) -> str:
        """The absolute checkpoint root."""
        return self._directory

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step, ascending."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Block until pending async saves are on disk (raises their errors, if any)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self._manager.close()

    def _where(self, step: int) -> str:
        return f"checkpoint step {step} in {self._directory!r}"

    def _planned(self, layouts: Mapping[str, Layout]) -> tuple[Any, dict[str, Any]]:
        """The adapters the config makes on the params, abstractly (``jax.eval_shape`` of the method's init), and
        their node table; the last result is cached, so saving every step re-traces nothing."""
        if self._plan_cache is None or self._plan_cache[0] != layouts:

            def make(params: Any, key: jax.Array) -> Any:
                return method_init(self._cfg, params, key=key, layouts=layouts)

            expected = jax.eval_shape(make, self._params, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
            self._plan_cache = (dict(layouts), expected, _node_table(expected))
        return self._plan_cache[1], self._plan_cache[2]

    # ------------------------------------------------------------------------------------------------ save

    def save(self, step: int, adapters: Any, opt_state: Any = None, *, extra: Any = None, force: bool = False) -> bool:
        """Save ``adapters`` (and ``opt_state``, ``extra``) as ``step``; returns whether a checkpoint was written.

        Checks first that ``adapters`` are exactly what the config makes on the params (paths, node types,
        array shapes and dtypes, layouts), so that every saved step can be restored; nothing is written when a
        check fails. Steps off ``save_interval_steps``, not after the latest saved step, or already on disk are
        skipped (False) unless ``force``; no step is ever overwritten (with ``force``, an existing step is an
        error). With ``async_save`` the arrays are copied off the device before this returns and written in the
        background; call ``wait`` (or ``close``) before relying on the files.

        Args:
          step: the step number.
          adapters: the adapter tree.
          opt_state: the optimizer state (any pytree of arrays), or None.
          extra: any other trained pytree of arrays saved beside the adapters (a classifier head, the norms),
            or None.
          force: write even off the save interval.

        Raises:
          ValueError: the adapters do not match the config on these params; a non-array leaf in ``adapters``,
            ``opt_state`` or ``extra``; ``force`` with a step already on disk; a read-only checkpointer.
        """
        if self._read_only:
            raise ValueError(
                f"this AdapterCheckpointer of {self._directory!r} is read-only; open one without read_only."
            )
        step = int(step)
        exists = step in self._manager.all_steps()
        if not force and (exists or not self._manager.should_save(step)):
            return False
        if exists:
            raise ValueError(
                f"`step`={step} is already saved in {self._directory!r}; checkpoints are never overwritten: save "
                "under a new step (or delete that step's directory first)."
            )
        meta: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "config": self._config,
            "adapters": self._check_adapters(adapters),
            "base": self._fingerprint,
        }
        trees = {_ADAPTERS: _array_leaves(adapters, _ADAPTERS)}
        for item, tree in ((_OPT, opt_state), (_EXTRA, extra)):
            flat = None if tree is None else _array_leaves(tree, item)
            meta[item] = None if flat is None else _shape_table(flat)
            if flat:  # an empty state (e.g. plain SGD's) is rebuilt from its `*_like` structure alone
                trees[item] = flat
        args = {item: ocp.args.StandardSave(_nested(flat)) for item, flat in trees.items()}
        args[_META] = ocp.args.JsonSave(meta)
        return bool(self._manager.save(step, args=ocp.args.Composite(**args), force=True))

    def _check_adapters(self, adapters: Any) -> dict[str, Any]:
        """The node table of ``adapters`` after checking it equals the one the config makes on the params."""
        given = _node_table(adapters)
        try:
            _, planned = self._planned({**layouts_of(adapters), **(self._layouts or {})})
        except ValueError as err:
            raise ValueError(
                "cannot check `adapters` against `cfg` on these params (if `cfg` selects a parameter that "
                f"`adapters` lack, they were made with another config): {err}"
            ) from err
        diff = _diff_table(planned, given, "adapter", left="config", right="in `adapters`")
        if diff:
            raise ValueError(
                f"`adapters` are not what `cfg` ({type(self._cfg).__name__}) makes on these params: {_listed(diff)}. "
                "Pass the config and params the adapters were initialised with."
            )
        return given

    # ------------------------------------------------------------------------------------------------ restore

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: the latest)."""
        return _read_meta(self._manager, self._directory, _resolve_step(self._manager, self._directory, step))

    def restore(
        self,
        step: int | None = None,
        *,
        adapters_like: Any = None,
        opt_state_like: Any = None,
        extra_like: Any = None,
        skip: Sequence[str] = (),
        sharding: ShardingSpec = None,
        check_base: bool = True,
    ) -> Restored:
        """Restore ``step`` (default: the latest) against abstract targets from the current config and shardings.

        Guarantees: the restored adapters have exactly the paths, node types and shapes that the method's
        ``init`` makes from the current config on the current params, and its static parts; nothing saved is
        silently dropped (a saved ``opt_state`` or ``extra`` must be given a target or skipped explicitly); every
        check runs before any array is read; no leaf is left abstract; the base weights are not read.

        Args:
          step: which step; None for the latest complete one.
          adapters_like: the current adapters (arrays or ``jax.ShapeDtypeStruct``, e.g. freshly initialised and
            sharded); each restored array takes its leaf's sharding.
          opt_state_like: the current optimizer state (e.g. ``tx.init(adapters)`` or its ``jax.eval_shape``);
            the saved state is restored into its structure with its shardings.
          extra_like: the structure (arrays or ``jax.ShapeDtypeStruct``) of the ``extra`` tree saved beside the
            adapters; restored into it with its shardings.
          skip: items not to restore although saved: ``("opt_state",)``, ``("extra",)`` or both.
          sharding: for leaves whose sharding is not given by a ``*_like`` tree: one ``Sharding`` for all, or
            ``fn(path, ShapeDtypeStruct) -> Sharding``; default the first local device.
          check_base: compare the base fingerprint (paths, shapes, dtypes of every param). Turn off only to
            load adapters onto a base whose other leaves changed on purpose (e.g. cast to bf16); the adapted
            paths and shapes are checked regardless.

        Raises:
          FileNotFoundError: no such step.
          ValueError: the saved config or fingerprint differs from the current one (the message names the fields
            or paths); the on-disk arrays differ from the targets; a ``*_like`` tree does not match what was
            saved, or nothing was saved for it; a saved ``opt_state``/``extra`` with neither a target nor
            ``skip``; ``skip`` names an unknown item or one whose ``*_like`` is given; a leaf would stay abstract.
        """
        likes = {_OPT: opt_state_like, _EXTRA: extra_like}
        _check_skip(skip, likes)
        self.wait()
        step = _resolve_step(self._manager, self._directory, step)
        meta = _read_meta(self._manager, self._directory, step)
        self._check_saved(meta, step, check_base)
        targets = {_ADAPTERS: self._adapter_target(meta, step, adapters_like, sharding)}
        for item, like in likes.items():
            if like is not None:
                targets[item] = _aux_target(item, like, meta.get(item), self._where(step), sharding)
            elif meta.get(item) is not None and item not in skip:
                raise ValueError(
                    f"{self._where(step)} holds `{item}`; say how to restore it: pass {_HOW[item]}, or "
                    f"skip=({item!r},) to leave it."
                )
        self._check_on_disk(step, targets)
        args = {item: ocp.args.StandardRestore(_nested(t.arrays)) for item, t in targets.items() if t.arrays}
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        trees = {item: t.rebuild(restored[item] if item in args else {}, item, step) for item, t in targets.items()}
        config = type(self._cfg).from_dict(meta["config"])
        return Restored(step, trees[_ADAPTERS], trees.get(_OPT), config, trees.get(_EXTRA))

    def _check_saved(self, meta: Mapping[str, Any], step: int, check_base: bool) -> None:
        """Raise when the saved config (or, with ``check_base``, the base fingerprint) differs from the current."""
        config_diff = _config_diff(self._cfg, meta["config"], self._config)
        if config_diff:
            raise ValueError(
                f"{self._where(step)} was saved with a different config: {_listed(config_diff)}. Restore with the "
                "saved config (jaxpeft.checkpoint.read_config) or start a new directory."
            )
        if check_base and meta["base"]["digest"] != self._fingerprint["digest"]:
            diff = _diff_table(meta["base"]["params"], self._fingerprint["params"], "base param shape, dtype")
            raise ValueError(
                f"{self._where(step)} was saved for a different base model: {_listed(diff)}. Load the base model "
                "it was trained on (or pass check_base=False if only non-adapted leaves changed on purpose)."
            )

    def _adapter_target(
        self, meta: Mapping[str, Any], step: int, adapters_like: Any, sharding: ShardingSpec
    ) -> _Target:
        """The abstract adapter tree from the method's init (checked against the saved table) and its targets."""
        layouts = self._layouts
        if layouts is None:
            layouts = {p: Layout(**info["layout"]) for p, info in meta["adapters"].items()}
        try:
            expected, table = self._planned(layouts)
        except ValueError as err:
            raise ValueError(f"{self._where(step)}: the current config does not plan on these params: {err}") from err
        diff = _diff_table(meta["adapters"], table, "adapter")
        if diff:
            raise ValueError(
                f"{self._where(step)} holds adapters that the current config does not make on these params: "
                f"{_listed(diff)}. Restore on the base model it was trained on, with the layouts it was saved with."
            )
        abstract = dict(leaves_with_paths(expected))
        like = dict(leaves_with_paths(adapters_like)) if adapters_like is not None else {}
        if adapters_like is not None:
            shapes = {p: list(x.shape) for p, x in abstract.items()}
            diff = _diff_table(
                shapes, {p: list(x.shape) for p, x in like.items()}, "adapter array", right="in `adapters_like`"
            )
            if diff:
                raise ValueError(f"`adapters_like` does not match the adapters in the checkpoint: {_listed(diff)}.")
        return _Target({p: _target(p, x, like.get(p), sharding) for p, x in abstract.items()}, expected)

    def _check_on_disk(self, step: int, targets: Mapping[str, _Target]) -> None:
        """Raise when orbax's on-disk array metadata differs from the restore targets (a damaged step)."""
        disk = self._manager.item_metadata(step)
        for item, target in targets.items():
            if not target.arrays:
                continue
            tree = getattr(disk.get(item), "tree", None)  # None: the item is missing on disk
            found = {p: _shape_dtype(x) for p, x in leaves_with_paths(tree)}
            diff = _diff_table(found, _shape_table(target.arrays), f"on-disk {item} array", right="expected")
            if diff:
                raise ValueError(f"{self._where(step)}: on-disk {item} arrays differ: {_listed(diff)}.")


# ------------------------------------------------------------------------------------------------ one-shot


def save_adapters(
    directory: str | os.PathLike[str],
    step: int,
    adapters: Any,
    cfg: MethodConfig,
    params: Any,
    opt_state: Any = None,
    *,
    extra: Any = None,
    **options: Any,
) -> str:
    """Save one step and wait until it is on disk; returns the absolute directory.

    ``options`` are those of :class:`AdapterCheckpointer` (``max_to_keep``, ``layouts``, ...). The step is
    always written (``force=True``). For a training loop keep one :class:`AdapterCheckpointer` open instead.
    """
    with AdapterCheckpointer(directory, cfg, params, **options) as ckpt:
        ckpt.save(step, adapters, opt_state, extra=extra, force=True)
        ckpt.wait()
        return ckpt.directory


def restore_adapters(
    directory: str | os.PathLike[str],
    cfg: MethodConfig,
    params: Any,
    *,
    step: int | None = None,
    layouts: Mapping[str, Layout] | None = None,
    **restore_kwargs: Any,
) -> Restored:
    """Restore one step (default: the latest) read-only; keyword arguments as :meth:`AdapterCheckpointer.restore`."""
    with AdapterCheckpointer(directory, cfg, params, layouts=layouts, async_save=False, read_only=True) as ckpt:
        return ckpt.restore(step, **restore_kwargs)


def read_config(
    directory: str | os.PathLike[str], step: int | None = None, *, configs: Sequence[type[MethodConfig]] = ()
) -> MethodConfig:
    """The config a checkpoint step (default: the latest) was saved with, e.g. to rebuild adapters for inference.

    Built-in methods are found by their ``method`` name; for a method of your own pass its config class in
    ``configs``. The directory is only read.
    """
    path = _absolute(directory)
    manager = _open_manager(path, read_only=True)
    try:
        step = _resolve_step(manager, path, step)
        meta = _read_meta(manager, path, step)
    finally:
        manager.close()
    try:
        return config_from_dict(meta["config"], configs)
    except ValueError as err:
        raise ValueError(f"step {step} in {path!r}: {err}") from None
