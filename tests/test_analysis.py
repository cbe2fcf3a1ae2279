"""summary (PEFT vs full memory accounting) and update_spectrum (is a weight update low-rank?)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft

PARAMS = {"w": {"kernel": jnp.ones((64, 32))}, "b": {"bias": jnp.ones(32)}}


def test_summary_counts_and_optimizer_bytes():
    adapters = jaxpeft.init(jaxpeft.LoraConfig(rank=4, targets=["w"]), PARAMS, key=jax.random.key(0))
    s = jaxpeft.summary(PARAMS, adapters)
    assert s.trainable_params == 64 * 4 + 4 * 32 and s.base_params == 64 * 32 + 32
    assert s.trainable_bytes == 4 * s.trainable_params
    # Adam: two float32 moments per trainable parameter (+ a step count), measured via eval_shape
    assert 2 * s.trainable_bytes <= s.optimizer_bytes_peft <= 2 * s.trainable_bytes + 16
    assert 2 * s.base_bytes <= s.optimizer_bytes_full <= 2 * s.base_bytes + 16
    assert s.trainable_percent == pytest.approx(100 * 384 / (384 + 2080))
    sgd = jaxpeft.summary(PARAMS, adapters, tx=optax.sgd(0.1))
    assert sgd.optimizer_bytes_peft == 0
    text = str(s)
    assert "optimizer-state bytes" in text and "trainable%: 15.5" in text


def test_update_spectrum_low_rank_vs_full_rank():
    key = jax.random.key(0)
    u, v = jax.random.normal(key, (32, 1)), jax.random.normal(jax.random.key(1), (1, 16))
    before = {"w": jnp.zeros((32, 16)), "bias": jnp.zeros(16)}
    low = jaxpeft.update_spectrum(before, {"w": u @ v, "bias": jnp.ones(16)}, rank=1)
    assert low == {"w": pytest.approx(1.0)}
    full = jaxpeft.update_spectrum(before, {"w": jax.random.normal(key, (32, 16)), "bias": jnp.ones(16)}, rank=1)
    assert full["w"] < 0.3
    np.testing.assert_equal(jaxpeft.update_spectrum(before, before), {})
    with pytest.raises(ValueError, match="`after` has no leaf 'w'"):
        jaxpeft.update_spectrum(before, {"bias": jnp.ones(16)})


def test_summary_counts_a_quantised_base_by_logical_size_and_stored_bytes():
    import jaxpeft.quant

    params = {"w": {"kernel": jnp.ones((256, 128), jnp.bfloat16)}, "norm": {"scale": jnp.ones(128, jnp.bfloat16)}}
    cfg = jaxpeft.LoraConfig(rank=4, targets=["w"])
    q = jaxpeft.quant.quantize(params, cfg, kind="nf4")
    adapters = jaxpeft.init(cfg, q, key=jax.random.key(0))
    plain, quantised = jaxpeft.summary(params, adapters), jaxpeft.summary(q, adapters)
    assert quantised.base_params == plain.base_params == 256 * 128 + 128
    assert quantised.base_bytes <= 0.30 * plain.base_bytes
    assert quantised.optimizer_bytes_full == plain.optimizer_bytes_full  # full fine-tuning trains float weights


def test_sharding_of_a_quantised_base_reads_the_weights_spec_from_its_codes():
    from jax.sharding import PartitionSpec as P

    import jaxpeft.quant
    import jaxpeft.sharding

    params = {"w": {"kernel": jnp.ones((256, 128))}}
    cfg = jaxpeft.LoraConfig(rank=4, targets=["w"])
    q = jaxpeft.quant.quantize(params, cfg, kind="int8")
    adapters = jaxpeft.init(cfg, q, key=jax.random.key(0))
    assert jaxpeft.sharding.adapter_specs(adapters, q)["w"]["kernel"].a == P(None, None)  # one device: replicated
    specs = {"w": {"kernel": q["w"]["kernel"].array_specs(P("fsdp", "tp"), {"fsdp": 2, "tp": 2})}}
    assert jaxpeft.sharding.adapter_specs(adapters, specs)["w"]["kernel"].a == P("fsdp", None)
    assert jaxpeft.sharding.adapter_specs(adapters, {"w": {"kernel": P("fsdp", "tp")}})["w"]["kernel"].a == P(
        "fsdp", None
    )
