"""``AdapterCheckpointer`` (a directory of steps over one orbax ``CheckpointManager``) and the one-shot
``save_adapters`` / ``restore_adapters`` / ``read_config``."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths
from jaxpeft._select import Layout
from jaxpeft.api import config_from_dict
from jaxpeft.api import init_adjusted as method_init_adjusted
from jaxpeft.checkpoint._lock import Lock
from jaxpeft.checkpoint._meta import ADAPTERS, EXTRA, META, OPT, clip, is_int, new_meta, read_meta
from jaxpeft.checkpoint._steps import (
    check_step,
    complete_steps,
    discard,
    empty_trash,
    open_manager,
    resolve_step,
    scan_steps,
    step_list,
)
from jaxpeft.checkpoint._tables import (
    abstract,
    array_leaves,
    config_diff,
    diff_table,
    fingerprint,
    is_concrete,
    listed,
    nested,
    node_diff,
    node_table,
    residual_diff,
    residual_entry,
    sample_positions,
    shape_dtype,
    shape_table,
)
from jaxpeft.checkpoint._targets import (
    HOW,
    Placement,
    ShardingSpec,
    Target,
    adapter_target,
    aux_target,
    check_skip,
    derive,
    placed_params,
)
from jaxpeft.protocol import MethodConfig, adapter_items, layouts_of


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a restore returns.

    Attributes:
      step: the restored step.
      adapters: the adapter tree (nodes with the current config's static parts: scale, dropout, layout).
      opt_state: the optimizer state in the structure of ``opt_state_like``; None when the step holds none or
        it was skipped.
      config: the config the checkpoint was saved with (same method class as the current one; fields in
        ``restore_free``, such as LoRA's dropout, may differ from the current config's, but never its
        ``base_adjustment``).
      extra: the extra trained tree in the structure of ``extra_like``; None when the step holds none or it was
        skipped.
    """

    step: int
    adapters: dict[str, Any]
    opt_state: Any
    config: MethodConfig
    extra: Any = None


def _absolute(directory: str | os.PathLike[str]) -> str:
    text = os.fspath(directory)
    return text if "://" in text else os.path.abspath(os.path.expanduser(text))


class AdapterCheckpointer:
    """Adapter-only checkpoints in a directory, through one orbax ``CheckpointManager``; any method.

    Use it as a context manager (or call ``close``): it waits for pending async saves on exit. Saves are atomic
    (orbax writes into a temporary directory and renames it when complete), so a save interrupted mid-way leaves
    every earlier checkpoint loadable; leftovers are removed when the next writer opens the directory.

    One writer per directory: a writer holds the lock file ``jaxpeft.lock`` (its pid, host and start time) from
    opening to ``close`` (or its process's end), and a second writer, in this process or another, gets
    :class:`CheckpointLockedError` naming the owner, so no step can mix two runs. A stale lock (its process died
    on this host) is taken over. Read-only checkpointers take no lock and may read beside a writer. In a
    multi-process job only process 0 takes the lock (it is orbax's primary host, which creates, renames and
    deletes step directories; the others write array shards into them): the job counts as one writer. Remote
    directories (``gs://...``) are not locked.

    Opening a directory also checks its step directories: an incomplete one (files missing, e.g. an older
    jaxpeft's pruning killed mid-deletion) is removed by a writer and skipped by a read-only checkpointer, with a
    warning naming it either way; a directory holding another program's orbax steps is refused for writing.

    Example::

      with jaxpeft.checkpoint.AdapterCheckpointer("ckpt", cfg, params, max_to_keep=3) as ckpt:
          for step in range(steps):
              (adapters, head), opt_state = train_step((adapters, head), opt_state, batch)
              ckpt.save(step, adapters, opt_state, extra=head)     # async; skipped off the save interval
      restored = jaxpeft.checkpoint.restore_adapters(
          "ckpt", cfg, params, opt_state_like=opt_state, extra_like=head)

    Args:
      directory: checkpoint root (resolved to an absolute path; created by a writer).
      cfg: the method config; saved as JSON and compared on restore.
      params: the base params (arrays or ``jax.ShapeDtypeStruct``): only their paths, shapes, dtypes and
        ``NamedSharding`` objects are kept (fingerprinted, used to plan the adapters and to derive the default restore
        shardings); never saved. For a config that changes the base at init (``cfg.base_adjustment``: PiSSA,
        OLoRA) they must be the concrete residual params ``jaxpeft.init_adjusted`` returned, the base the adapters
        are trained over: the checkpointer keeps a reference to them, each saved step records a fingerprint of
        the adjusted weights (:meth:`save`) and a restore checks it (:meth:`restore`).
      max_to_keep: keep the N most recently saved steps (None keeps all).
      save_interval_steps: ``save`` writes only steps divisible by this (unless ``force=True``).
      async_save: write in a background thread; ``wait``/``close`` block until done.
      layouts: kernel layouts as for ``jaxpeft.init``; by default the layouts the adapter nodes carry on save
        and the saved ones on restore.
      read_only: only restore: the directory must exist, is never created, locked or cleaned, and ``save``
        raises. (A training job's temporary directories are left alone, so an evaluator can read beside it.)

    Raises:
      CheckpointLockedError: another writer holds the directory.
      ValueError: the directory holds steps that are not jaxpeft adapter checkpoints (for a writer).
      FileNotFoundError: ``read_only`` and no such directory.
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
        if max_to_keep is not None and (not is_int(max_to_keep) or max_to_keep < 1):
            raise ValueError(f"`max_to_keep`={max_to_keep!r}; expected a positive number of steps, or None for all.")
        if not is_int(save_interval_steps) or save_interval_steps < 1:
            raise ValueError(f"`save_interval_steps`={save_interval_steps!r}; expected a positive integer.")
        self._directory = _absolute(directory)
        self._read_only = read_only
        self._interval = save_interval_steps
        self._async = async_save
        self._cfg = cfg
        self._config = cfg.to_dict()
        self._params = jax.tree.map(abstract, params, is_leaf=quant.is_quantized)  # a quantised weight: logical
        self._placed = placed_params(params)  # the params' NamedShardings, to derive default restore shardings
        self._fingerprint = fingerprint(self._params)
        # A base-adjusting config's checkpoints hold sampled entries of the residual weights: keep the params (a
        # reference) to sample them, and the samples once taken, keyed by (path, positions).
        adjusted = cfg.base_adjustment is not None
        self._values = dict(leaves_with_paths(params, is_leaf=quant.is_quantized)) if adjusted else {}
        self._samples: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
        self._layouts = dict(layouts) if layouts is not None else None
        self._plan_cache: tuple[dict[str, Layout], Any, dict[str, Any]] | None = None
        self._pending: list[int] = []  # async saves not yet waited for
        local = "://" not in self._directory
        # Process 0 is orbax's primary host: it alone creates, renames and deletes step directories.
        self._primary = local and not read_only and jax.process_index() == 0
        if local and not read_only:
            os.makedirs(self._directory, exist_ok=True)
        self._lock = Lock(self._directory) if self._primary else None
        try:
            self._incomplete = self._check_steps()
            self._manager = open_manager(
                self._directory,
                read_only=read_only,
                save_interval_steps=save_interval_steps,
                preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
                enable_async_checkpointing=async_save,
            )
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _check_steps(self) -> dict[int, str]:
        """The incomplete steps to skip (none left after a writer removed them); refuses another program's steps
        to a writer."""
        incomplete, foreign, names = scan_steps(self._directory)
        if foreign and not self._read_only:
            raise ValueError(
                f"checkpoint directory {self._directory!r} holds steps that are not jaxpeft adapter checkpoints: "
                f"{step_list(foreign)}. Saving beside them would mix two formats in one listing and pruning would "
                "delete them: save into another directory."
            )
        if not incomplete:
            self._empty_trash()
            return {}
        if self._primary:
            discard(self._directory, names)
            warnings.warn(
                f"removed incomplete checkpoint steps from {self._directory!r}: {step_list(incomplete)} (a "
                "deletion or copy was interrupted, e.g. by a kill during pruning); the complete steps are intact.",
                stacklevel=3,
            )
            return {}
        if self._read_only:
            warnings.warn(
                f"skipping incomplete checkpoint steps in {self._directory!r}: {step_list(incomplete)} (a "
                "deletion or copy was interrupted); they are left on disk (read_only) and the next writer removes "
                "them.",
                stacklevel=3,
            )
        return incomplete

    def _empty_trash(self, *, remove: bool = False) -> None:
        """Delete the steps pruned into the trash; only the primary writer touches step directories."""
        if self._primary:
            empty_trash(self._directory, remove=remove)

    @property
    def directory(self) -> str:
        """The absolute checkpoint root."""
        return self._directory

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The highest complete step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Every complete step, ascending (a step still being written asynchronously included)."""
        return complete_steps(self._manager, self._incomplete)

    def wait(self) -> None:
        """Block until pending async saves are on disk.

        Raises:
          OSError, RuntimeError: an async save failed (the message names the steps); those steps are not on disk
            and not listed, the earlier ones are intact, and the checkpointer stays usable.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            steps, self._pending = self._pending, []
            raise self._save_failed(steps, err) from err
        self._pending = []
        self._empty_trash()

    def close(self) -> None:
        """Wait for pending saves, release the manager and the directory's lock (raises as ``wait``)."""
        try:
            self.wait()
        finally:
            with contextlib.suppress(Exception):  # the error of a failed save was raised by `wait` already
                self._manager.close()
            self._empty_trash(remove=True)
            if self._lock is not None:
                self._lock.release()

    def _save_failed(self, steps: Sequence[int], err: BaseException) -> Exception:
        """The error for a failed save of ``steps`` (an ``OSError`` if the cause was one, else a ``RuntimeError``),
        after dropping those steps from the listing."""
        with contextlib.suppress(Exception):
            self._manager.reload()  # forget steps that never reached the disk
        message = (
            f"saving step {', '.join(map(str, steps)) or '?'} in {self._directory!r} failed: "
            f"{type(err).__name__}: {clip(err)}. That step is not on disk; the complete steps {self.all_steps()} are "
            "intact. Fix the cause (a full disk, a read-only, moved or removed directory) and save again."
        )
        if isinstance(err, OSError):
            return OSError(err.errno, message) if err.errno else OSError(message)
        return RuntimeError(message)

    def _where(self, step: int) -> str:
        return f"checkpoint step {step} in {self._directory!r}"

    def _planned(self, layouts: Mapping[str, Layout]) -> tuple[Any, dict[str, Any]]:
        """The adapters the config makes on the params, abstractly (``jax.eval_shape`` of the method's init), and
        their node table; the last result is cached, so saving every step re-traces nothing."""
        if self._plan_cache is None or self._plan_cache[0] != layouts:

            def make(params: Any, key: jax.Array) -> Any:
                # init_adjusted: a PiSSA/OLoRA config's adapters have the shapes of its plain init
                return method_init_adjusted(self._cfg, params, key=key, layouts=layouts)[1]

            expected = jax.eval_shape(make, self._params, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
            self._plan_cache = (dict(layouts), expected, node_table(expected))
        return self._plan_cache[1], self._plan_cache[2]

    # ------------------------------------------------------------------------------------------------ save

    def save(self, step: int, adapters: Any, opt_state: Any = None, *, extra: Any = None, force: bool = False) -> bool:
        """Save ``adapters`` (and ``opt_state``, ``extra``) as ``step``; returns whether a checkpoint was written.

        Checks first that ``adapters`` are exactly what the config makes on the params (paths, node types,
        array shapes and dtypes, layouts, static parts such as the scale), so that every saved step can be
        restored; nothing is written when a check fails. A step off ``save_interval_steps`` is skipped (False)
        unless ``force``. Nothing else is skipped silently: a step already saved is an error (never overwritten,
        ``force`` or not: the directory always keeps a complete copy of every step it lists), and so is a step
        below the latest (e.g. a run restarted into an old directory) unless ``force``. For a config that changes
        the base at init (``cfg.base_adjustment``: PiSSA, OLoRA) the step's metadata also records the residual
        fingerprint: each adjusted weight's shape, dtype and the bit patterns of 16 entries at fixed flat
        positions, gathered under ``jit`` from any sharding (taken once per checkpointer), so that a restore can
        refuse another base. With ``async_save`` the arrays are copied off the device before this returns and
        written in the background; call ``wait`` (or ``close``) before relying on the files.

        Args:
          step: the step number, a non-negative integer.
          adapters: the adapter tree.
          opt_state: the optimizer state (any pytree of arrays), or None.
          extra: any other trained pytree of arrays saved beside the adapters (a classifier head, the norms),
            or None.
          force: write even off the save interval, or below the latest step (``latest_step`` stays the highest
            step; ``max_to_keep`` keeps the most recently saved steps).

        Raises:
          TypeError: ``step`` is not an integer (a float, a bool, a string).
          ValueError: a negative ``step``; ``step`` already saved, or below the latest without ``force``; the
            adapters do not match the config on these params; a non-array leaf in ``adapters``, ``opt_state`` or
            ``extra``; a read-only checkpointer; a base-adjusting config over abstract ``params`` (the residual
            fingerprint needs the concrete residual weights).
          CheckpointLockedError: this writer's lock file was removed or replaced.
          OSError, RuntimeError: writing failed (the message names the step; earlier steps are intact).
        """
        args = self._prepare(step, adapters, opt_state, extra, force)
        if args is None:
            return False
        step = check_step(step)
        if self._lock is not None:
            self._lock.check()
        self._empty_trash()  # the steps pruned by earlier saves
        try:
            written = bool(self._manager.save(step, args=ocp.args.Composite(**args), force=True))
        except Exception as err:
            raise self._save_failed([step], err) from err
        if written and self._async:
            self._pending.append(step)
        return written

    def check(self, step: int, adapters: Any, opt_state: Any = None, *, extra: Any = None, force: bool = False) -> bool:
        """Run every check :meth:`save` runs and write nothing; returns whether ``save`` would write the step.

        For saving several things as one unit (``jaxpeft.adapter_sets``): check them all first, then save.

        Raises:
          As :meth:`save`, but never ``OSError`` (nothing is written).
        """
        return self._prepare(step, adapters, opt_state, extra, force) is not None

    def _prepare(self, step: Any, adapters: Any, opt_state: Any, extra: Any, force: bool) -> dict[str, Any] | None:
        """The orbax arguments of ``step`` after every check, or None for a step off the save interval."""
        if self._read_only:
            raise ValueError(
                f"this AdapterCheckpointer of {self._directory!r} is read-only; open one without read_only."
            )
        step = check_step(step)
        if not force and step % self._interval:
            return None
        self._check_new(step, force)
        return self._save_args(step, adapters, opt_state, extra)

    def delete(self, step: int) -> None:
        """Remove a saved ``step`` (after pending saves finish); a kill half-way leaves it unlisted, never half-listed.

        Raises:
          ValueError: a read-only checkpointer. FileNotFoundError: no such complete step.
        """
        if self._read_only:
            raise ValueError(
                f"this AdapterCheckpointer of {self._directory!r} is read-only; open one without read_only."
            )
        self.wait()
        step = resolve_step(self.all_steps(), self._incomplete, self._directory, step)
        if self._lock is not None:
            self._lock.check()
        self._manager.delete(step)  # renamed into the trash first (local directories), then deleted
        self._empty_trash()

    def _check_new(self, step: int, force: bool) -> None:
        """Raise when ``step`` is saved already, or (without ``force``) below the latest step."""
        steps = self.all_steps()
        if step in steps:
            raise ValueError(
                f"`step`={step} is already saved in {self._directory!r} (steps {steps}); checkpoints are never "
                f"overwritten, force=True included. Resume from the latest step ({steps[-1]}: restore() it and save "
                "the steps after it), save into a new directory, or delete that step's directory first."
            )
        if not force and steps and step < steps[-1]:
            raise ValueError(
                f"`step`={step} is below the latest step {steps[-1]} in {self._directory!r} (steps {steps}), so it "
                "would not be the latest: is this a run restarted into an old directory? Resume from the latest "
                "step (restore() it and save the steps after it), save into a new directory, or pass force=True to "
                "save it anyway."
            )

    def _save_args(self, step: int, adapters: Any, opt_state: Any, extra: Any) -> dict[str, Any]:
        """The orbax arguments of every item of a step, after checking the adapters and the leaves."""
        table = self._check_adapters(adapters)
        trees = {ADAPTERS: array_leaves(adapters, ADAPTERS)}
        tables: dict[str, Any] = {}
        for item, tree in ((OPT, opt_state), (EXTRA, extra)):
            flat = None if tree is None else array_leaves(tree, item)
            tables[item] = None if flat is None else shape_table(flat)
            if flat:  # an empty state (e.g. plain SGD's) is rebuilt from its `*_like` structure alone
                trees[item] = flat
        residual = self._residual_at_save(sorted(table))
        args: dict[str, Any] = {item: ocp.args.StandardSave(nested(flat)) for item, flat in trees.items()}
        meta = new_meta(step, self._config, table, self._fingerprint, residual=residual, **tables)
        args[META] = ocp.args.JsonSave(meta)
        return args

    def _sample(self, path: str, positions: Sequence[int]) -> dict[str, Any]:
        """The residual fingerprint of the param at ``path`` (concrete) at ``positions``; taken once per
        checkpointer."""
        key = (path, tuple(positions))
        if key not in self._samples:
            self._samples[key] = residual_entry(self._values[path], positions)
        return self._samples[key]

    def _residual_at_save(self, paths: Sequence[str]) -> dict[str, Any] | None:
        """The ``residual`` fingerprint of a step (None for a config that keeps the base): for each adjusted
        weight, its shape, dtype and the bit patterns of ``SAMPLES`` entries at fixed positions."""
        adjustment = self._cfg.base_adjustment
        if adjustment is None:
            return None
        abstract_at = [p for p in paths if not is_concrete(self._values[p])]
        if abstract_at:
            raise ValueError(
                f"`params` hold no values at {abstract_at[0]!r} (a {type(self._values[abstract_at[0]]).__name__}), but "
                f"`cfg` ({type(self._cfg).__name__} with {adjustment}) trains its adapters over the residual base "
                "weights its init made, and each checkpoint records a fingerprint of them (sampled entries of each "
                "adjusted weight) so that a restore can check it gets that base back; that needs their values. Open "
                "the AdapterCheckpointer with the concrete residual params that jaxpeft.init_adjusted returned (the "
                "params you train over), not a jax.eval_shape of them."
            )
        params = {p: self._sample(p, sample_positions(math.prod(self._values[p].shape))) for p in paths}
        return {"adjustment": adjustment, "params": params}

    def _check_adapters(self, adapters: Any) -> dict[str, Any]:
        """The node table of ``adapters`` after checking it equals the one the config makes on the params (the
        static parts but the config's ``restore_free`` fields included)."""
        banked = next((p for p, node in adapter_items(adapters) if node.bank_size is not None), None)
        if banked is not None:
            raise ValueError(
                f"`adapters` hold adapter banks (e.g. at {banked!r}, from jaxpeft.stack_adapters); a checkpoint holds "
                "the adapters one config makes. Save a bank as an adapter set, one member per adapter, committed as "
                "one step: jaxpeft.adapter_sets.save_adapter_set(directory, jaxpeft.unstack_adapters(bank), cfg, "
                "params, step=step); restore it with restore_adapter_set and jaxpeft.stack_adapters."
            )
        given = node_table(adapters)
        try:
            _, planned = self._planned({**layouts_of(adapters), **(self._layouts or {})})
        except ValueError as err:
            raise ValueError(
                "cannot check `adapters` against `cfg` on these params (if `cfg` selects a parameter that "
                f"`adapters` lack, they were made with another config): {err}"
            ) from err
        shapes, statics = node_diff(planned, given, self._cfg.restore_free, "adapter", "config", "in `adapters`")
        diff = shapes or statics
        if diff:
            raise ValueError(
                f"`adapters` are not what `cfg` ({type(self._cfg).__name__}) makes on these params: {listed(diff)}. "
                "Pass the config and params the adapters were initialised with."
            )
        return given

    # ------------------------------------------------------------------------------------------------ restore

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: the latest), checked as on restore."""
        return read_meta(self._manager, self._directory, self._resolve(step))

    def _resolve(self, step: Any) -> int:
        return resolve_step(self.all_steps(), self._incomplete, self._directory, step)

    def _unreadable(self, step: int, err: BaseException) -> ValueError:
        return ValueError(
            f"{self._where(step)} could not be read ({type(err).__name__}: {clip(err)}); files of the step are "
            "missing or were changed (e.g. a copy or deletion was interrupted). Restore another step: complete steps "
            f"are {self.all_steps()}."
        )

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
        check runs before any array is read; no leaf is left abstract; the base weights are not read, but for a
        config that changes the base at init (PiSSA, OLoRA), where a few sampled entries of each adjusted weight
        are read (once per checkpointer) and must equal the saved ones (``check_base``).

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
            ``fn(path, ShapeDtypeStruct) -> Sharding``. By default, when the ``params`` given to the
            checkpointer carry ``NamedSharding`` objects, the shardings derived from them on their mesh: each adapter
            array's from its base weight's (``jaxpeft.sharding.adapter_shardings``: LoRA's A on the weight's stack
            and fan-in axes, B on its stack and fan-out axes, the rank replicated), each ``extra`` leaf the
            sharding of the param at its path if it has that shape (else replicated), the optimizer state
            following both (``jaxpeft.sharding.optimizer_shardings``); so a step saved on one mesh restores onto
            the current one. Otherwise the first local device.
          check_base: compare the base fingerprint (paths, shapes, dtypes of every param) and, for a config that
            changes the base at init (PiSSA, OLoRA), the residual fingerprint: the saved entries of each adjusted
            weight (16 per weight at fixed positions, bit for bit) against the same entries of ``params``,
            which must then be concrete (the residual params ``jaxpeft.init_adjusted`` returned; restoring over
            the original weights would silently change the model). Turn off only to load adapters onto a base
            whose other leaves changed on purpose (e.g. cast to bf16), or to restore PiSSA/OLoRA adapters over
            abstract or other params (e.g. to convert them with ``jaxpeft.to_plain_lora``); the adapted paths and
            shapes, and the config's ``base_adjustment``, are checked regardless. A step of a base-adjusting
            config saved without the residual fingerprint (an older jaxpeft) restores with a warning.

        Raises:
          FileNotFoundError: no such step, or it is incomplete.
          TypeError: ``step`` is not an integer.
          ValueError: the step's metadata is missing, malformed or edited, or from another program or format
            version; the saved config, fingerprint or adapters' static parts differ from the current ones (the
            message names the fields or paths); the saved config's ``base_adjustment`` differs from the current
            one (``init='pissa'`` saved, ``'olora'`` or ``'kaiming'`` now, although ``init`` is otherwise
            restore-free); with ``check_base``, ``params`` are not the residual base a PiSSA/OLoRA step was
            trained over (the message names the path and the fixes: ``jaxpeft.init_adjusted`` with the same key,
            or ``jaxpeft.to_plain_lora``) or are abstract there; the on-disk arrays differ from the targets or
            cannot be read; a ``*_like`` tree does not match what was saved, or nothing was saved for it; a saved
            ``opt_state``/``extra`` with neither a target nor ``skip``; ``skip`` names an unknown item or one whose
            ``*_like`` is given; a leaf would stay abstract.
        """
        likes = {OPT: opt_state_like, EXTRA: extra_like}
        check_skip(skip, likes)
        self.wait()
        step = self._resolve(step)
        meta = read_meta(self._manager, self._directory, step)
        config = self._check_config(meta, step)
        if check_base:
            self._check_base(meta, step)
        expected = self._expected(meta, step)
        place = self._placement(step, sharding, expected, likes)
        targets = {ADAPTERS: adapter_target(expected, adapters_like, place)}
        for item, like in likes.items():
            if like is not None:
                targets[item] = aux_target(item, like, meta.get(item), self._where(step), place)
            elif meta.get(item) is not None and item not in skip:
                raise ValueError(
                    f"{self._where(step)} holds `{item}`; say how to restore it: pass {HOW[item]}, or "
                    f"skip=({item!r},) to leave it."
                )
        self._check_on_disk(step, targets)
        trees = self._read(step, targets)
        return Restored(step, trees[ADAPTERS], trees.get(OPT), config, trees.get(EXTRA))

    def _check_config(self, meta: Mapping[str, Any], step: int) -> MethodConfig:
        """The saved config, after checking it equals the current one but in the ``restore_free`` fields, and has
        the same ``base_adjustment`` (a restore-free ``init`` may not change the base the adapters mean over)."""
        changed = config_diff(self._cfg, meta["config"], self._config)
        if changed:
            raise ValueError(
                f"{self._where(step)} was saved with a different config: {listed(changed)}. Restore with the "
                "saved config (jaxpeft.checkpoint.read_config) or start a new directory."
            )
        config = self._saved_config(meta, step)
        saved, now = config.base_adjustment, self._cfg.base_adjustment
        if saved != now:
            plain = "no base adjustment (adapters over the original weights)"
            raise ValueError(
                f"{self._where(step)} was saved with {saved or plain}, `cfg` has {now or plain}. `init` may "
                "otherwise differ on restore, but not in how it changes the base: PiSSA/OLoRA adapters are trained "
                "over the residual base weights their init made (jaxpeft.init_adjusted), and mean something else "
                "over any other base. Restore with the saved config (jaxpeft.checkpoint.read_config) over the params "
                "it was trained on; to use PiSSA/OLoRA adapters over the original weights, convert them with "
                "jaxpeft.to_plain_lora."
            )
        return config

    def _check_base(self, meta: Mapping[str, Any], step: int) -> None:
        """Raise when the base fingerprint (paths, shapes, dtypes) or, for a base-adjusting config, the residual
        fingerprint (sampled entries of each adjusted weight) differs from the current params'."""
        if meta["base"]["digest"] != self._fingerprint["digest"]:
            diff = diff_table(meta["base"]["params"], self._fingerprint["params"], "base param shape, dtype")
            if not diff:  # read_meta checks the digest against its table: only a hash collision gets here
                diff = ["the digests differ although every path, shape and dtype agrees (the metadata was edited)"]
            raise ValueError(
                f"{self._where(step)} was saved for a different base model: {listed(diff)}. Load the base model "
                "it was trained on (or pass check_base=False if only non-adapted leaves changed on purpose)."
            )
        if self._cfg.base_adjustment is not None:
            self._check_residual(meta, step)

    def _check_residual(self, meta: Mapping[str, Any], step: int) -> None:
        """Raise when the params are abstract or not the residual base the step's adapters were trained over (its
        sampled entries differ); warn for a step saved without the fingerprint (an older jaxpeft)."""
        residual = meta.get("residual")
        if residual is None:
            warnings.warn(
                f"{self._where(step)} holds {self._cfg.base_adjustment} adapters but no fingerprint of the residual "
                "base they were trained over (an older jaxpeft saved it), so restore cannot check that `params` are "
                "that base: make sure they are the params jaxpeft.init_adjusted returned, not the original weights.",
                stacklevel=4,
            )
            return
        made = f"the residual base that {residual['adjustment']} made (jaxpeft.init_adjusted)"
        saved: dict[str, Any] = residual["params"]
        abstract_at = [p for p in sorted(saved) if p in self._values and not is_concrete(self._values[p])]
        if abstract_at:
            raise ValueError(
                f"{self._where(step)}: the adapters at step {step} were trained over {made}, and restore checks "
                "sampled entries of each adjusted weight against `params`, but `params` hold no values at "
                f"{abstract_at[0]!r} (a {type(self._values[abstract_at[0]]).__name__}). Pass the concrete residual "
                "params, or check_base=False to restore without this check (e.g. to convert the adapters with "
                "jaxpeft.to_plain_lora)."
            )
        current = {p: self._sample(p, e["positions"]) for p, e in saved.items() if p in self._values}
        diff = residual_diff(saved, current)
        if diff:
            raise ValueError(
                f"{self._where(step)}: the adapters at step {step} were trained over {made}; these params are not "
                f"it ({listed(diff)}). Restore over the residual params: rebuild them with jaxpeft.init_adjusted(cfg, "
                "original_params, key=<the same key>) or save them with your checkpoint; or, to use the adapters "
                "over the original weights, convert them with jaxpeft.to_plain_lora(cfg, trained, initial) (restore "
                "them with check_base=False for that)."
            )

    def _saved_config(self, meta: Mapping[str, Any], step: int) -> MethodConfig:
        try:
            config: MethodConfig = type(self._cfg).from_dict(meta["config"])
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{self._where(step)}: its saved config is invalid ({err}); the metadata was edited or written by "
                "another version of the method. Restore another step."
            ) from None
        return config

    def _expected(self, meta: Mapping[str, Any], step: int) -> Any:
        """The abstract adapter tree of the method's init, after checking that its node table is the saved one."""
        layouts = self._layouts
        if layouts is None:
            layouts = {p: Layout(**info["layout"]) for p, info in meta["adapters"].items()}
        try:
            expected, table = self._planned(layouts)
        except ValueError as err:
            raise ValueError(f"{self._where(step)}: the current config does not plan on these params: {err}") from err
        diff, statics = node_diff(meta["adapters"], table, self._cfg.restore_free, "adapter", "checkpoint", "now")
        if diff:
            raise ValueError(
                f"{self._where(step)} holds adapters that the current config does not make on these params: "
                f"{listed(diff)}. Restore on the base model it was trained on, with the layouts it was saved with."
            )
        if statics:
            raise ValueError(
                f"{self._where(step)} holds adapters whose static parts differ from what the current config gives "
                f"them: {listed(statics)}. The configs compare equal but assign other values (e.g. the same pattern "
                "entries in another order, where the first match wins): restore with the saved config "
                "(jaxpeft.checkpoint.read_config)."
            )
        return expected

    def _placement(self, step: int, sharding: ShardingSpec, expected: Any, likes: Mapping[str, Any]) -> Placement:
        """Where leaves that no ``*_like`` tree places go: ``sharding``, else derived from the params' shardings."""
        if sharding is not None or self._placed is None:
            return Placement(sharding, {})
        try:
            return Placement(None, derive(self._placed, expected, likes))
        except ValueError as err:
            raise ValueError(
                f"{self._where(step)}: cannot derive restore shardings from the NamedShardings of `params` ({err}); "
                "pass `sharding=`, or `adapters_like` (and `opt_state_like`, `extra_like`) with shardings."
            ) from err

    def _check_on_disk(self, step: int, targets: Mapping[str, Target]) -> None:
        """Raise when orbax's on-disk array metadata differs from the restore targets (a damaged step)."""
        try:
            disk = self._manager.item_metadata(step)
        except Exception as err:
            raise self._unreadable(step, err) from err
        for item, target in targets.items():
            if not target.arrays:
                continue
            tree = getattr(disk.get(item), "tree", None)  # None: the item is missing on disk
            found = {p: shape_dtype(x) for p, x in leaves_with_paths(tree)}
            diff = diff_table(found, shape_table(target.arrays), f"on-disk {item} array", right="expected")
            if diff:
                raise ValueError(f"{self._where(step)}: on-disk {item} arrays differ: {listed(diff)}.")

    def _read(self, step: int, targets: Mapping[str, Target]) -> dict[str, Any]:
        """Every item of ``step`` read into its target and rebuilt into its structure."""
        args = {item: ocp.args.StandardRestore(nested(t.arrays)) for item, t in targets.items() if t.arrays}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as err:
            raise self._unreadable(step, err) from err
        return {item: t.rebuild(restored[item] if item in args else {}, item, step) for item, t in targets.items()}


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
    written off the save interval and below the latest step (``force=True``), but a step already saved is an
    error, as for :meth:`AdapterCheckpointer.save`. For a training loop keep one :class:`AdapterCheckpointer`
    open instead.
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
    ``configs``. The directory is only read (incomplete steps are skipped).

    Raises:
      FileNotFoundError: no such directory or step; TypeError: ``step`` is not an integer; ValueError: the
        step's metadata or saved config is missing, malformed or unknown (the message names the file).
    """
    path = _absolute(directory)
    manager = open_manager(path, read_only=True)
    try:
        incomplete = scan_steps(path)[0]
        step = resolve_step(complete_steps(manager, incomplete), incomplete, path, step)
        meta = read_meta(manager, path, step)
    finally:
        manager.close()
    try:
        return config_from_dict(meta["config"], configs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint step {step} in {path!r}: {err}") from None
