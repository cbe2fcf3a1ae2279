"""IA3: config validation and errors, vector shapes per layer kind, merge/unmerge with and without bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft

PARAMS = {
    "k_proj": {"kernel": jnp.ones((6, 4)), "bias": jnp.ones(4)},
    "down_proj": {"kernel": jnp.ones((8, 6))},
    "conv": {"kernel": jnp.ones((3, 3, 2, 5)), "bias": jnp.zeros(5)},
    "embed": {"embedding": jnp.ones((10, 6))},
}
LAYOUTS = {"conv/kernel": jaxpeft.Layout(fan_in=3, kind="conv")}


def test_defaults_are_hf_llama_and_json_round_trips():
    cfg = jaxpeft.IA3Config()
    assert cfg.targets == ("k_proj", "v_proj", "down_proj") and cfg.feedforward == ("down_proj",)
    assert jaxpeft.IA3Config.from_json(cfg.to_json()) == cfg
    assert jaxpeft.config_from_dict(cfg.to_dict()) == cfg


def test_vector_shapes_follow_feedforward():
    cfg = jaxpeft.IA3Config(targets=["k_proj", "down_proj", "conv"], feedforward=["down_proj", "conv"])
    adapters = jaxpeft.init(cfg, PARAMS, key=jax.random.key(0), layouts=LAYOUTS)
    assert adapters["k_proj"]["kernel"].vector.shape == (4,) and not adapters["k_proj"]["kernel"].feedforward
    assert adapters["down_proj"]["kernel"].vector.shape == (8,) and adapters["down_proj"]["kernel"].feedforward
    assert adapters["conv"]["kernel"].vector.shape == (2,)  # input channels, not the window
    np.testing.assert_array_equal(adapters["k_proj"]["kernel"].vector, np.ones(4))


def test_merge_scales_output_and_bias_or_input_rows_and_unmerge_inverts():
    cfg = jaxpeft.IA3Config(targets=["k_proj", "down_proj"], feedforward=["down_proj"], init_ones=False)
    adapters = jaxpeft.init(cfg, PARAMS, key=jax.random.key(0))
    merged = jaxpeft.merge(PARAMS, adapters)
    vk, vd = adapters["k_proj"]["kernel"].vector, adapters["down_proj"]["kernel"].vector
    np.testing.assert_allclose(merged["k_proj"]["kernel"], PARAMS["k_proj"]["kernel"] * vk[None, :], rtol=1e-6)
    np.testing.assert_allclose(merged["k_proj"]["bias"], PARAMS["k_proj"]["bias"] * vk, rtol=1e-6)
    np.testing.assert_allclose(merged["down_proj"]["kernel"], PARAMS["down_proj"]["kernel"] * vd[:, None], rtol=1e-6)
    back = jaxpeft.unmerge(merged, adapters)
    np.testing.assert_allclose(back["k_proj"]["bias"], PARAMS["k_proj"]["bias"], rtol=1e-6)
    np.testing.assert_allclose(back["down_proj"]["kernel"], PARAMS["down_proj"]["kernel"], rtol=1e-6)


def test_errors_name_the_path_and_fix():
    with pytest.raises(ValueError, match=r"IA3 cannot adapt 'embed/embedding' \(a embed weight\).*Add it to `exclude`"):
        jaxpeft.init(jaxpeft.IA3Config(targets=["embed"], feedforward=()), PARAMS, key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"`feedforward` entry 'up_proj' selects none of the 1 targets .*also be targets"
    ):
        jaxpeft.init(jaxpeft.IA3Config(targets=["k_proj"], feedforward=["up_proj"]), PARAMS, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`dtype`='int8'; adapters need a floating dtype"):
        jaxpeft.IA3Config(dtype="int8")
    wrong = {"k_proj": {"kernel": jnp.ones((6, 5)), "bias": jnp.ones(5)}}
    adapters = jaxpeft.init(jaxpeft.IA3Config(targets=["k_proj"], feedforward=()), PARAMS, key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"adapter 'k_proj/kernel' \(IA3Weights: vector \(4,\)\) .* expected vector \(5,\)"
    ):
        jaxpeft.merge(wrong, adapters)
