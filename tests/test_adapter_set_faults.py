"""jaxpeft.adapter_sets under faults: a set is saved, restored, exported and imported as one unit.

Kills (``SIGKILL`` in a subprocess, at chosen points), refused members, failing writes, flipped bytes, edited
indexes and old-format sets; a property test over sequences of saves with failures. The adapter-set
guarantees mirror these tests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import jax
import pytest
from _set_worker import CFG, NAMES, named, params, values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxpeft
from jaxpeft import adapter_sets
from jaxpeft.checkpoint import AdapterCheckpointer
from tests.test_hf_faults import _snapshot as file_bytes

WORKER = os.path.join(os.path.dirname(__file__), "_set_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARAMS = params()


def expected(step):
    return {n: step * 100.0 + k for k, n in enumerate(NAMES)}


def restored(directory, **kwargs):
    return values(adapter_sets.restore_adapter_set(directory, PARAMS, **kwargs)[0])


def imported(directory):
    return values(adapter_sets.import_adapter_set(directory, PARAMS, lambda m: m)[0])


def snapshot(directory):
    """``{relative path: sha256}`` of every file under ``directory``."""
    return {path: hashlib.sha256(data).hexdigest() for path, data in file_bytes(directory).items()}


def kill_worker(mode, directory, kill_at):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, WORKER, mode, str(directory), str(kill_at)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def committed(directory):
    with open(os.path.join(directory, adapter_sets.INDEX_NAME)) as f:
        return [c["step"] for c in json.load(f)["commits"]]


# ------------------------------------------------------------------------------------------------ kills


@pytest.mark.parametrize("kill_at", ["member-1", "member-2", "commit"])
def test_a_kill_during_a_set_save_restores_the_previous_commit_for_every_member(tmp_path, kill_at):
    """Killed while saving step 3 (after 1 or 2 of 3 members, or just before the index): step 2 for all."""
    directory = str(tmp_path / "set")
    kill_worker("save-kill", directory, kill_at)
    assert committed(directory) == [1, 2]
    assert restored(directory) == expected(2)
    with pytest.raises(FileNotFoundError, match=r"`step`=3 is not a committed step .* committed steps are \[1, 2\]"):
        restored(directory, step=3)
    adapter_sets.save_adapter_set(directory, named(3), CFG, PARAMS, step=3)  # the torn leftovers are replaced
    assert restored(directory) == expected(3) and committed(directory) == [1, 2, 3]


@pytest.mark.parametrize("kill_at", ["0", "1", "7", "commit"])
def test_a_kill_during_a_set_export_never_imports_a_mixed_set(tmp_path, kill_at):
    """Killed before any move, after the index moved out, inside the second member's swap, before the commit."""
    directory = str(tmp_path / "hf")
    kill_worker("export-kill", directory, kill_at)
    if kill_at == "0":
        assert imported(directory) == expected(1)
    else:
        with pytest.raises(FileNotFoundError, match=r"an export of this adapter set .* was interrupted.*again"):
            imported(directory)
    adapter_sets.export_adapter_set(directory, named(2), CFG, PARAMS, lambda m: m)
    assert imported(directory) == expected(2)
    assert sorted(os.listdir(directory)) == [adapter_sets.INDEX_NAME, *NAMES]


# ------------------------------------------------------------------------------------------------ refusals, errors


def test_a_refused_member_writes_nothing(tmp_path):
    """The second member's adapters are not what its config makes: the first is not written either."""
    ckpt, hf = str(tmp_path / "set"), str(tmp_path / "hf")
    adapter_sets.save_adapter_set(ckpt, named(1), CFG, PARAMS, step=1)
    adapter_sets.export_adapter_set(hf, named(1), CFG, PARAMS, lambda m: m)
    before = snapshot(ckpt), snapshot(hf)
    rank4 = jaxpeft.LoraConfig(rank=4, alpha=4, targets=["hid", "out"])
    configs = {"m0": CFG, "m1": rank4, "m2": CFG}
    with pytest.raises(ValueError, match=r"not what `cfg` .* makes on these params"):
        adapter_sets.save_adapter_set(ckpt, named(2), configs, PARAMS, step=2)
    with pytest.raises(ValueError, match="rank"):
        adapter_sets.export_adapter_set(hf, named(2), configs, PARAMS, lambda m: m)
    assert (snapshot(ckpt), snapshot(hf)) == before
    assert restored(ckpt) == expected(1) and imported(hf) == expected(1)


def test_a_failing_write_puts_the_previous_set_back(tmp_path, monkeypatch):
    ckpt, hf = str(tmp_path / "set"), str(tmp_path / "hf")
    adapter_sets.save_adapter_set(ckpt, named(1), CFG, PARAMS, step=1)
    adapter_sets.export_adapter_set(hf, named(1), CFG, PARAMS, lambda m: m)
    before = snapshot(hf)
    real, calls = AdapterCheckpointer.save, []

    def failing_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AdapterCheckpointer, "save", failing_second)
    with pytest.raises(OSError, match="disk full"):
        adapter_sets.save_adapter_set(ckpt, named(2), CFG, PARAMS, step=2)
    monkeypatch.setattr(adapter_sets, "_write_index", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        adapter_sets.export_adapter_set(hf, named(2), CFG, PARAMS, lambda m: m)
    monkeypatch.undo()
    assert snapshot(hf) == before and imported(hf) == expected(1)
    assert restored(ckpt) == expected(1) and committed(ckpt) == [1]
    adapter_sets.save_adapter_set(ckpt, named(2), CFG, PARAMS, step=2)  # m0's torn step 2 is replaced
    assert restored(ckpt) == expected(2)


@pytest.mark.parametrize("name", [".adapter_set.json.tmp", ".hidden", "a/b", "", adapter_sets.INDEX_NAME])
def test_names_that_cannot_be_members_are_refused_before_writing(tmp_path, name):
    tree = named(1)
    bad = {"m0": tree["m0"], name: tree["m1"]}
    for write in (
        lambda: adapter_sets.save_adapter_set(tmp_path / "set", bad, CFG, PARAMS),
        lambda: adapter_sets.export_adapter_set(tmp_path / "hf", bad, CFG, PARAMS, lambda m: m),
    ):
        with pytest.raises(ValueError, match=f"adapter name {name!r} in `named`"):
            write()
    assert not os.path.exists(tmp_path / "set") and not os.path.exists(tmp_path / "hf")


def _edit_index(directory, edit):
    path = os.path.join(directory, adapter_sets.INDEX_NAME)
    with open(path) as f:
        index = json.load(f)
    edit(index)
    with open(path, "w") as f:
        json.dump(index, f)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda i: i.update(names=["m0", "m0", "m2"]), r"names the adapters \['m0'\] more than once"),
        (lambda i: i.update(names=[".x", "m1", "m2"]), r"adapter name '.x'"),
        (lambda i: i.update(format="other"), "describes a set of format 'other'"),
        (lambda i: i.update(version=9), "`version` is 9; this jaxpeft reads versions 1 and 2"),
        (lambda i: i["commits"][0].update(step=-1), r"committed steps \[-1\] are not distinct non-negative"),
        (lambda i: i["commits"][0]["digests"].pop("m1"), "`digests` is not an object with one entry per name"),
    ],
)
def test_an_edited_index_is_refused_by_name(tmp_path, edit, message):
    directory = adapter_sets.save_adapter_set(tmp_path / "set", named(1), CFG, PARAMS, step=1)
    _edit_index(directory, edit)
    with pytest.raises(ValueError, match=message):
        restored(directory)


@pytest.mark.parametrize("kind", ["checkpoint", "hf"])
def test_a_flipped_byte_in_a_member_is_refused(tmp_path, kind):
    if kind == "hf":
        directory = adapter_sets.export_adapter_set(tmp_path / "hf", named(1), CFG, PARAMS, lambda m: m)
        victim = os.path.join(directory, "m1", "adapter_model.safetensors")
        read = imported
    else:
        directory = adapter_sets.save_adapter_set(tmp_path / "set", named(1), CFG, PARAMS, step=1)
        data = os.path.join(directory, "m1", "1", "adapters", "ocdbt.process_0", "d")
        victim = os.path.join(data, sorted(os.listdir(data))[0])
        read = restored
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) - 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ValueError, match=r"adapter 'm1' of the set .* is not what the set committed: the bytes of"):
        read(directory)


def test_committed_steps_overwrites_and_pruning(tmp_path):
    directory = str(tmp_path / "set")
    for step in (1, 2, 3, 4):
        adapter_sets.save_adapter_set(directory, named(step), CFG, PARAMS, step=step, max_to_keep=2)
    assert committed(directory) == [3, 4]
    for name in NAMES:  # every member holds exactly the committed steps
        assert sorted(int(s) for s in os.listdir(os.path.join(directory, name)) if s.isdigit()) == [3, 4]
    assert restored(directory, step=3) == expected(3) and restored(directory) == expected(4)
    with pytest.raises(ValueError, match=r"`step`=4 is already committed .* never overwritten"):
        adapter_sets.save_adapter_set(directory, named(5), CFG, PARAMS, step=4)
    with pytest.raises(ValueError, match=r"holds the adapters \['m0', 'm1', 'm2'\]; `named` has \['m0', 'm1'\]"):
        adapter_sets.save_adapter_set(directory, {n: named(5)[n] for n in NAMES[:2]}, CFG, PARAMS, step=5)
    with pytest.raises(ValueError, match=r"`max_to_keep`=0; expected a positive number"):
        adapter_sets.save_adapter_set(directory, named(5), CFG, PARAMS, step=5, max_to_keep=0)


def test_a_version_1_set_restores_when_its_members_agree(tmp_path):
    directory = str(tmp_path / "set")
    for step in (1, 2):
        adapter_sets.save_adapter_set(directory, named(step), CFG, PARAMS, step=step)
    _edit_index(directory, lambda i: [i.pop("commits"), i.pop("version")])
    assert restored(directory) == expected(2)
    with AdapterCheckpointer(os.path.join(directory, "m1"), CFG, PARAMS) as member:  # an old torn save
        member.delete(2)
    with pytest.raises(ValueError, match=r"older jaxpeft .* latest steps differ: \{'m0': 2, 'm1': 1, 'm2': 2\}"):
        restored(directory)
    assert restored(directory, step=1) == expected(1)


# ------------------------------------------------------------------------------------------------ property


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(failures=st.lists(st.sampled_from([None, None, "refuse-0", "refuse-2", "crash-1", "crash-2"]), max_size=4))
def test_any_sequence_of_saves_restores_the_last_commit(tmp_path_factory, failures):
    """Saves that succeed, are refused at a member, or crash after some members: the last commit restores whole."""
    directory = str(tmp_path_factory.mktemp("prop") / "set")
    adapter_sets.save_adapter_set(directory, named(1), CFG, PARAMS, step=1)
    last = 1
    for step, failure in enumerate(failures, start=2):
        tree, configs = named(step), dict.fromkeys(NAMES, CFG)
        kind, at = (failure or "-0").split("-")
        real = AdapterCheckpointer.save
        if kind == "refuse":
            configs[NAMES[int(at)]] = jaxpeft.LoraConfig(rank=3, alpha=4, targets=["hid", "out"])
        elif kind == "crash":
            calls = []

            def crash(self, *args, _real=real, _calls=calls, _at=int(at), **kwargs):
                _calls.append(1)
                if len(_calls) > _at:
                    raise OSError("crash")
                return _real(self, *args, **kwargs)

            AdapterCheckpointer.save = crash
        try:
            adapter_sets.save_adapter_set(directory, tree, configs, PARAMS, step=step)
            last = step
        except (ValueError, OSError):
            assert failure is not None
        finally:
            AdapterCheckpointer.save = real
        assert restored(directory) == expected(last)
    assert committed(directory)[-1] == last
    assert jax.tree.structure(adapter_sets.restore_adapter_set(directory, PARAMS)[0]) == jax.tree.structure(named(1))
