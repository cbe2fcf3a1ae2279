"""partition/combine (equinox semantics), path filters, trainable_mask polarity, and their errors."""

import jax
import jax.numpy as jnp
import pytest

import jaxpeft

TREE = {
    "params": {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}, "norm": {"scale": jnp.ones(2)}},
    "step": 3,
}


def test_partition_combine_round_trip_with_none_placeholders():
    train, frozen = jaxpeft.partition(TREE, jaxpeft.path_filter(r"norm/"))
    assert train["params"]["dense"]["kernel"] is None and frozen["params"]["norm"]["scale"] is None
    assert train["params"]["norm"]["scale"] is TREE["params"]["norm"]["scale"]
    assert jax.tree.structure(jaxpeft.combine(train, frozen)) == jax.tree.structure(TREE)
    assert jaxpeft.combine(train, frozen)["step"] == 3


def test_prefix_spec_bool_and_callable_leaves():
    mask = jaxpeft.trainable_mask(TREE, {"params": lambda x: getattr(x, "ndim", 0) == 2, "step": False})
    assert mask == {"params": {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}, "step": False}
    assert all(jax.tree.leaves(jaxpeft.trainable_mask(TREE, True)))


def test_path_filter_inside_prefix_sees_full_path():
    mask = jaxpeft.trainable_mask(TREE, {"params": jaxpeft.path_filter(r"^params/dense/b"), "step": False})
    assert mask["params"]["dense"] == {"kernel": False, "bias": True}


def test_partition_over_params_and_adapters_trains_adapters_only():
    params = {"w": {"kernel": jnp.ones((4, 4))}}
    adapters = jaxpeft.init(jaxpeft.LoraConfig(rank=2, targets=["w"]), params, key=jax.random.key(0))
    train, _frozen = jaxpeft.partition({"params": params, "adapters": adapters}, {"params": False, "adapters": True})
    assert train["params"]["w"]["kernel"] is None
    assert isinstance(train["adapters"]["w"]["kernel"], jaxpeft.LoraWeights)


def test_grad_of_trainable_half_only():
    train, frozen = jaxpeft.partition(TREE["params"], jaxpeft.path_filter("norm"))

    def loss(trainable):
        full = jaxpeft.combine(trainable, frozen)
        return jnp.sum(full["dense"]["kernel"] * full["norm"]["scale"])

    grads = jax.grad(loss)(train)
    assert [x.shape for x in jax.tree.leaves(grads)] == [(2,)]


def test_errors():
    with pytest.raises(ValueError, match=r"filter spec at 'params' is 'yes'; expected a bool, a callable"):
        jaxpeft.trainable_mask(TREE, {"params": "yes", "step": False})
    with pytest.raises(ValueError, match=r"`filter_spec` is not a prefix of the tree: no entry covers 'step'"):
        jaxpeft.trainable_mask(TREE, {"params": True})
    with pytest.raises(ValueError, match=r"`filter_spec` entries \['other'\] match nothing"):
        jaxpeft.trainable_mask(TREE, {"params": True, "step": False, "other": True})
    with pytest.raises(ValueError, match="path_filter\\(\\) needs at least one regex"):
        jaxpeft.path_filter()
    with pytest.raises(ValueError, match="not a valid regular expression"):
        jaxpeft.path_filter("(")
    with pytest.raises(ValueError, match="combine\\(\\) needs at least one tree"):
        jaxpeft.combine()
