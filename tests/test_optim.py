"""optax freezing: jaxpeft.freeze zeroes frozen updates and keeps no state for them; optax.masked alone leaks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft

PARAMS = {"frozen": {"kernel": jnp.ones((3, 3))}, "head": {"kernel": jnp.ones((3, 2))}}
GRADS = jax.tree.map(jnp.ones_like, PARAMS)
SPEC = jaxpeft.path_filter("^head/")


def test_freeze_keeps_frozen_leaves_bit_identical_and_stateless():
    tx = jaxpeft.freeze(optax.adamw(0.1, weight_decay=0.1), SPEC)
    state = tx.init(PARAMS)
    params = PARAMS
    for _ in range(3):
        updates, state = tx.update(GRADS, state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["frozen"]["kernel"], PARAMS["frozen"]["kernel"])
    assert not np.allclose(params["head"]["kernel"], PARAMS["head"]["kernel"])
    state_shapes = [x.shape for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
    assert (3, 3) not in state_shapes and state_shapes.count((3, 2)) == 2  # Adam moments for the head only


def test_optax_masked_alone_passes_frozen_gradients_through():
    mask = jaxpeft.trainable_mask(PARAMS, SPEC)
    tx = optax.masked(optax.adam(0.1), mask)
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    moved = optax.apply_updates(PARAMS, updates)
    # the frozen kernel moved by its raw gradient: this is why freeze() uses optax.partition + set_to_zero
    assert not np.allclose(moved["frozen"]["kernel"], PARAMS["frozen"]["kernel"])


def test_freeze_accepts_a_full_mask_tree():
    tx = jaxpeft.freeze(optax.sgd(1.0), {"frozen": {"kernel": False}, "head": {"kernel": True}})
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    assert float(jnp.abs(updates["frozen"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["head"]["kernel"]).max()) == 1.0


# ----------------------------------------------------------------------------------------------- LoRA+

ADAPTER_PARAMS = {
    "q": {"kernel": jnp.ones((4, 3))},
    "k": {"kernel": jnp.ones((4, 3))},
    "v": {"kernel": jnp.ones((4, 3))},
}


def _adapter_tree():
    lora = jaxpeft.init(jaxpeft.LoraConfig(rank=2, targets=["q"]), ADAPTER_PARAMS, key=jax.random.key(0))
    dora = jaxpeft.init(jaxpeft.DoraConfig(rank=2, targets=["k"]), ADAPTER_PARAMS, key=jax.random.key(1))
    ia3 = jaxpeft.init(jaxpeft.IA3Config(targets=["v"], feedforward=()), ADAPTER_PARAMS, key=jax.random.key(2))
    return {**lora, **dora, **ia3}


def _grads(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree)


def _updates(tx, tree, steps=3):
    state, out = tx.init(tree), []
    for i in range(steps):
        updates, state = tx.update(_grads(tree, i), state, tree)
        out.append(updates)
    return out


@pytest.mark.parametrize("make", [optax.sgd, optax.adam, lambda lr: optax.adamw(lr, weight_decay=0.0)])
def test_loraplus_scales_only_the_b_factors(make):
    tree = _adapter_tree()
    plus, plain = _updates(jaxpeft.loraplus(make, 1e-2, ratio=16), tree), _updates(make(1e-2), tree)
    for p, q in zip(plus, plain, strict=True):
        for name in ("q", "k"):
            np.testing.assert_allclose(p[name]["kernel"].b, 16 * q[name]["kernel"].b, rtol=1e-6)
            np.testing.assert_array_equal(p[name]["kernel"].a, q[name]["kernel"].a)
            assert float(jnp.abs(q[name]["kernel"].b).max()) > 0
        np.testing.assert_array_equal(p["k"]["kernel"].magnitude, q["k"]["kernel"].magnitude)
        np.testing.assert_array_equal(p["v"]["kernel"].vector, q["v"]["kernel"].vector)


def test_loraplus_follows_a_schedule_step_by_step():
    tree = _adapter_tree()
    schedule = optax.linear_schedule(1e-2, 1e-3, 3)
    plus, plain = _updates(jaxpeft.loraplus(optax.sgd, schedule, ratio=4), tree), _updates(optax.sgd(schedule), tree)
    for p, q in zip(plus, plain, strict=True):
        np.testing.assert_allclose(p["q"]["kernel"].b, 4 * q["q"]["kernel"].b, rtol=1e-6)
        np.testing.assert_array_equal(p["q"]["kernel"].a, q["q"]["kernel"].a)


def test_loraplus_inside_freeze_keeps_the_base_frozen():
    tree = {"params": ADAPTER_PARAMS, "adapters": _adapter_tree()}
    tx = jaxpeft.freeze(jaxpeft.loraplus(optax.sgd, 0.1, ratio=8), {"params": False, "adapters": True})
    (updates,) = _updates(tx, tree, steps=1)
    grads = _grads(tree, 0)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["params"]))
    np.testing.assert_allclose(updates["adapters"]["q"]["kernel"].b, -0.8 * grads["adapters"]["q"]["kernel"].b)
    np.testing.assert_allclose(updates["adapters"]["q"]["kernel"].a, -0.1 * grads["adapters"]["q"]["kernel"].a)


def test_loraplus_b_filter_for_an_nnx_model():
    from flax import nnx

    import jaxpeft.nnx as jnnx

    class Model(nnx.Module):
        def __init__(self):
            self.q = nnx.Linear(4, 3, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.q(x)

    model = jnnx.adapt(Model(), jaxpeft.LoraConfig(rank=2, targets=["q"]), key=jax.random.key(0))
    jnnx.load_adapters(model, jax.tree.map(lambda x: x + 0.5, jnnx.adapters_of(model)))
    tx = jaxpeft.loraplus(optax.sgd, 0.1, ratio=16, b_filter=jaxpeft.path_filter(r"(^|/)b$"))
    optimizer = jnnx.optimizer(model, tx)
    grads = nnx.grad(lambda m: m(jnp.ones((2, 4))).sum(), argnums=nnx.DiffState(0, jnnx.AdapterParam))(model)
    before = jnnx.adapters_of(model)["q"]["kernel"]
    optimizer.update(model, grads)
    after = jnnx.adapters_of(model)["q"]["kernel"]
    np.testing.assert_allclose(after.b - before.b, -1.6 * grads["q"]["b"].get_value(), rtol=1e-5)
    np.testing.assert_allclose(after.a - before.a, -0.1 * grads["q"]["a"].get_value(), rtol=1e-5)


@pytest.mark.parametrize("ratio", [0, -1.0, float("inf"), "16"])
def test_loraplus_refuses_a_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"`ratio`=.*; expected a positive finite number"):
        jaxpeft.loraplus(optax.sgd, 0.1, ratio=ratio)
