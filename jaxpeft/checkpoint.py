"""Adapter-only training checkpoints with orbax: adapters, optimizer state, step, config JSON, base fingerprint.

This is the only jaxpeft module that imports orbax. A checkpoint step holds three orbax items:

- ``adapters``: the adapter arrays as plain nested dicts, ``{..., "q_proj": {"kernel": {"a": A, "b": B}}}``
  (``StandardSave``: tensorstore/OCDBT arrays, framework-neutral, no pickle);
- ``opt_state``: the optimizer state's array leaves as nested dicts keyed by their path entries (omitted when it
  has no array leaves);
- ``meta``: JSON with the step, the method config (``LoraConfig.to_dict()``), each adapter's shapes, layout and
  scale, and a fingerprint of the base params (path -> shape, dtype).

The base weights never enter a checkpoint. Restore always reads against abstract targets
(``jax.ShapeDtypeStruct`` with a sharding) built from the *current* config, params and shardings, so a checkpoint
written on one mesh restores on another; the saved config and fingerprint are compared with the current ones
first, and any difference is an error that names the differing fields or paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft._select import Layout
from jaxpeft.methods.lora import LoraConfig, LoraWeights, TargetInfo, adapter_items, plan

__all__ = [
    "AdapterCheckpointer",
    "Restored",
    "fingerprint",
    "read_config",
    "restore_adapters",
    "save_adapters",
]

FORMAT = "jaxpeft.adapter_checkpoint"
VERSION = 1
_ADAPTERS, _OPT, _META = "adapters", "opt_state", "meta"
# Config fields that do not shape the saved arrays: a restore may change them (e.g. a new dropout rate).
_FREE_FIELDS = ("dropout", "init")
_MAX_LISTED = 8

ShardingSpec = jax.sharding.Sharding | Callable[[str, jax.ShapeDtypeStruct], jax.sharding.Sharding] | None


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a restore returns.

    Attributes:
      step: the restored step.
      adapters: the adapter tree (``LoraWeights`` leaves with the current config's scale and dropout).
      opt_state: the optimizer state in the structure of ``opt_state_like``, or None when not asked for.
      config: the config the checkpoint was saved with.
    """

    step: int
    adapters: dict[str, Any]
    opt_state: Any
    config: LoraConfig


def _listed(lines: list[str]) -> str:
    shown = "; ".join(lines[:_MAX_LISTED])
    return shown + (f"; and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else "")


def _absolute(directory: str | os.PathLike[str]) -> str:
    text = os.fspath(directory)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


def _shape_dtype(leaf: Any) -> tuple[list[int], str]:
    return [int(d) for d in leaf.shape], jnp.dtype(leaf.dtype).name


def fingerprint(params: Any) -> dict[str, Any]:
    """The base-model fingerprint stored in every checkpoint: ``{"digest": sha256, "params": {path: [shape, dtype]}}``.

    Only paths, shapes and dtypes enter it, never values; ``params`` may be abstract (``jax.ShapeDtypeStruct``).
    """
    table = {path: list(_shape_dtype(leaf)) for path, leaf in sorted(leaves_with_paths(params))}
    digest = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "params": table}


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        tree = set_path(tree, path, value)
    return tree


def _derived_layouts(adapters: Any, params: Any) -> dict[str, Layout]:
    """Each adapter's layout read off its shapes (stack axes = a.ndim + b.ndim - 2 - kernel.ndim)."""
    shapes = {p: tuple(leaf.shape) for p, leaf in leaves_with_paths(params)}
    out: dict[str, Layout] = {}
    for path, lora in adapter_items(adapters):
        if path not in shapes:
            raise ValueError(f"adapter {path!r} has no parameter in `params`; were the adapters made for this model?")
        n_stack = lora.n_stack(len(shapes[path]))
        fan_in, fan_out = lora.a.ndim - 1 - n_stack, lora.b.ndim - 1 - n_stack
        if n_stack < 0 or fan_in < 1 or fan_out < 1:
            raise ValueError(
                f"adapter {path!r} (A {tuple(lora.a.shape)}, B {tuple(lora.b.shape)}) does not fit the parameter "
                f"of shape {shapes[path]}; were the adapters made for this model?"
            )
        if path.rsplit("/", 1)[-1] == "embedding":
            kind = "embed"
        elif fan_in == 1 and fan_out == 1:
            kind = "dense"
        else:
            kind = "dense_general"
        out[path] = Layout(n_stack, fan_in, fan_out, kind)
    return out


def _layout_json(layout: Layout) -> dict[str, Any]:
    return {"stack": layout.stack, "fan_in": layout.fan_in, "fan_out": layout.fan_out, "kind": layout.kind}


def _plan_rows(cfg: LoraConfig, params: Any, layouts: Mapping[str, Layout], context: str) -> dict[str, TargetInfo]:
    try:
        return {t.path: t for t in plan(cfg, params, layouts=layouts).targets}
    except ValueError as err:
        raise ValueError(f"{context}: {err}") from err


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], str):
        return f"{tuple(value[0])} {value[1]}"  # (shape, dtype)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return " / ".join(str(tuple(v)) for v in value)  # (A shape, B shape)
    return str(tuple(value)) if isinstance(value, list) else str(value)


def _diff_table(
    saved: Mapping[str, Any], current: Mapping[str, Any], what: str, left: str = "checkpoint", right: str = "now"
) -> list[str]:
    """Lines naming each path whose entry differs between two ``{path: value}`` tables."""
    lines = [f"{p!r} missing {right} ({what})" for p in sorted(set(saved) - set(current))]
    lines += [f"{p!r} not in {left} ({what})" for p in sorted(set(current) - set(saved))]
    lines += [
        f"{p!r}: {left} {_show(saved[p])}, {right} {_show(current[p])}"
        for p in sorted(set(saved) & set(current))
        if saved[p] != current[p]
    ]
    return lines


def _config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(current)) - set(_FREE_FIELDS))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _adapter_table(rows: Mapping[str, TargetInfo]) -> dict[str, Any]:
    return {
        p: {"a": list(t.a_shape), "b": list(t.b_shape), "scale": t.scale, "layout": _layout_json(t.layout)}
        for p, t in sorted(rows.items())
    }


def _array_leaves(tree: Any, what: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for path, leaf in leaves_with_paths(tree):
        if isinstance(leaf, (int, float, bool, np.number)):
            leaf = np.asarray(leaf)
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise ValueError(f"`{what}` leaf {path!r} is a {type(leaf).__name__}; only arrays can be checkpointed.")
        flat[path] = leaf
    return flat


def _sharding_for(path: str, abstract: jax.ShapeDtypeStruct, like: Any, sharding: ShardingSpec) -> Any:
    found = getattr(like, "sharding", None) if like is not None else None
    if found is not None:
        return found
    if sharding is None:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        return sharding
    return sharding(path, abstract)


def _tree_metadata(metadata: Any) -> dict[str, tuple[list[int], str]]:
    tree = getattr(metadata, "tree", metadata)
    out = {}
    for path, leaf in leaves_with_paths(tree):
        out[path] = (list(leaf.shape), jnp.dtype(leaf.dtype).name)
    return out


class AdapterCheckpointer:
    """Adapter-only checkpoints in a directory, through one orbax ``CheckpointManager``.

    Use it as a context manager (or call ``close``): it waits for pending async saves on exit. Saves are atomic
    (orbax writes into a temporary directory and renames it when complete), so a save interrupted mid-way leaves
    every earlier checkpoint loadable; leftovers are removed when the next checkpointer opens the directory.

    Example::

      with jaxpeft.checkpoint.AdapterCheckpointer("ckpt", cfg, params, max_to_keep=3) as ckpt:
          for step in range(steps):
              adapters, opt_state = train_step(adapters, opt_state, batch)
              ckpt.save(step, adapters, opt_state)          # async; skipped off the save interval
      restored = jaxpeft.checkpoint.restore_adapters("ckpt", cfg, params, opt_state_like=opt_state)
      adapters, opt_state, step = restored.adapters, restored.opt_state, restored.step

    Args:
      directory: checkpoint root (resolved to an absolute path; created on first save).
      cfg: the method config; saved as JSON and compared on restore.
      params: the base params (arrays or ``jax.ShapeDtypeStruct``): fingerprinted, never saved.
      max_to_keep: keep the newest N steps (None keeps all).
      save_interval_steps: ``save`` writes only steps divisible by this (unless ``force=True``).
      async_save: write in a background thread; ``wait``/``close`` block until done.
      layouts: kernel layouts as for ``jaxpeft.init``; by default read off the adapter shapes on save and from
        the checkpoint on restore.
      read_only: only restore: the directory must exist, is never created or cleaned, and ``save`` raises.
        (A training job's temporary directories are left alone, so an evaluator can read beside it.)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        cfg: LoraConfig,
        params: Any,
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        layouts: Mapping[str, Layout] | None = None,
        read_only: bool = False,
    ) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"`max_to_keep`={max_to_keep!r}; expected a positive number of steps, or None for all.")
        if save_interval_steps < 1:
            raise ValueError(f"`save_interval_steps`={save_interval_steps!r}; expected a positive integer.")
        self._directory = _absolute(directory)
        self._read_only = read_only
        if read_only and "://" not in self._directory and not os.path.isdir(self._directory):
            raise FileNotFoundError(f"no checkpoint directory {self._directory!r}.")
        self._cfg = cfg
        self._config = cfg.to_dict()
        self._params = params
        self._fingerprint = fingerprint(params)
        self._layouts = dict(layouts) if layouts is not None else None
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item, handler, save_args, restore_args in (
            (_ADAPTERS, ocp.StandardCheckpointHandler, ocp.args.StandardSave, ocp.args.StandardRestore),
            (_OPT, ocp.StandardCheckpointHandler, ocp.args.StandardSave, ocp.args.StandardRestore),
            (_META, ocp.JsonCheckpointHandler, ocp.args.JsonSave, ocp.args.JsonRestore),
        ):
            instance = handler()
            registry.add(item, save_args, instance)
            registry.add(item, restore_args, instance)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options, handler_registry=registry)

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

    # ------------------------------------------------------------------------------------------------ save

    def save(self, step: int, adapters: Any, opt_state: Any = None, *, force: bool = False) -> bool:
        """Save ``adapters`` (and ``opt_state``) as ``step``; returns whether a checkpoint was written.

        Checks first that ``adapters`` are exactly what the config selects on the params (paths and shapes), so
        that every saved step can be restored. Steps off ``save_interval_steps`` are skipped unless ``force``.
        With ``async_save`` the arrays are copied off the device before this returns and written in the
        background; call ``wait`` (or ``close``) before relying on the files.

        Raises:
          ValueError: the adapters do not match the config on these params; a non-array optimizer-state leaf;
            the config holds a predicate target (not JSON-serialisable).
        """
        if self._read_only:
            raise ValueError(
                f"this AdapterCheckpointer of {self._directory!r} is read-only; open one without read_only."
            )
        step = int(step)
        if not force and not self._manager.should_save(step):
            return False
        layouts = {**_derived_layouts(adapters, self._params), **(self._layouts or {})}
        rows = _plan_rows(
            self._cfg,
            self._params,
            layouts,
            "cannot check `adapters` against `cfg` on these params (if `cfg` selects a parameter that `adapters` "
            "lack, they were made with another config)",
        )
        given = {p: (tuple(w.a.shape), tuple(w.b.shape)) for p, w in adapter_items(adapters)}
        planned = {p: (t.a_shape, t.b_shape) for p, t in rows.items()}
        diff = _diff_table(planned, given, "A, B shapes", left="config", right="in `adapters`")
        if diff:
            raise ValueError(
                "`adapters` are not what `cfg` makes on these params: "
                + _listed(diff)
                + ". Pass the config and params the adapters were initialised with."
            )
        for path, lora in adapter_items(adapters):
            want = jnp.dtype(self._cfg.dtype)
            if lora.a.dtype != want or lora.b.dtype != want:
                raise ValueError(
                    f"adapter {path!r} has dtype {lora.a.dtype}/{lora.b.dtype} but `cfg.dtype`={self._cfg.dtype!r}."
                )
        arrays = {}
        for path, lora in adapter_items(adapters):
            arrays[f"{path}/a"] = lora.a
            arrays[f"{path}/b"] = lora.b
        opt_flat = _array_leaves(opt_state, "opt_state") if opt_state is not None else {}
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "config": self._config,
            "adapters": _adapter_table(rows),
            "base": self._fingerprint,
            "opt_state": None
            if opt_state is None
            else {p: list(_shape_dtype(leaf)) for p, leaf in sorted(opt_flat.items())},
        }
        items: dict[str, Any] = {
            _ADAPTERS: ocp.args.StandardSave(_nested(arrays)),
            _META: ocp.args.JsonSave(meta),
        }
        if opt_flat:
            items[_OPT] = ocp.args.StandardSave(_nested(opt_flat))
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

    # ------------------------------------------------------------------------------------------------ restore

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: the latest)."""
        step = self._resolve_step(step)
        meta = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"step {step} in {self._directory!r} is not a jaxpeft adapter checkpoint.")
        if meta.get("version") != VERSION:
            raise ValueError(
                f"step {step} in {self._directory!r} has format version {meta.get('version')!r}; this jaxpeft "
                f"reads version {VERSION}."
            )
        return meta

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {self._directory!r}.")
        elif int(step) not in self._manager.all_steps():
            raise FileNotFoundError(
                f"`step`={step!r} is not in {self._directory!r}; complete steps are {self.all_steps()}."
            )
        return int(step)

    def restore(
        self,
        step: int | None = None,
        *,
        adapters_like: Any = None,
        opt_state_like: Any = None,
        sharding: ShardingSpec = None,
        check_base: bool = True,
    ) -> Restored:
        """Restore ``step`` (default: the latest) against abstract targets from the current config and shardings.

        Guarantees: the restored adapters have exactly the paths and shapes that the current config selects on
        the current params; no leaf is left abstract; the base weights are not read.

        Args:
          step: which step; None for the latest complete one.
          adapters_like: the current adapters (arrays or ``jax.ShapeDtypeStruct``, e.g. freshly initialised and
            sharded); each restored array takes its leaf's sharding.
          opt_state_like: the current optimizer state (e.g. ``tx.init(adapters)`` or its ``jax.eval_shape``);
            the saved state is restored into its structure with its shardings. None skips the optimizer state.
          sharding: for leaves whose sharding is not given by a ``*_like`` tree: one ``Sharding`` for all, or
            ``fn(path, ShapeDtypeStruct) -> Sharding``; default the first local device.
          check_base: compare the base fingerprint (paths, shapes, dtypes of every param). Turn off only to
            load adapters onto a base whose other leaves changed on purpose (e.g. cast to bf16); the adapted
            paths and shapes are checked regardless.

        Raises:
          FileNotFoundError: no such step.
          ValueError: the saved config or fingerprint differs from the current one (the message names the fields
            or paths); the on-disk arrays differ from the targets; ``opt_state_like`` does not match the saved
            optimizer state, or the checkpoint has none; a restored leaf would stay abstract.
        """
        if self._manager.is_saving_in_progress():
            self._manager.wait_until_finished()
        step = self._resolve_step(step)
        meta = self.read_meta(step)
        config_diff = _config_diff(meta["config"], self._config)
        if config_diff:
            raise ValueError(
                f"checkpoint step {step} in {self._directory!r} was saved with a different config: "
                + _listed(config_diff)
                + ". Restore with the saved config (jaxpeft.checkpoint.read_config) or start a new directory."
            )
        if check_base and meta["base"]["digest"] != self._fingerprint["digest"]:
            diff = _diff_table(meta["base"]["params"], self._fingerprint["params"], "base param shape, dtype")
            raise ValueError(
                f"checkpoint step {step} in {self._directory!r} was saved for a different base model: "
                + _listed(diff)
                + ". Load the base model it was trained on (or pass check_base=False if only non-adapted "
                "leaves changed on purpose)."
            )
        layouts = self._layouts
        if layouts is None:
            layouts = {p: Layout(**info["layout"]) for p, info in meta["adapters"].items()}
        rows = _plan_rows(self._cfg, self._params, layouts, "the current config does not plan on these params")
        saved_shapes = {p: (tuple(info["a"]), tuple(info["b"])) for p, info in meta["adapters"].items()}
        diff = _diff_table(saved_shapes, {p: (t.a_shape, t.b_shape) for p, t in rows.items()}, "A, B shapes")
        if diff:
            raise ValueError(
                f"checkpoint step {step} in {self._directory!r} holds adapters that the current config "
                f"does not make on these params: {_listed(diff)}."
            )

        dtype = jnp.dtype(self._cfg.dtype)
        wanted = {f"{p}/a": t.a_shape for p, t in rows.items()} | {f"{p}/b": t.b_shape for p, t in rows.items()}
        like: dict[str, Any] = {}
        if adapters_like is not None:
            for p, w in adapter_items(adapters_like):
                like[f"{p}/a"], like[f"{p}/b"] = w.a, w.b
            diff = _diff_table(
                {k: list(v) for k, v in wanted.items()},
                {k: list(x.shape) for k, x in like.items()},
                "adapter shape",
                right="in `adapters_like`",
            )
            if diff:
                raise ValueError(f"`adapters_like` does not match the adapters in the checkpoint: {_listed(diff)}.")
        abstract: dict[str, jax.ShapeDtypeStruct] = {}
        for key, shape in wanted.items():
            plain = jax.ShapeDtypeStruct(shape, dtype)
            abstract[key] = jax.ShapeDtypeStruct(
                shape, dtype, sharding=_sharding_for(key, plain, like.get(key), sharding)
            )
        on_disk = self._manager.item_metadata(step)
        disk = _tree_metadata(on_disk[_ADAPTERS])
        diff = _diff_table(disk, {p: (list(x.shape), dtype.name) for p, x in abstract.items()}, "on-disk adapter array")
        if diff:
            raise ValueError(
                f"checkpoint step {step} in {self._directory!r}: on-disk adapter arrays differ: {_listed(diff)}."
            )
        items: dict[str, Any] = {_ADAPTERS: ocp.args.StandardRestore(_nested(abstract))}

        opt_abstract: dict[str, jax.ShapeDtypeStruct] = {}
        opt_treedef = None
        opt_paths: list[str] = []
        if opt_state_like is not None:
            if meta.get("opt_state") is None:
                raise ValueError(
                    f"checkpoint step {step} in {self._directory!r} has no optimizer state; pass opt_state_like=None."
                )
            flat_like = _array_leaves(opt_state_like, "opt_state_like")
            opt_paths = [p for p, _ in leaves_with_paths(opt_state_like)]
            opt_treedef = jax.tree_util.tree_structure(opt_state_like)
            current = {p: list(_shape_dtype(x)) for p, x in flat_like.items()}
            diff = _diff_table(meta["opt_state"], current, "optimizer state leaf", right="in `opt_state_like`")
            if diff:
                raise ValueError(
                    f"`opt_state_like` does not match the optimizer state saved at step {step}: {_listed(diff)}. "
                    "Build it with the same optimizer over the same adapters."
                )
            for p, x in flat_like.items():
                plain = jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
                opt_abstract[p] = jax.ShapeDtypeStruct(
                    plain.shape, plain.dtype, sharding=_sharding_for(p, plain, x, sharding)
                )
            if opt_abstract:
                items[_OPT] = ocp.args.StandardRestore(_nested(opt_abstract))

        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        arrays = dict(leaves_with_paths(restored[_ADAPTERS]))
        _check_concrete(arrays, set(abstract), "adapters", step)
        adapters: dict[str, Any] = {}
        for p in sorted(rows):
            lora = LoraWeights(arrays[f"{p}/a"], arrays[f"{p}/b"], self._cfg.scale_for(p), self._cfg.dropout)
            adapters = set_path(adapters, p, lora)
        opt_state = None
        if opt_treedef is not None:
            opt_arrays = dict(leaves_with_paths(restored[_OPT])) if opt_abstract else {}
            _check_concrete(opt_arrays, set(opt_abstract), "opt_state", step)
            opt_state = jax.tree_util.tree_unflatten(opt_treedef, [opt_arrays[p] for p in opt_paths])
        return Restored(step, adapters, opt_state, LoraConfig.from_dict(meta["config"]))


def _check_concrete(arrays: Mapping[str, Any], expected: set[str], what: str, step: int) -> None:
    missing = sorted(expected - set(arrays))
    abstract = sorted(p for p, x in arrays.items() if not isinstance(x, jax.Array))
    if missing or abstract:
        raise ValueError(
            f"restoring step {step} would leave {what} leaves unfilled: missing {missing[:_MAX_LISTED]}, "
            f"abstract {abstract[:_MAX_LISTED]}; the checkpoint is incomplete."
        )


def save_adapters(
    directory: str | os.PathLike[str],
    step: int,
    adapters: Any,
    cfg: LoraConfig,
    params: Any,
    opt_state: Any = None,
    **options: Any,
) -> str:
    """Save one step and wait until it is on disk; returns the absolute directory.

    ``options`` are those of :class:`AdapterCheckpointer` (``max_to_keep``, ``layouts``, ...). The step is
    always written (``force=True``). For a training loop keep one :class:`AdapterCheckpointer` open instead.
    """
    with AdapterCheckpointer(directory, cfg, params, **options) as ckpt:
        ckpt.save(step, adapters, opt_state, force=True)
        ckpt.wait()
        return ckpt.directory


def restore_adapters(
    directory: str | os.PathLike[str],
    cfg: LoraConfig,
    params: Any,
    *,
    step: int | None = None,
    layouts: Mapping[str, Layout] | None = None,
    **restore_kwargs: Any,
) -> Restored:
    """Restore one step (default: the latest); keyword arguments as :meth:`AdapterCheckpointer.restore`."""
    with AdapterCheckpointer(directory, cfg, params, layouts=layouts, async_save=False, read_only=True) as ckpt:
        return ckpt.restore(step, **restore_kwargs)


def read_config(directory: str | os.PathLike[str], step: int | None = None) -> LoraConfig:
    """The config a checkpoint step (default: the latest) was saved with, e.g. to rebuild adapters for inference."""
    with AdapterCheckpointer(directory, LoraConfig(), {}, async_save=False, read_only=True) as ckpt:
        return LoraConfig.from_dict(ckpt.read_meta(step)["config"])
