"""jaxpeft.checkpoint under faults and bad input: one writer per directory, saves that never do nothing silently,
kills during pruning, the adapters' static parts, damaged or foreign metadata, failing saves, and property tests
over garbage metadata and step values. The checkpoint guarantees of docs/guarantees.md mirror these tests."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _ckpt_faults_worker import filled
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import jaxpeft
import jaxpeft.checkpoint as ckpt_lib

WORKER = os.path.join(os.path.dirname(__file__), "_ckpt_faults_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS, CFG, _ = filled(0.0)


def _adapters(value):
    return filled(float(value))[2]


def _values(adapters):
    """The distinct values of every adapter element (one value: the tree came from one save)."""
    return {float(v) for leaf in jax.tree.leaves(adapters) for v in np.unique(np.asarray(leaf))}


def _save(directory, steps, **options):
    with ckpt_lib.AdapterCheckpointer(directory, CFG, PARAMS, async_save=False, max_to_keep=None, **options) as ckpt:
        for step in steps:
            assert ckpt.save(step, _adapters(step))
    return str(directory)


def _worker(mode, directory, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, WORKER, mode, str(directory), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(directory, **record):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ckpt_lib.LOCK_FILE), "w") as f:
        json.dump(record, f)


def _lock_record(directory):
    with open(os.path.join(directory, ckpt_lib.LOCK_FILE)) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ one writer


def test_a_second_writer_is_refused_until_the_first_closes(tmp_path):
    with ckpt_lib.AdapterCheckpointer(tmp_path, CFG, PARAMS, async_save=False) as first:
        first.save(1, _adapters(1))
        record = _lock_record(tmp_path)
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
        with pytest.raises(
            ckpt_lib.CheckpointLockedError,
            match=r"is in use by another writer: another AdapterCheckpointer of this process .*jaxpeft\.lock\)\. A "
            r"directory takes one writer.*read_only=True",
        ):
            ckpt_lib.AdapterCheckpointer(tmp_path, CFG, PARAMS)
        # A reader takes no lock: it reads beside the writer and leaves the lock alone.
        assert ckpt_lib.restore_adapters(tmp_path, CFG, PARAMS).step == 1
        assert _lock_record(tmp_path) == record
    assert not os.path.exists(tmp_path / ckpt_lib.LOCK_FILE)  # released on close
    with ckpt_lib.AdapterCheckpointer(tmp_path, CFG, PARAMS, async_save=False) as second:
        assert second.save(2, _adapters(2))


def test_stale_locks_are_taken_over_live_and_foreign_ones_are_not(tmp_path):
    here = socket.gethostname()
    stale_locks = [{"pid": _dead_pid(), "host": here, "started": "yesterday"}]  # its process died
    if sys.platform.startswith("linux"):  # a reused pid: the process start time (from /proc) differs
        stale_locks.append({"pid": os.getppid(), "host": here, "started": "yesterday", "process_start": "1"})
    for stale in stale_locks:
        _write_lock(tmp_path, **stale)
        with ckpt_lib.AdapterCheckpointer(tmp_path, CFG, PARAMS):
            assert _lock_record(tmp_path)["pid"] == os.getpid()
    for record, owner in [
        ({"pid": os.getppid(), "host": here, "started": "earlier"}, rf"pid {os.getppid()} on host '{here}'"),
        ({"pid": 1234, "host": "elsewhere", "started": "earlier"}, r"pid 1234 on host 'elsewhere' since 'earlier'"),
        ("garbage", r"an unknown owner \(the lock file holds 'garbage'\)"),
    ]:
        if isinstance(record, dict):
            _write_lock(tmp_path, **record)
        else:
            (tmp_path / ckpt_lib.LOCK_FILE).write_text(record)
        with pytest.raises(ckpt_lib.CheckpointLockedError, match=rf"{owner}.*If that process is gone .*delete the"):
            ckpt_lib.AdapterCheckpointer(tmp_path, CFG, PARAMS)
        assert (tmp_path / ckpt_lib.LOCK_FILE).exists()  # a refused writer leaves the owner's lock in place


def test_a_writer_that_lost_its_lock_saves_nothing(tmp_path):
    with ckpt_lib.AdapterCheckpointer(tmp_path, CFG, PARAMS, async_save=False) as ckpt:
        os.remove(tmp_path / ckpt_lib.LOCK_FILE)  # someone "cleaned up" the directory
        with pytest.raises(ckpt_lib.CheckpointLockedError, match=r"lost its lock on .*Nothing was saved"):
            ckpt.save(1, _adapters(1))
        assert ckpt.all_steps() == []


def test_only_process_zero_of_a_job_takes_the_lock(tmp_path, monkeypatch):
    """A multi-process job is one writer: orbax's primary host (process 0) holds the lock for all processes."""
    _write_lock(tmp_path, pid=os.getppid(), host=socket.gethostname(), started="earlier")  # held by process 0
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    ckpt_lib.AdapterCheckpointer(tmp_path / "sub", CFG, PARAMS).close()
    assert not os.path.exists(tmp_path / "sub" / ckpt_lib.LOCK_FILE)
    ckpt_lib.AdapterCheckpointer(tmp_path, CFG, PARAMS).close()  # the other processes open beside it
    assert _lock_record(tmp_path)["pid"] == os.getppid()


def test_two_processes_in_one_directory_exactly_one_writes(tmp_path):
    """Both start at once on a stale lock: one takes it over and saves steps 1..6, the other is refused; every
    step restores holding one run's values only."""
    directory, go = tmp_path / "run", tmp_path / "GO"
    _write_lock(directory, pid=_dead_pid(), host=socket.gethostname(), started="yesterday")
    procs = {run: _worker("writer", directory, run, go) for run in (1, 2)}
    for proc in procs.values():
        assert proc.stdout.readline().strip() == "READY", proc.communicate()
    go.write_text("")
    outputs = {run: proc.communicate(timeout=120) for run, proc in procs.items()}
    for run, (out, err) in outputs.items():
        assert procs[run].returncode == 0, out + err
    saved = [run for run, (out, _) in outputs.items() if "SAVED" in out]
    locked = [run for run, (out, _) in outputs.items() if out.startswith("LOCKED")]
    assert len(saved) == 1 and len(locked) == 1, outputs
    assert "is in use by another writer" in outputs[locked[0]][0]
    with ckpt_lib.AdapterCheckpointer(directory, CFG, PARAMS, read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3, 4, 5, 6]
        for step in ckpt.all_steps():
            assert _values(ckpt.restore(step).adapters) == {saved[0] * 100.0 + step}
    assert not os.path.exists(directory / ckpt_lib.LOCK_FILE)


# ------------------------------------------------------------------------------------------------ saves


def test_saves_never_skip_silently_except_off_the_interval(tmp_path):
    with ckpt_lib.AdapterCheckpointer(tmp_path, CFG, PARAMS, save_interval_steps=2, max_to_keep=None) as ckpt:
        assert ckpt.save(4, _adapters(4))
        assert not ckpt.save(3, _adapters(3))  # off the interval: the one silent skip, as asked for
        for force in (False, True):  # never overwritten: the directory always holds a complete step 4
            with pytest.raises(
                ValueError,
                match=r"`step`=4 is already saved in .* \(steps \[4\]\); checkpoints are never overwritten, force=True "
                r"included\. Resume from the latest step \(4: restore\(\) it .*new directory, or delete",
            ):
                ckpt.save(4, _adapters(5), force=force)
        with pytest.raises(
            ValueError,
            match=r"`step`=2 is below the latest step 4 in .* \(steps \[4\]\).*restarted into an old directory\? "
            r"Resume from the latest step .*new directory, or pass force=True",
        ):
            ckpt.save(2, _adapters(2))
        assert ckpt.save(2, _adapters(2), force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4] and ckpt.latest_step() == 4
    for step in (2, 4):
        assert _values(ckpt_lib.restore_adapters(tmp_path, CFG, PARAMS, step=step).adapters) == {float(step)}
    with pytest.raises(ValueError, match=r"`step`=4 is already saved"):
        ckpt_lib.save_adapters(tmp_path, 4, _adapters(4), CFG, PARAMS)


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        (-1, ValueError, r"`step`=-1; expected a non-negative integer"),
        (2.7, TypeError, r"`step`=2\.7 is a float; .*2\.7 would silently become step 2"),
        (2.0, TypeError, r"`step`=2\.0 is a float"),
        (True, TypeError, r"`step`=True is a bool"),
        ("3", TypeError, r"`step`='3' is a str"),
        (np.float32(1), TypeError, r"is a float32"),
        (jnp.asarray([1, 2]), TypeError, r"is a ArrayImpl"),
    ],
)
def test_step_must_be_a_non_negative_integer(tmp_path, step, error, message):
    directory = _save(tmp_path, [2])
    with ckpt_lib.AdapterCheckpointer(directory, CFG, PARAMS) as ckpt:
        with pytest.raises(error, match=message):
            ckpt.save(step, _adapters(0))
        with pytest.raises(error, match=message):
            ckpt.restore(step)
        assert ckpt.all_steps() == [2]
    with pytest.raises(error, match=message):
        ckpt_lib.read_config(directory, step)


# ------------------------------------------------------------------------------------------------ pruning


def test_kill_during_pruning_leaves_no_half_deleted_step(tmp_path):
    """The worker saves steps 1..3 keeping 2 and is killed after the first file deletion of step 1's pruning."""
    directory = tmp_path / "run"
    proc = _worker("prune-kill", directory)
    deadline = time.monotonic() + 90
    while not (tmp_path / "IN_DELETE").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the worker never started deleting"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    with ckpt_lib.AdapterCheckpointer(directory, CFG, PARAMS, read_only=True) as ckpt:  # no warning: no damage
        assert ckpt.all_steps() == [2, 3]
        assert _values(ckpt.restore().adapters) == {3.0}
    with ckpt_lib.AdapterCheckpointer(directory, CFG, PARAMS, max_to_keep=2, async_save=False) as ckpt:  # dead lock
        assert ckpt.all_steps() == [2, 3]
        assert ckpt.save(4, _adapters(4))
    assert sorted(os.listdir(directory)) == ["3", "4"]  # the pruned steps and the trash are gone


def _all_files(path):
    for root, _, files in os.walk(path):
        for name in files:
            os.remove(os.path.join(root, name))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda step: os.remove(os.path.join(step, "meta", "metadata")), r"meta/metadata is missing"),
        (lambda step: os.remove(os.path.join(step, "adapters", "_METADATA")), r"adapters/_METADATA is missing"),
        (_all_files, r"meta/metadata is missing"),
    ],
)
def test_an_incomplete_step_is_skipped_by_readers_and_removed_by_writers(tmp_path, damage, why):
    """The state an interrupted deletion leaves (here: made directly): the step is never listed nor restored."""
    directory = _save(tmp_path, [1, 2, 3])
    damage(os.path.join(directory, "1"))
    with pytest.warns(UserWarning, match=rf"skipping incomplete checkpoint steps in .*: step 1: {why} .*read_only"):
        ckpt = ckpt_lib.AdapterCheckpointer(directory, CFG, PARAMS, read_only=True)
    with ckpt:
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        assert _values(ckpt.restore().adapters) == {3.0}
        with pytest.raises(
            FileNotFoundError, match=rf"step 1 in .* is incomplete \({why}\); complete steps are \[2, 3"
        ):
            ckpt.restore(1)
    assert os.path.isdir(os.path.join(directory, "1"))  # a reader changes nothing
    with pytest.warns(UserWarning, match=rf"removed incomplete checkpoint steps from .*: step 1: {why}"):
        ckpt_lib.AdapterCheckpointer(directory, CFG, PARAMS).close()
    assert sorted(os.listdir(directory)) == ["2", "3"]


def test_a_missing_array_file_is_reported_with_the_step(tmp_path):
    """Array data files deleted (a step damaged in a way the opening check cannot see): the restore of that step
    names it and the complete steps; the latest still restores."""
    proc = _worker("read-damaged", tmp_path / "run")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert re.search(
        r"^ERROR ValueError: checkpoint step 1 in .* could not be read \(ValueError: NOT_FOUND: .*\); files of the "
        r"step are missing or were changed .*Restore another step: complete steps are \[1, 2\]\.$",
        out,
        re.MULTILINE,
    ), out
    assert "LATEST 2 [2.0]" in out, out


# ------------------------------------------------------------------------------------------------ static parts


def test_pattern_order_that_changes_scales_is_refused(tmp_path):
    """Same keys in another order compare equal as configs, but first-match-wins gives other scales."""
    saved = jaxpeft.LoraConfig(rank=2, alpha=4.0, targets=["inp", "up"], alpha_pattern={"up": 8.0, "kernel": 2.0})
    reordered = jaxpeft.LoraConfig(rank=2, alpha=4.0, targets=["inp", "up"], alpha_pattern={"kernel": 2.0, "up": 8.0})
    assert saved.to_dict() == reordered.to_dict()
    adapters = jaxpeft.init(saved, PARAMS, key=jax.random.key(0), layouts=jaxpeft.layouts_of(_adapters(0)))
    ckpt_lib.save_adapters(tmp_path, 1, adapters, saved, PARAMS)
    with pytest.raises(
        ValueError,
        match=r"holds adapters whose static parts differ from what the current config gives them: 'layers/up/kernel' "
        r"scale: checkpoint 4\.0, now 1\.0\. .*first match wins.*read_config",
    ):
        ckpt_lib.restore_adapters(tmp_path, reordered, PARAMS)
    assert ckpt_lib.restore_adapters(tmp_path, saved, PARAMS).adapters["layers"]["up"]["kernel"].scale == 4.0
    with ckpt_lib.AdapterCheckpointer(tmp_path, saved, PARAMS, read_only=True) as ckpt:
        meta = ckpt.read_meta()  # each node's non-array fields but the layout, JSON-encoded
    assert meta["version"] == 3
    assert meta["adapters"]["layers/up/kernel"]["static"] == {"scale": 4.0, "dropout": 0.0}
    # A save is refused too when the adapters carry other static parts than the config gives them.
    refused = r"`adapters` are not what `cfg` .*'layers/up/kernel' scale: config 1\.0, in `adapters` 4\.0"
    with (
        ckpt_lib.AdapterCheckpointer(tmp_path / "other", reordered, PARAMS) as ckpt,
        pytest.raises(ValueError, match=refused),
    ):
        ckpt.save(1, adapters)


def test_format_version_2_still_restores(tmp_path):
    directory = _save(tmp_path, [1])
    path = os.path.join(directory, "1", "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["version"] = 2
    for entry in meta["adapters"].values():
        del entry["static"]  # version 2 stored no static parts
    with open(path, "w") as f:
        json.dump(meta, f)
    assert _values(ckpt_lib.restore_adapters(directory, CFG, PARAMS).adapters) == {1.0}


# ------------------------------------------------------------------------------------------------ damaged metadata


def _edit(meta, what):
    if what == "no base":
        del meta["base"]
    elif what == "digest":
        meta["base"]["digest"] = "0" * 64
    elif what == "version":
        meta["version"] = 9
    elif what == "format":
        meta["format"] = "someone.else"
    elif what == "step":
        meta["step"] = 7
    elif what == "layout":
        meta["adapters"]["inp/kernel"]["layout"]["kind"] = "dense!"
    return meta


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("truncated", r"its metadata file .*/1/meta/metadata is not valid JSON \(.*\); it was truncated or edited"),
        (
            "list",
            r"is not a jaxpeft adapter checkpoint: its metadata \(.*/1/meta/metadata\) has format none \(it is a ",
        ),
        ("no base", r"its metadata \(.*/1/meta/metadata\) is malformed: `base` is missing, expected \{\"digest\""),
        ("digest", r"malformed: `base\.digest` is not the sha256 of `base\.params` .*edited"),
        (
            "version",
            r"has format version 9 \(.*/1/meta/metadata\); this jaxpeft reads versions \[2, 3\]\. Read it with",
        ),
        ("format", r"is not a jaxpeft adapter checkpoint: .* has format 'someone\.else', expected 'jaxpeft\."),
        ("step", r"malformed: `step` is 7, expected 1"),
        ("layout", r"malformed: `adapters`\['inp/kernel'\] `layout` is .*: `kind`='dense!' is not one of"),
    ],
)
def test_damaged_metadata_is_a_jaxpeft_error(tmp_path, what, message):
    directory = _save(tmp_path, [1])
    path = os.path.join(directory, "1", "meta", "metadata")
    with open(path) as f:
        text = f.read()
    if what == "truncated":
        text = text[: len(text) // 2]
    elif what == "list":
        text = "[1, 2]"
    else:
        text = json.dumps(_edit(json.loads(text), what))
    with open(path, "w") as f:
        f.write(text)
    for read in (
        lambda: ckpt_lib.restore_adapters(directory, CFG, PARAMS),
        lambda: ckpt_lib.read_config(directory),
    ):
        with pytest.raises(ValueError, match=rf"checkpoint step 1 in '{directory}'.*{message}"):
            read()


def test_a_foreign_orbax_directory_is_named(tmp_path):
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.ones(3)})))
    message = r"checkpoint step 5 in .* is not a jaxpeft adapter checkpoint: it has no metadata file .*\['_CHECK"
    with pytest.raises(ValueError, match=message):
        ckpt_lib.restore_adapters(tmp_path, CFG, PARAMS)
    with pytest.raises(ValueError, match=message):
        ckpt_lib.read_config(tmp_path)
    with pytest.raises(
        ValueError, match=r"holds steps that are not jaxpeft adapter checkpoints: step 5: .*pruning would delete them"
    ):
        ckpt_lib.AdapterCheckpointer(tmp_path, CFG, PARAMS)
    assert sorted(os.listdir(tmp_path)) == ["5"]  # untouched, no lock left behind


# ------------------------------------------------------------------------------------------------ failing saves


def test_a_failed_save_raises_and_the_process_exits_promptly(tmp_path):
    """The directory refuses new entries (as a read-only one would), then the step's final rename fails in the
    background: each raises naming the step; the checkpointer stays usable; the process exits at once."""
    proc = _worker("save-fail", tmp_path / "run")
    out, err = proc.communicate(timeout=120)
    ended = time.time()
    assert proc.returncode == 0, out + err
    lines = out.splitlines()
    failures = [line for line in lines if line.startswith("FAILED")]
    assert [line.split()[1] for line in failures] == ["mkdir", "rename"], out
    for line in failures:
        assert "PermissionError: [Errno 13] saving step 1 in " in line and "the complete steps [0] are intact" in line
    assert [line for line in lines if line.startswith("STEPS")] == ["STEPS [0]", "STEPS [0, 1]"]
    done = float(next(line for line in lines if line.startswith("DONE")).split()[1])
    assert ended - done < 15, f"the process took {ended - done:.0f} s to exit after the failed saves"


# ------------------------------------------------------------------------------------------------ properties

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def property_dir(tmp_path_factory):
    directory = _save(tmp_path_factory.mktemp("property"), [1])
    with open(os.path.join(directory, "1", "meta", "metadata")) as f:
        return directory, f.read()


def _paths(tree, prefix=()):
    """Every key path into a JSON tree (the places a mutation may hit)."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


def _like(value):
    """Values of the same JSON type as ``value`` (they pass a type check and reach the deeper ones)."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-1, 20)
    if isinstance(value, float):
        return st.floats(allow_nan=True)
    if isinstance(value, str):
        return st.sampled_from(["float32", "lora", "dense", "kaiming", "inp", "a"]) | st.text(max_size=4)
    return _JSON


@st.composite
def _garbage_metadata(draw, text):
    kind = draw(st.sampled_from(["same type", "same type", "any value", "delete", "truncate", "text"]))
    if kind == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "text":
        return draw(st.text(max_size=20))
    meta = json.loads(text)
    path = draw(st.sampled_from([p for p in _paths(meta) if p]))
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(_like(parent[path[-1]]) if kind == "same type" else _JSON)
    return json.dumps(meta)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_metadata_restores_or_raises_a_named_error(property_dir, data):
    directory, text = property_dir
    garbage = data.draw(_garbage_metadata(text))
    with open(os.path.join(directory, "1", "meta", "metadata"), "w") as f:
        f.write(garbage)
    for read in (
        lambda: ckpt_lib.restore_adapters(directory, CFG, PARAMS),
        lambda: ckpt_lib.read_config(directory),
    ):
        try:
            read()
            event("read")
        except (ValueError, TypeError, FileNotFoundError) as err:
            assert directory in str(err), str(err)
            event(f"{type(err).__name__}: {str(err).replace(directory, 'DIR')[:70]}")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    step=st.integers(-(2**70), 2**70)
    | st.integers(0, 12)
    | st.floats()
    | st.booleans()
    | st.text(max_size=3)
    | st.none()
    | st.sampled_from([np.int8(3), np.uint64(5), np.float16(2), np.bool_(False), jnp.asarray(4), jnp.asarray(1.0)])
)
def test_any_step_value_saves_or_raises_a_named_error(tmp_path_factory, step):
    directory = tmp_path_factory.mktemp("steps")
    with ckpt_lib.AdapterCheckpointer(directory, CFG, PARAMS, async_save=False) as ckpt:
        try:
            assert ckpt.save(step, _adapters(1)) is True
            assert ckpt.all_steps() == [int(step)]
            assert ckpt.restore(step).step == int(step)
            event("saved")
        except (ValueError, TypeError) as err:
            assert str(err).startswith("`step`="), str(err)
            event(type(err).__name__)
