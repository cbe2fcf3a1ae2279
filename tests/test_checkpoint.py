"""jaxpeft.checkpoint: exact round trips for every method (one defined here), the `extra` tree, keep-last-N,
mismatch errors, interrupted saves, other device counts."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _ckpt_worker import build, expected_arrays, flat_arrays, trained
from flax.training.train_state import TrainState

import jaxpeft
import jaxpeft.checkpoint as ckpt_lib
import jaxpeft.linen

WORKER = os.path.join(os.path.dirname(__file__), "_ckpt_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
    model, params, cfg, x, tx = build()
    adapters, opt_state = trained(model, params, cfg, x, tx)
    return model, params, cfg, x, tx, adapters, opt_state


def _run_worker(mode, directory, devices=1, background=False):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    cmd = [sys.executable, WORKER, mode, str(directory)]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def _assert_same(tree_a, tree_b):
    flat_a, flat_b = flat_arrays(tree_a), flat_arrays(tree_b)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)


def _perturbed(tree, seed=0):
    """``tree`` + small noise per leaf, so that restored values cannot match by being zeros or ones."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), tree)


def test_round_trip_is_exact_and_saves_only_adapters(setup, tmp_path):
    model, params, cfg, x, _, adapters, opt_state = setup
    with ckpt_lib.AdapterCheckpointer(tmp_path / "run", cfg, params) as ckpt:
        assert ckpt.save(7, adapters, opt_state)
        ckpt.wait()
        assert ckpt.latest_step() == 7
        on_disk = ckpt._manager.item_metadata(7)
        restored = ckpt.restore(opt_state_like=opt_state)
    assert restored.step == 7
    assert restored.config == cfg
    _assert_same(restored.adapters, adapters)
    _assert_same(restored.opt_state, opt_state)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(opt_state)
    lora = restored.adapters["layers"]["up"]["kernel"]
    assert isinstance(lora, jaxpeft.LoraWeights) and lora.scale == cfg.scale_for("layers/up/kernel")
    # Saved keys are the adapter paths: no base weight leaks into the checkpoint.
    saved = {jaxpeft.path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(on_disk["adapters"].tree)[0]}
    assert saved == {f"{p}/{ab}" for p in ("inp/kernel", "layers/up/kernel") for ab in "ab"}
    # The restored adapters run: same outputs as the originals.
    y0 = jaxpeft.linen.apply(model, {"params": params}, adapters, x)
    y1 = jaxpeft.linen.apply(model, {"params": params}, restored.adapters, x)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y1))


def test_files_hold_no_pickle_and_no_base_weights(setup, tmp_path):
    _, params, cfg, _, _, adapters, opt_state = setup
    directory = ckpt_lib.save_adapters(tmp_path / "run", 1, adapters, cfg, params, opt_state)
    base_bytes = {np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(params) if np.asarray(leaf).size >= 16}
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            assert not (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), name
            assert not any(b in data for b in base_bytes), f"{name} holds a base weight"


def test_paths_are_absolute(setup, tmp_path, monkeypatch):
    _, params, cfg, _, _, adapters, _ = setup
    monkeypatch.chdir(tmp_path)
    with ckpt_lib.AdapterCheckpointer("relative/run", cfg, params, async_save=False) as ckpt:
        assert os.path.isabs(ckpt.directory) and ckpt.directory == str(tmp_path / "relative" / "run")
        ckpt.save(0, adapters)
    assert os.path.isdir(tmp_path / "relative" / "run" / "0")
    assert ckpt_lib.restore_adapters("relative/run", cfg, params).step == 0


def test_keep_last_n_interval_and_async(setup, tmp_path):
    _, params, cfg, _, _, adapters, _ = setup
    with ckpt_lib.AdapterCheckpointer(tmp_path, cfg, params, max_to_keep=2, save_interval_steps=2) as ckpt:
        written = [ckpt.save(s, jax.tree.map(lambda a, s=s: a + s, adapters)) for s in range(7)]
        assert written == [True, False, True, False, True, False, True]
        assert ckpt.save(5, adapters, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 6]
        for force in (False, True):  # an existing step is never skipped silently, nor overwritten
            with pytest.raises(ValueError, match=r"`step`=6 is already saved in .*; checkpoints are never overwritten"):
                ckpt.save(6, adapters, force=force)
    restored = ckpt_lib.restore_adapters(tmp_path, cfg, params, step=6)
    _assert_same(restored.adapters, jax.tree.map(lambda a: a + 6, adapters))
    assert restored.opt_state is None
    with pytest.raises(FileNotFoundError, match=r"`step`=4 is not in .*complete steps are \[5, 6\]"):
        ckpt_lib.restore_adapters(tmp_path, cfg, params, step=4)


def test_async_save_copies_before_returning(setup, tmp_path):
    """Buffers may be donated (here: deleted) as soon as `save` returns; the files still hold their values."""
    _, params, cfg, _, _, adapters, _ = setup
    moved = jax.tree.map(lambda a: a + 1.0, adapters)
    expected = flat_arrays(moved)
    with ckpt_lib.AdapterCheckpointer(tmp_path, cfg, params, async_save=True) as ckpt:
        ckpt.save(1, moved)
        for leaf in jax.tree.leaves(moved):
            leaf.delete()
    restored = flat_arrays(ckpt_lib.restore_adapters(tmp_path, cfg, params).adapters)
    for k, v in expected.items():
        np.testing.assert_array_equal(restored[k], v, err_msg=k)


def test_read_config_and_missing_directory(setup, tmp_path):
    _, params, cfg, _, _, adapters, _ = setup
    ckpt_lib.save_adapters(tmp_path / "run", 3, adapters, cfg, params)
    assert ckpt_lib.read_config(tmp_path / "run") == cfg
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        ckpt_lib.restore_adapters(tmp_path / "nowhere", cfg, params)
    assert not os.path.exists(tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt_lib.restore_adapters(tmp_path / "empty", cfg, params)


def test_config_mismatch_names_fields(setup, tmp_path):
    _, params, cfg, _, _, adapters, _ = setup
    ckpt_lib.save_adapters(tmp_path, 1, adapters, cfg, params)
    other = jaxpeft.LoraConfig(rank=3, alpha=4.0, targets=["inp"])
    with pytest.raises(ValueError, match=r"different config: rank: checkpoint 2, now 3; targets: checkpoint"):
        ckpt_lib.restore_adapters(tmp_path, other, params)
    # dropout does not shape the arrays: a restore may change it.
    relaxed = jaxpeft.LoraConfig(rank=2, alpha=4.0, targets=["inp", "up"], dropout=0.1)
    restored = ckpt_lib.restore_adapters(tmp_path, relaxed, params)
    assert restored.adapters["inp"]["kernel"].dropout == 0.1


def test_fingerprint_mismatch_names_paths(setup, tmp_path):
    _, params, cfg, _, _, adapters, _ = setup
    ckpt_lib.save_adapters(tmp_path, 1, adapters, cfg, params)
    wider = {**params, "head": {"kernel": jnp.zeros((16, 5)), "bias": jnp.zeros(5)}}
    with pytest.raises(ValueError, match=r"different base model: 'head/bias': checkpoint \(4,\) float32, now \(5,\)"):
        ckpt_lib.restore_adapters(tmp_path, cfg, wider)
    # Off the fingerprint check, the adapted paths and shapes are still checked ...
    assert ckpt_lib.restore_adapters(tmp_path, cfg, wider, check_base=False).step == 1
    bigger_in = {**params, "inp": {"kernel": jnp.zeros((6, 16)), "bias": jnp.zeros(16)}}
    with pytest.raises(
        ValueError,
        match=r"holds adapters that .*: 'inp/kernel'\.a: checkpoint \(8, 2\) float32, now \(6, 2\) float32\. Rest",
    ):
        ckpt_lib.restore_adapters(tmp_path, cfg, bigger_in, check_base=False)


def test_save_refuses_adapters_that_do_not_fit(setup, tmp_path):
    model, params, cfg, x, _, adapters, _ = setup
    rank3 = jaxpeft.LoraConfig(rank=3, alpha=4.0, targets=["inp", "up"])
    other = jaxpeft.linen.init(rank3, model, params, x, key=jax.random.key(0))
    with ckpt_lib.AdapterCheckpointer(tmp_path, cfg, params) as ckpt:
        with pytest.raises(
            ValueError,
            match=r"`adapters` are not what `cfg` \(LoraConfig\) makes.*'inp/kernel'\.a: config \(8, 2\) float32, "
            r"in `adapters` \(8, 3\)",
        ):
            ckpt.save(0, other)
        with pytest.raises(ValueError, match=r"cannot check `adapters` against `cfg`.*'layers/up/kernel' has shape"):
            ckpt.save(0, {"inp": adapters["inp"]})
        with pytest.raises(ValueError, match=r"`opt_state` leaf 'lr' is a str; only arrays can be checkpointed"):
            ckpt.save(0, adapters, {"lr": "high"})
        with pytest.raises(ValueError, match=r"`adapters` leaf 'inp/kernel/a' is a ShapeDtypeStruct; only arrays"):
            ckpt.save(0, jax.eval_shape(lambda: adapters))
        head = params["head"]["bias"]
        with pytest.raises(ValueError, match=r"`extra` has leaves whose paths collide .*: \['norm/scale'\]"):
            ckpt.save(0, adapters, extra={"norm/scale": head, "norm": {"scale": head}})
        assert ckpt.all_steps() == []
    with pytest.raises(ValueError, match="is a function and cannot be written to JSON"):
        ckpt_lib.AdapterCheckpointer(tmp_path, jaxpeft.LoraConfig(targets=lambda p, x: "inp" in p), params)


def test_optimizer_state_mismatch(setup, tmp_path):
    _, params, cfg, _, tx, adapters, opt_state = setup
    ckpt_lib.save_adapters(tmp_path / "with", 1, adapters, cfg, params, opt_state)
    ckpt_lib.save_adapters(tmp_path / "without", 1, adapters, cfg, params)
    with pytest.raises(
        ValueError, match=r"has no `opt_state` \(it was saved without one\); pass opt_state_like=None\."
    ):
        ckpt_lib.restore_adapters(tmp_path / "without", cfg, params, opt_state_like=opt_state)
    sgd_state = optax.sgd(0.1, momentum=0.9).init(adapters)
    with pytest.raises(ValueError, match=r"`opt_state_like` does not match .*'0/mu/inp/kernel/a' missing"):
        ckpt_lib.restore_adapters(tmp_path / "with", cfg, params, opt_state_like=sgd_state)
    # An abstract target (jax.eval_shape) works as well as a concrete one.
    abstract = jax.eval_shape(tx.init, adapters)
    restored = ckpt_lib.restore_adapters(tmp_path / "with", cfg, params, opt_state_like=abstract)
    _assert_same(restored.opt_state, opt_state)


def test_restore_never_leaves_abstract_leaves(setup, tmp_path, monkeypatch):
    _, params, cfg, _, _, adapters, _ = setup
    with ckpt_lib.AdapterCheckpointer(tmp_path, cfg, params, async_save=False) as ckpt:
        ckpt.save(1, adapters)
        real_restore = ckpt._manager.restore

        def partial_restore(step, args=None):  # what a silent partial restore would hand back
            out = real_restore(step, args=args)
            if "adapters" in out:
                out["adapters"]["inp"]["kernel"]["a"] = jax.ShapeDtypeStruct((8, 2), jnp.float32)
            return out

        monkeypatch.setattr(ckpt._manager, "restore", partial_restore)
        with pytest.raises(ValueError, match=r"would leave adapters leaves unfilled: .*abstract \['inp/kernel/a'\]"):
            ckpt.restore()


def test_restore_uses_given_shardings(setup, tmp_path):
    _, params, cfg, _, _, adapters, opt_state = setup
    ckpt_lib.save_adapters(tmp_path, 1, adapters, cfg, params, opt_state)
    device = jax.devices()[-1]
    seen = []

    def pick(path, abstract):
        seen.append(path)
        return jax.sharding.SingleDeviceSharding(device)

    restored = ckpt_lib.restore_adapters(tmp_path, cfg, params, sharding=pick, opt_state_like=opt_state)
    assert sorted(seen) == sorted(f"{p}/{ab}" for p in ("inp/kernel", "layers/up/kernel") for ab in "ab")
    assert restored.adapters["inp"]["kernel"].a.sharding == jax.sharding.SingleDeviceSharding(device)
    with pytest.raises(ValueError, match=r"`adapters_like` does not match .*'inp/kernel/a'"):
        ckpt_lib.restore_adapters(tmp_path, cfg, params, adapters_like={"layers": adapters["layers"]})


def test_checkpoint_moves_between_device_counts(setup, tmp_path):
    """Saved on 1 device, restored sharded over 8 in another process, saved there, restored here on 1."""
    from safetensors.numpy import save_file

    _, params, cfg, _, _, adapters, opt_state = setup
    head = _perturbed(params["head"])
    ckpt_lib.save_adapters(tmp_path / "one", 1, adapters, cfg, params, opt_state, extra=head)
    expected = expected_arrays(adapters, opt_state, head)
    save_file(expected, os.path.join(tmp_path, "expected.safetensors"))
    out = _run_worker("reshard", tmp_path, devices=8)
    assert "restored step 1 on 8 devices and saved it as step 2" in out
    restored = ckpt_lib.restore_adapters(tmp_path / "many", cfg, params, opt_state_like=opt_state, extra_like=head)
    assert restored.step == 2 and jax.device_count() == 1
    assert restored.adapters["layers"]["up"]["kernel"].a.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got = expected_arrays(restored.adapters, restored.opt_state, restored.extra)
    assert got.keys() == expected.keys()
    for k, v in got.items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)


def _wait_for(path, proc, seconds=90.0):
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker never reached the commit of step 2")
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["hang", "kill"])
def test_interrupted_save_keeps_previous_checkpoint(setup, tmp_path, mode):
    _, params, cfg, _, _, adapters, opt_state = setup
    directory = tmp_path / "one"
    ckpt_lib.save_adapters(directory, 1, adapters, cfg, params, opt_state)
    proc = _run_worker(mode, tmp_path, background=True)
    if mode == "hang":  # killed while step 2 sits fully written but uncommitted
        _wait_for(tmp_path / "IN_SAVE", proc)
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=90)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(directory) if n.startswith("2")]
    if mode == "hang":
        assert leftovers and all("tmp" in n for n in leftovers), leftovers
    with ckpt_lib.AdapterCheckpointer(directory, cfg, params) as ckpt:
        assert ckpt.latest_step() in (1, 2)
        if mode == "hang":
            assert ckpt.all_steps() == [1]
        restored = ckpt.restore(1, opt_state_like=opt_state)
        _assert_same(restored.adapters, adapters)
        # The directory stays usable: the next save of step 2 goes through.
        assert not [n for n in os.listdir(directory) if "tmp" in n]
        if ckpt.latest_step() == 1:
            ckpt.save(2, restored.adapters, restored.opt_state)
            ckpt.wait()
        assert ckpt.restore(2, opt_state_like=opt_state).step == 2


# ------------------------------------------------------------------------------------------------ extra trees


def _head_state(setup):
    """A TrainState whose params are ``(adapters, head)``: one optimizer over both, a step that trains both."""
    model, params, _, x, _, adapters, _ = setup

    def loss(trainable):
        adapters, head = trainable
        y = jaxpeft.linen.apply(model, {"params": {**params, "head": head}}, adapters, x)
        return jnp.mean((y - 1.0) ** 2)

    @jax.jit
    def step(state):
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    state = TrainState.create(apply_fn=None, params=(adapters, params["head"]), tx=optax.adamw(1e-2))
    return step(step(state)), step


def test_extra_tree_and_joint_optimizer_state_round_trip(setup, tmp_path):
    _, params, cfg, *_ = setup
    state, step = _head_state(setup)
    adapters, head = state.params
    assert not np.array_equal(head["kernel"], params["head"]["kernel"])  # the head was trained
    with ckpt_lib.AdapterCheckpointer(tmp_path, cfg, params) as ckpt:
        ckpt.save(int(state.step), adapters, state.opt_state, extra=head)
        ckpt.wait()
        on_disk = ckpt._manager.item_metadata(int(state.step))
    assert set(on_disk["extra"].tree) == {"bias", "kernel"}
    like = jax.eval_shape(lambda: state)  # a fresh process would build this from tx.init and the shapes
    restored = ckpt_lib.restore_adapters(
        tmp_path, cfg, params, opt_state_like=like.opt_state, extra_like=like.params[1]
    )
    assert restored.step == 2
    _assert_same(restored.adapters, adapters)
    _assert_same(restored.extra, head)
    _assert_same(restored.opt_state, state.opt_state)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    assert jax.tree.structure(restored.extra) == jax.tree.structure(head)
    # Training resumes exactly where it stopped.
    resumed = state.replace(
        step=restored.step, params=(restored.adapters, restored.extra), opt_state=restored.opt_state
    )
    _assert_same(step(resumed).params, step(state).params)


@pytest.mark.parametrize("item", ["opt_state", "extra"])
def test_a_saved_item_is_restored_or_skipped_never_dropped(setup, tmp_path, item):
    _, params, cfg, _, _, adapters, opt_state = setup
    head = params["head"]
    ckpt_lib.save_adapters(tmp_path, 1, adapters, cfg, params, opt_state, extra=head)
    values = {"opt_state": opt_state, "extra": head}
    (other,) = set(values) - {item}
    with pytest.raises(
        ValueError, match=rf"holds `{item}`; say how to restore it: pass {item}_like=.*skip=\('{item}',\)"
    ):
        ckpt_lib.restore_adapters(tmp_path, cfg, params, **{f"{other}_like": values[other]})
    restored = ckpt_lib.restore_adapters(tmp_path, cfg, params, skip=(item,), **{f"{other}_like": values[other]})
    assert getattr(restored, item) is None
    _assert_same(getattr(restored, other), values[other])
    _assert_same(restored.adapters, adapters)
    with pytest.raises(ValueError, match=rf"`skip` names '{item}' but `{item}_like` is given too"):
        ckpt_lib.restore_adapters(tmp_path, cfg, params, skip=(item,), **{f"{i}_like": v for i, v in values.items()})


def test_skip_names_are_checked(setup, tmp_path):
    _, params, cfg, _, _, adapters, _ = setup
    ckpt_lib.save_adapters(tmp_path, 1, adapters, cfg, params)
    with pytest.raises(
        ValueError, match=r"`skip`=\('optimizer',\): unknown items \['optimizer'\]; expected 'opt_state'"
    ):
        ckpt_lib.restore_adapters(tmp_path, cfg, params, skip=("optimizer",))
    with pytest.raises(ValueError, match=r"`skip`='extra' is a string; pass a tuple .* skip=\('extra',\)"):
        ckpt_lib.restore_adapters(tmp_path, cfg, params, skip="extra")
    # Skipping an item the step does not hold is harmless; asking for it is an error.
    assert ckpt_lib.restore_adapters(tmp_path, cfg, params, skip=("opt_state", "extra")).extra is None
    with pytest.raises(ValueError, match=r"has no `extra` \(it was saved without one\); pass extra_like=None\."):
        ckpt_lib.restore_adapters(tmp_path, cfg, params, extra_like=params["head"])
    ckpt_lib.save_adapters(tmp_path / "head", 1, adapters, cfg, params, extra={"bias": params["head"]["bias"]})
    with pytest.raises(
        ValueError,
        match=r"`extra_like` does not match the `extra` saved in .*: 'kernel' not in checkpoint \(extra leaf\)\. "
        r"Pass extra_like=",
    ):
        ckpt_lib.restore_adapters(tmp_path / "head", cfg, params, extra_like=params["head"])


# ------------------------------------------------------------------------------------------------ other methods


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleShift(jaxpeft.Adapter):
    """A method defined outside the package: ``y = base(x) ⊙ gain + shift`` per output unit."""

    gain: Any
    shift: Any
    layout: jaxpeft.Layout = dataclasses.field(default=jaxpeft.Layout(), metadata={"static": True})

    def check(self, weight_shape):
        stack, _, fan_out = self.layout.split(weight_shape)
        if tuple(self.gain.shape) != (*stack, *fan_out) or tuple(self.shift.shape) != (*stack, *fan_out):
            return f"expected gain and shift {(*stack, *fan_out)}"
        return None

    def forward(self, call):
        y = call.base(call.x)
        gain = call.output_vector(self.gain.astype(y.dtype), y.ndim)
        return y * gain + call.output_vector(self.shift.astype(y.dtype), y.ndim)


@dataclasses.dataclass(frozen=True)
class ScaleShiftConfig(jaxpeft.MethodConfig):
    method: ClassVar[str] = "scale_shift"

    targets: Any = "all-linear"
    exclude: Any = ()
    dtype: str = "float32"

    def init_target(self, path, weight, layout, key):
        stack, _, fan_out = layout.split(weight.shape)
        shape = (*stack, *fan_out)
        return ScaleShift(jnp.ones(shape, self.dtype), jnp.zeros(shape, self.dtype), layout)


METHODS = {  # (the config saved, the config restored with: differs only in `restore_free` fields)
    "dora": (
        jaxpeft.DoraConfig(rank=2, alpha=4.0, targets=["inp", "up"]),
        jaxpeft.DoraConfig(rank=2, alpha=4.0, targets=["inp", "up"], dropout=0.25),
    ),
    "ia3": (
        jaxpeft.IA3Config(targets=["inp", "up"], feedforward=["up"], init_ones=False),
        jaxpeft.IA3Config(targets=["inp", "up"], feedforward=["up"]),
    ),
    "scale_shift": (ScaleShiftConfig(targets=["inp", "up"]), ScaleShiftConfig(targets=["inp", "up"])),
}
#: Static fields of the restored 'layers/up/kernel' node that come from the restoring config.
UP_STATICS = {
    "dora": {"dropout": 0.25, "scale": 2.0},
    "ia3": {"feedforward": True},
    "scale_shift": {"layout": jaxpeft.Layout(stack=1, fan_in=1, fan_out=1, kind="dense")},
}


def _statics(adapters):
    """``{path: (node type, its non-array fields)}``."""
    return {
        path: (
            type(node),
            {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.metadata.get("static")},
        )
        for path, node in jaxpeft.adapter_items(adapters)
    }


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_round_trip(setup, tmp_path, name):
    model, params, _, x, *_ = setup
    saved_cfg, cfg = METHODS[name]
    adapters = _perturbed(jaxpeft.linen.init(saved_cfg, model, params, x, key=jax.random.key(3)))
    ckpt_lib.save_adapters(tmp_path, 4, adapters, saved_cfg, params)
    restored = ckpt_lib.restore_adapters(tmp_path, cfg, params)
    _assert_same(restored.adapters, adapters)
    assert type(restored.config) is type(saved_cfg) and restored.config == saved_cfg
    # The static parts (scale, dropout, layout, feedforward) are the current config's.
    fresh = jax.eval_shape(
        lambda: jaxpeft.init(cfg, params, key=jax.random.key(0), layouts=jaxpeft.layouts_of(adapters))
    )
    assert _statics(restored.adapters) == _statics(fresh)
    up = restored.adapters["layers"]["up"]["kernel"]
    assert {k: getattr(up, k) for k in UP_STATICS[name]} == UP_STATICS[name] and up.layout.stack == 1
    forward = jax.jit(lambda a: jaxpeft.linen.apply(model, {"params": params}, a, x))
    np.testing.assert_array_equal(forward(restored.adapters), forward(adapters))
    found = ckpt_lib.read_config(tmp_path, configs=(ScaleShiftConfig,))
    assert type(found) is type(saved_cfg) and found == saved_cfg


def test_read_config_of_each_method(setup, tmp_path):
    model, params, cfg, x, *_ = setup
    for name, (saved_cfg, _) in [("lora", (cfg, None)), *METHODS.items()]:
        adapters = jaxpeft.linen.init(saved_cfg, model, params, x, key=jax.random.key(0))
        ckpt_lib.save_adapters(tmp_path / name, 1, adapters, saved_cfg, params)
    for name, config_type in [("lora", jaxpeft.LoraConfig), ("dora", jaxpeft.DoraConfig), ("ia3", jaxpeft.IA3Config)]:
        found = ckpt_lib.read_config(tmp_path / name)
        assert type(found) is config_type, name
    with pytest.raises(
        ValueError, match=r"step 1 in .*method='scale_shift'; known methods are .*configs=\(MyConfig,\)"
    ):
        ckpt_lib.read_config(tmp_path / "scale_shift")
    assert ckpt_lib.read_config(tmp_path / "scale_shift", configs=(ScaleShiftConfig,)) == METHODS["scale_shift"][0]


def test_adapters_of_another_method_are_refused(setup, tmp_path):
    _, params, cfg, _, _, adapters, _ = setup
    dora = jaxpeft.DoraConfig(rank=2, alpha=4.0, targets=["inp", "up"])
    with ckpt_lib.AdapterCheckpointer(tmp_path, dora, params) as ckpt:
        with pytest.raises(
            ValueError,
            match=r"`adapters` are not what `cfg` \(DoraConfig\) makes on these params: 'inp/kernel' type: config "
            r"DoraWeights, in `adapters` LoraWeights; 'inp/kernel'\.magnitude: config \(16,\) float32, in `adapters` "
            r"nothing; 'layers/up/kernel' type: ",
        ):
            ckpt.save(0, adapters)
        assert ckpt.all_steps() == []
    assert os.listdir(tmp_path) == []  # nothing was written
    # The other way round: a LoRA checkpoint read with a DoRA config.
    ckpt_lib.save_adapters(tmp_path / "lora", 1, adapters, cfg, params)
    with pytest.raises(ValueError, match=r"different config: method: checkpoint 'lora', now 'dora'"):
        ckpt_lib.restore_adapters(tmp_path / "lora", dora, params)
