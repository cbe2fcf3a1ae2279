"""optax freezing: jaxpeft.freeze zeroes frozen updates and keeps no state for them; optax.masked alone leaks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

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
