"""DoRA: config, magnitude init, the norm without A·B, merge (one-way), errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
from jaxpeft.methods.dora import weight_norm


def test_magnitude_starts_at_the_column_norms_and_merge_is_identity_at_init():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32)
    params = {"lin": {"kernel": w}}
    adapters = jaxpeft.init(jaxpeft.DoraConfig(rank=2, targets=["lin"]), params, key=jax.random.key(0))
    node = adapters["lin"]["kernel"]
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(np.asarray(w), axis=0), rtol=1e-6)
    np.testing.assert_allclose(jaxpeft.merge(params, adapters)["lin"]["kernel"], w, rtol=1e-6)
    assert jaxpeft.DoraConfig.from_json(jaxpeft.DoraConfig(rank=2).to_json()) == jaxpeft.DoraConfig(rank=2)


def test_weight_norm_of_stacked_multi_axis_kernels():
    rng = np.random.default_rng(1)
    layout = jaxpeft.Layout(stack=1, fan_in=2, fan_out=1, kind="dense_general")
    w, a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 2, 4, 5), (3, 2, 4, 2), (3, 2, 5)))
    full = np.asarray(w) + 0.5 * np.einsum("sijr,sro->sijo", np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(weight_norm(w, a, b, 0.5, layout), np.sqrt((full**2).sum(axis=(1, 2))), rtol=1e-5)


def test_unmerge_is_refused_with_the_fix_and_abstract_params_too():
    params = {"lin": {"kernel": jnp.ones((6, 4))}}
    adapters = jaxpeft.init(jaxpeft.DoraConfig(rank=2, targets=["lin"]), params, key=jax.random.key(0))
    with pytest.raises(
        jaxpeft.NotMergeableError, match=r"'lin/kernel': a DoRA merge cannot be undone.*keep the params"
    ):
        jaxpeft.unmerge(params, adapters)
    abstract = jax.eval_shape(lambda: params)
    with pytest.raises(
        ValueError, match=r"DoRA starts the magnitude of 'lin/kernel' at the base weight's column norms"
    ):
        jaxpeft.init(jaxpeft.DoraConfig(rank=2, targets=["lin"]), abstract, key=jax.random.key(0))
    shapes = jax.eval_shape(
        lambda p: jaxpeft.init(jaxpeft.DoraConfig(rank=2, targets=["lin"]), p, key=jax.random.key(0)), abstract
    )
    assert shapes["lin"]["kernel"].magnitude.shape == (4,)
