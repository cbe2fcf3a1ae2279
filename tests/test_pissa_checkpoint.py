"""jaxpeft.checkpoint with base-adjusting inits (PiSSA, OLoRA): a step restores only over the residual base its
adapters were trained over, checked on sampled entries of each adjusted weight; the base adjustment itself is not
restore-free; abstract params, ``check_base=False`` and steps saved without the fingerprint."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
import jaxpeft.checkpoint as ckpt_lib
import jaxpeft.linen
from jaxpeft.checkpoint._tables import SAMPLES, sample_positions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INITS = ("pissa", "olora")
X = jnp.asarray(np.random.default_rng(2).standard_normal((4, 8)), jnp.float32)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc2")(jnp.tanh(nn.Dense(12, name="fc1")(x)))


MLP = Mlp()


def config(init="pissa", **fields):
    return jaxpeft.LoraConfig(rank=2, alpha=4.0, targets=["fc1", "fc2"], init=init, **fields)


@pytest.fixture(scope="module")
def original():
    shapes = jax.eval_shape(MLP.init, jax.random.key(0), X)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * 0.5), shapes)


def adjusted(init, original):
    """``(residual params, trained adapters, initial adapters)`` of ``init`` (the trained ones perturbed)."""
    residual, initial = jaxpeft.init_adjusted(config(init), original, key=jax.random.key(1))
    rng = np.random.default_rng(3)
    trained = jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), initial)
    return residual, trained, initial


def out(params, adapters):
    return np.asarray(jaxpeft.linen.apply(MLP, {"params": params}, adapters, X))


def assert_same(tree_a, tree_b):
    for x, y in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def meta_path(directory, step=1):
    return os.path.join(directory, str(step), "meta", "metadata")


def edit_meta(directory, edit, step=1):
    with open(meta_path(directory, step)) as f:
        meta = json.load(f)
    edit(meta)
    with open(meta_path(directory, step), "w") as f:
        json.dump(meta, f)


# ------------------------------------------------------------------------------------------------ the residual base


@pytest.mark.parametrize("init", INITS)
def test_restore_over_the_residual_is_exact_and_records_a_fingerprint(init, original, tmp_path):
    residual, trained, _ = adjusted(init, original)
    directory = ckpt_lib.save_adapters(tmp_path, 1, trained, config(init), residual)
    restored = ckpt_lib.restore_adapters(directory, config(init), residual)
    assert_same(restored.adapters, trained)
    np.testing.assert_array_equal(out(residual, restored.adapters), out(residual, trained))
    with open(meta_path(directory)) as f:
        fingerprint = json.load(f)["residual"]
    assert fingerprint["adjustment"] == f"init={init!r}"
    assert sorted(fingerprint["params"]) == ["fc1/kernel", "fc2/kernel"]
    entry = fingerprint["params"]["fc1/kernel"]
    assert entry["shape"] == [8, 12] and entry["dtype"] == "float32" and len(entry["positions"]) == SAMPLES
    flat = np.asarray(residual["fc1"]["kernel"]).ravel()
    assert entry["bits"] == [int(b) for b in flat[entry["positions"]].view(np.uint32)]  # the values, bit for bit


@pytest.mark.parametrize("init", INITS)
def test_restore_over_the_original_weights_is_refused(init, original, tmp_path):
    residual, trained, initial = adjusted(init, original)
    # What the refusal prevents: the adapters over the original weights compute another model.
    assert np.abs(out(original, trained) - out(residual, trained)).max() > 1e-2
    directory = ckpt_lib.save_adapters(tmp_path, 1, trained, config(init), residual)
    with pytest.raises(
        ValueError,
        match=rf"checkpoint step 1 in '{directory}': the adapters at step 1 were trained over the residual base "
        rf"that init='{init}' made \(jaxpeft\.init_adjusted\); these params are not it \(path 'fc1/kernel' "
        r"differs: 16 of 16 sampled entries, e\.g\. flat entry 3: checkpoint .*, now .*; path 'fc2/kernel' "
        r"differs.*\)\. Restore over the residual params: rebuild them with jaxpeft\.init_adjusted\(cfg, "
        r"original_params, key=<the same key>\) .*jaxpeft\.to_plain_lora",
    ):
        ckpt_lib.restore_adapters(directory, config(init), original)
    # The fix it names for the original weights: restore without the check, then convert.
    restored = ckpt_lib.restore_adapters(directory, config(init), original, check_base=False)
    plain_cfg, plain = jaxpeft.to_plain_lora(config(init), restored.adapters, initial)
    np.testing.assert_allclose(out(original, plain), out(residual, trained), rtol=1e-4, atol=1e-4)
    assert plain_cfg.base_adjustment is None


def test_a_change_of_one_weight_is_named(original, tmp_path):
    residual, trained, _ = adjusted("pissa", original)
    directory = ckpt_lib.save_adapters(tmp_path, 1, trained, config(), residual)
    other = {**residual, "fc2": {**residual["fc2"], "kernel": residual["fc2"]["kernel"].at[3].add(1.0)}}  # a row
    with pytest.raises(ValueError, match=r"these params are not it \(path 'fc2/kernel' differs: 1 of 16 sampled"):
        ckpt_lib.restore_adapters(directory, config(), other)
    negated_zero = {**residual, "fc1": {**residual["fc1"], "kernel": residual["fc1"]["kernel"].at[0, 3].set(-0.0)}}
    with pytest.raises(ValueError, match=r"path 'fc1/kernel' differs: 1 of 16 sampled entries, e\.g\. flat entry 3"):
        ckpt_lib.restore_adapters(directory, config(), negated_zero)  # compared bit for bit


@pytest.mark.parametrize("init", INITS)
def test_every_residual_entry_differs_from_the_original(init, original):
    """So the sampled entries always tell the residual from the original weights."""
    for seed in range(3):
        residual, _ = jaxpeft.init_adjusted(config(init), original, key=jax.random.key(seed))
        for name in ("fc1", "fc2"):
            assert np.all(np.asarray(residual[name]["kernel"]) != np.asarray(original[name]["kernel"]))


@pytest.mark.parametrize("size", [1, 5, 16, 17, 31, 96, 1000, 4096 * 11008])
def test_sampled_positions_see_any_large_ish_change(size):
    positions = sample_positions(size)
    assert positions == sorted(set(positions)) and all(0 <= p < size for p in positions)
    assert len(positions) == min(size, SAMPLES)
    assert positions == sample_positions(size)  # fixed: a save and a restore sample the same entries
    # Every run of size // 16 + 1 consecutive entries (e.g. a changed row, block or shard) holds a sampled one.
    gaps = np.diff([-1, *positions, size])
    assert gaps.max() <= size // SAMPLES + 1


def test_sharded_params_are_sampled_as_the_global_array(tmp_path):
    """On a 4-device mesh (a subprocess), each sharding samples the global entries, and a step saved over
    sharded params restores over unsharded ones."""
    script = textwrap.dedent(
        f"""
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        import jaxpeft, jaxpeft.checkpoint as ckpt_lib
        from jaxpeft.checkpoint._tables import residual_entry
        assert jax.device_count() == 4
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
        w = np.random.default_rng(0).standard_normal((8, 12)).astype(np.float32)
        want = residual_entry(w)
        for spec in (P("x", "y"), P(None, ("x", "y")), P("y"), P()):
            got = residual_entry(jax.device_put(w, NamedSharding(mesh, spec)))
            assert got == want, (spec, got, want)
        params = {{"fc1": {{"kernel": jnp.asarray(w), "bias": jnp.zeros(12)}}}}
        cfg = jaxpeft.LoraConfig(rank=2, alpha=4.0, targets=["fc1"], init="olora")
        residual, adapters = jaxpeft.init_adjusted(cfg, params, key=jax.random.key(0))
        sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("x"))), residual)
        ckpt_lib.save_adapters({str(tmp_path)!r}, 1, adapters, cfg, sharded)
        restored = ckpt_lib.restore_adapters({str(tmp_path)!r}, cfg, residual)
        np.testing.assert_array_equal(restored.adapters["fc1"]["kernel"].a, adapters["fc1"]["kernel"].a)
        print("OK")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr


# ------------------------------------------------------------------------------------------------ the config


@pytest.mark.parametrize(
    ("saved", "now", "message"),
    [
        ("pissa", "olora", r"was saved with init='pissa', `cfg` has init='olora'\. `init` may otherwise differ"),
        ("olora", "pissa_niter_2", r"was saved with init='olora', `cfg` has init='pissa_niter_2'\."),
        ("pissa", "kaiming", r"was saved with init='pissa', `cfg` has no base adjustment \(adapters over the orig"),
        ("gaussian", "olora", r"was saved with no base adjustment \(.*\), `cfg` has init='olora'\."),
    ],
    ids=["pissa-olora", "olora-pissa_niter", "pissa-kaiming", "gaussian-olora"],
)
def test_another_base_adjustment_is_refused(saved, now, message, original, tmp_path):
    residual, adapters = jaxpeft.init_adjusted(config(saved), original, key=jax.random.key(1))
    directory = ckpt_lib.save_adapters(tmp_path, 1, adapters, config(saved), residual)
    with pytest.raises(ValueError, match=rf"checkpoint step 1 in '{directory}' {message}.*read_config"):
        ckpt_lib.restore_adapters(directory, config(now), residual)
    with pytest.raises(ValueError, match=message):  # check_base=False does not lift it
        ckpt_lib.restore_adapters(directory, config(now), residual, check_base=False)


def test_restore_free_changes_are_still_accepted(original, tmp_path):
    plain = jaxpeft.init(config("kaiming"), original, key=jax.random.key(1))
    ckpt_lib.save_adapters(tmp_path / "plain", 1, plain, config("kaiming"), original)
    restored = ckpt_lib.restore_adapters(tmp_path / "plain", config("gaussian", dropout=0.1), original)
    assert_same(restored.adapters, plain)
    assert restored.adapters["fc1"]["kernel"].dropout == 0.1 and restored.config == config("kaiming")
    residual, trained, _ = adjusted("pissa", original)
    ckpt_lib.save_adapters(tmp_path / "pissa", 1, trained, config(), residual)
    restored = ckpt_lib.restore_adapters(tmp_path / "pissa", config(dropout=0.1), residual)
    assert_same(restored.adapters, trained)
    assert restored.adapters["fc1"]["kernel"].dropout == 0.1


# ------------------------------------------------------------------------------------------------ abstract params


def test_abstract_params_at_save_are_refused(original, tmp_path):
    residual, trained, _ = adjusted("olora", original)
    abstract = jax.eval_shape(lambda: residual)
    refused = (
        r"`params` hold no values at 'fc1/kernel' \(a ShapeDtypeStruct\), but `cfg` \(LoraConfig with "
        r"init='olora'\) trains its adapters over the residual base .*needs their values\. Open the "
        r"AdapterCheckpointer with the concrete residual params that jaxpeft\.init_adjusted returned"
    )
    with ckpt_lib.AdapterCheckpointer(tmp_path, config("olora"), abstract, async_save=False) as ckpt:
        with pytest.raises(ValueError, match=refused):
            ckpt.check(1, trained)
        with pytest.raises(ValueError, match=refused):
            ckpt.save(1, trained)
        assert ckpt.all_steps() == []
    # A config that keeps the base saves over abstract params as before.
    plain = jaxpeft.init(config("kaiming"), original, key=jax.random.key(1))
    ckpt_lib.save_adapters(tmp_path / "plain", 1, plain, config("kaiming"), jax.eval_shape(lambda: original))


def test_abstract_params_at_restore_need_check_base_false(original, tmp_path):
    residual, trained, _ = adjusted("pissa", original)
    directory = ckpt_lib.save_adapters(tmp_path, 1, trained, config(), residual)
    abstract = jax.eval_shape(lambda: residual)
    with pytest.raises(
        ValueError,
        match=r"trained over the residual base that init='pissa' made .*but `params` hold no values at "
        r"'fc1/kernel' \(a ShapeDtypeStruct\)\. Pass the concrete residual params, or check_base=False",
    ):
        ckpt_lib.restore_adapters(directory, config(), abstract)
    assert_same(ckpt_lib.restore_adapters(directory, config(), abstract, check_base=False).adapters, trained)


# ------------------------------------------------------------------------------------------------ metadata


def test_a_step_saved_without_the_fingerprint_restores_with_a_warning(original, tmp_path):
    residual, trained, _ = adjusted("pissa", original)
    directory = ckpt_lib.save_adapters(tmp_path, 1, trained, config(), residual)
    edit_meta(directory, lambda meta: meta.pop("residual"))  # as an older jaxpeft wrote it
    with pytest.warns(UserWarning, match=r"holds init='pissa' adapters but no fingerprint of the residual base"):
        restored = ckpt_lib.restore_adapters(directory, config(), original)  # cannot be told apart
    assert_same(restored.adapters, trained)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("adjustment"), r"`residual` is .*, expected \{\"adjustment\": str"),
        (lambda r: r["params"].pop("fc2/kernel"), r"`residual\.params` is \['fc1/kernel'\], expected an object over"),
        (lambda r: r["params"]["fc1/kernel"]["positions"].append(96), r"`positions` is .*below the size 96"),
        (lambda r: r["params"]["fc1/kernel"]["bits"].pop(), r"`bits` is .*, expected one bit pattern .* per position"),
    ],
    ids=["no adjustment", "a path missing", "a position out of range", "a bit pattern missing"],
)
def test_a_damaged_fingerprint_is_named(edit, message, original, tmp_path):
    residual, trained, _ = adjusted("pissa", original)
    directory = ckpt_lib.save_adapters(tmp_path, 1, trained, config(), residual)
    edit_meta(directory, lambda meta: edit(meta["residual"]))
    with pytest.raises(
        ValueError, match=rf"checkpoint step 1 in '{directory}': its metadata .* is malformed: .*{message}"
    ):
        ckpt_lib.restore_adapters(directory, config(), residual)
