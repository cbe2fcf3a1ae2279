"""LoraConfig validation and JSON, plan, init (shapes, distributions, determinism), merge/unmerge, formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft


def mlp_params(seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "up": {"kernel": jax.random.normal(k1, (16, 32), dtype), "bias": jnp.zeros(32, dtype)},
        "down": {"kernel": jax.random.normal(k2, (32, 16), dtype), "bias": jnp.zeros(16, dtype)},
        "embed": {"embedding": jax.random.normal(k3, (10, 16), dtype)},
    }


def perturb(adapters, seed=7, scale=0.1):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=False)]
    )


# --- config -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"`rank`=0; expected a positive integer"),
        ({"rank": 2.5}, r"`rank`=2.5; expected a positive integer"),
        ({"alpha": -1}, r"`alpha`=-1; expected a positive finite number"),
        ({"alpha": float("nan")}, r"`alpha`=nan; expected a positive finite number"),
        ({"alpha": float("inf")}, r"`alpha`=inf; expected a positive finite number"),
        ({"alpha": "16"}, r"`alpha`='16'; expected a positive finite number"),
        ({"dropout": 1.0}, r"`dropout`=1.0; expected a rate \(a number\) in \[0, 1\)"),
        ({"dropout": "0.1"}, r"`dropout`='0.1'; expected a rate"),
        ({"dropout": None}, r"`dropout`=None; expected a rate"),
        ({"use_rslora": "false"}, r"`use_rslora`='false'; expected True or False \(not a string\)"),
        ({"alpha_pattern": {"q": float("nan")}}, r"`alpha_pattern`\['q'\]=nan; expected a positive finite number"),
        ({"rank_pattern": {"q": float("inf")}}, r"`rank_pattern`\['q'\]=inf; expected a positive finite number"),
        ({"targets": ["q", 3]}, r"`targets` entries must be non-empty module names, got 3"),
        ({"exclude": "all-linear"}, r"`exclude`=\"all-linear\" is not allowed"),
        ({"dtype": "float64"}, r"`dtype`='float64' needs 64-bit JAX"),
        ({"init": "loftq"}, r"`init`='loftq'; expected one of"),
        ({"dtype": "int8"}, r"`dtype`='int8'; adapters need a floating dtype"),
        ({"dtype": "floaty"}, r"`dtype`='floaty' is not a dtype name"),
        ({"rank_pattern": {"q": 0}}, r"`rank_pattern`\['q'\]=0; expected a positive finite number"),
        ({"rank_pattern": {"q": 1.5}}, r"ranks are whole numbers"),
        ({"targets": 3}, r"`targets` must be 'all-linear', a regex"),
        ({"alpha_pattern": {"(": 2.0}}, r"`alpha_pattern` entry '\(' is not a valid regular expression"),
    ],
)
def test_config_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxpeft.LoraConfig(**kwargs)


def test_config_is_hashable_and_json_round_trips():
    cfg = jaxpeft.LoraConfig(
        rank=4, alpha=8, targets=["up", "down"], rank_pattern={"down": 2}, alpha_pattern={"up": 3}, dtype="bfloat16"
    )
    assert hash(cfg) == hash(jaxpeft.LoraConfig.from_json(cfg.to_json()))
    assert jaxpeft.LoraConfig.from_json(cfg.to_json()) == cfg
    assert cfg.targets == ("up", "down") and cfg.rank_pattern == (("down", 2),)


def test_config_json_errors():
    with pytest.raises(ValueError, match="`targets` is a function and cannot be written to JSON"):
        jaxpeft.LoraConfig(targets=lambda p, x: True).to_json()
    with pytest.raises(ValueError, match=r"unknown fields \['lora_rank'\]"):
        jaxpeft.LoraConfig.from_dict({"lora_rank": 3})
    with pytest.raises(ValueError, match="method='ia3'"):
        jaxpeft.LoraConfig.from_dict({"method": "ia3"})


def test_scale_rank_and_alpha_patterns():
    cfg = jaxpeft.LoraConfig(rank=8, alpha=16, rank_pattern={"down": 4}, alpha_pattern={"down": 2})
    assert cfg.scale_for("up/kernel") == 2.0
    assert cfg.scale_for("down/kernel") == 0.5
    rs = jaxpeft.LoraConfig(rank=16, alpha=8, use_rslora=True)
    assert rs.scale_for("x") == pytest.approx(8 / math.sqrt(16))


def test_pattern_matching_no_target_is_an_error():
    cfg = jaxpeft.LoraConfig(targets=["up"], rank_pattern={"attention": 4})
    with pytest.raises(ValueError, match=r"`rank_pattern` key 'attention' matches none of the 1 targets"):
        jaxpeft.plan(cfg, mlp_params())


# --- plan & init --------------------------------------------------------------------------------------------------


def test_plan_lists_targets_and_counts():
    cfg = jaxpeft.LoraConfig(rank=4, targets=["up", "down", "embed"], rank_pattern={"down": 2})
    plan = jaxpeft.plan(cfg, mlp_params())
    rows = {t.path: t for t in plan.targets}
    assert rows["up/kernel"].n_params == 16 * 4 + 4 * 32
    assert rows["down/kernel"].rank == 2
    assert rows["embed/embedding"].layout.kind == "embed"
    text = str(plan)
    assert "down/kernel" in text and f"{plan.n_params:,} adapter parameters" in text


def test_init_shapes_dtype_and_zero_delta():
    cfg = jaxpeft.LoraConfig(rank=4, alpha=8, targets=["up", "embed"])
    adapters = jaxpeft.init(cfg, mlp_params(dtype=jnp.bfloat16), key=jax.random.key(1))
    up = adapters["up"]["kernel"]
    assert up.a.shape == (16, 4) and up.b.shape == (4, 32) and up.a.dtype == jnp.float32
    assert up.scale == 2.0 and not np.any(np.asarray(up.b))
    emb = adapters["embed"]["embedding"]
    assert not np.any(np.asarray(emb.a)) and np.all(np.asarray(emb.b) != 0)  # HF: A zeros, B normal
    assert set(adapters) == {"up", "embed"}


def test_kaiming_and_gaussian_distributions():
    params = {"w": {"kernel": jnp.zeros((400, 300))}}
    a = jaxpeft.init(jaxpeft.LoraConfig(rank=64, targets=["w"]), params, key=jax.random.key(0))["w"]["kernel"].a
    bound = 1 / math.sqrt(400)
    assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.95 * bound
    g = jaxpeft.LoraConfig(rank=64, targets=["w"], init="gaussian")
    a = jaxpeft.init(g, params, key=jax.random.key(0))["w"]["kernel"].a
    assert float(jnp.std(a)) == pytest.approx(1 / 64, rel=0.05)


def test_init_is_deterministic_and_independent_of_dict_order():
    p = mlp_params()
    reordered = {k: p[k] for k in reversed(list(p))}
    cfg = jaxpeft.LoraConfig(targets="all-linear")
    a1 = jaxpeft.init(cfg, p, key=jax.random.key(3))
    a2 = jaxpeft.init(cfg, reordered, key=jax.random.key(3))
    a3 = jaxpeft.init(cfg, p, key=jax.random.key(4))
    for path in ("up", "down"):
        np.testing.assert_array_equal(a1[path]["kernel"].a, a2[path]["kernel"].a)
        assert not np.array_equal(a1[path]["kernel"].a, a3[path]["kernel"].a)


def test_init_works_on_abstract_params():
    abstract = jax.eval_shape(mlp_params)
    adapters = jax.eval_shape(lambda: jaxpeft.init(jaxpeft.LoraConfig(), abstract, key=jax.random.key(0)))
    assert adapters["up"]["kernel"].a.shape == (16, 8)


# --- merge / unmerge ------------------------------------------------------------------------------------------------


def test_explicit_formula_single_dense_layer():
    params = mlp_params()
    cfg = jaxpeft.LoraConfig(rank=4, alpha=12, targets=["up"])
    lora = perturb(jaxpeft.init(cfg, params, key=jax.random.key(1)))["up"]["kernel"]
    x = jax.random.normal(jax.random.key(2), (5, 16))
    w, b = params["up"]["kernel"], params["up"]["bias"]
    expected = x @ w + b + 3.0 * (x @ lora.a) @ lora.b
    got = jaxpeft.ops.lora_dense(x, w, lora, b)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    merged_w = jaxpeft.merge(params, {"up": {"kernel": lora}})["up"]["kernel"]
    np.testing.assert_allclose(x @ merged_w + b, expected, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_round_trip_and_purity():
    params = mlp_params()
    adapters = perturb(jaxpeft.init(jaxpeft.LoraConfig(targets="all-linear"), params, key=jax.random.key(1)))
    merged = jaxpeft.merge(params, adapters)
    assert not np.allclose(merged["up"]["kernel"], params["up"]["kernel"])
    np.testing.assert_array_equal(merged["up"]["bias"], params["up"]["bias"])
    back = jaxpeft.unmerge(merged, adapters)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), back, params)


def test_merge_keeps_base_dtype():
    params = mlp_params(dtype=jnp.bfloat16)
    adapters = perturb(jaxpeft.init(jaxpeft.LoraConfig(targets=["up"]), params, key=jax.random.key(1)))
    assert jaxpeft.merge(params, adapters)["up"]["kernel"].dtype == jnp.bfloat16


def test_merge_errors_name_the_path():
    params = mlp_params()
    adapters = jaxpeft.init(jaxpeft.LoraConfig(targets=["up"]), params, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"adapters \['up/kernel'\] have no matching parameter"):
        jaxpeft.merge({"down": params["down"]}, adapters)
    wrong = {"up": {"kernel": jnp.zeros((17, 32))}}
    with pytest.raises(ValueError, match=r"adapter 'up/kernel' .* does not fit the weight of shape \(17, 32\)"):
        jaxpeft.merge(wrong, adapters)
    with pytest.raises(ValueError, match="adapter tree entry 'up/kernel' is a ArrayImpl, not an adapter node"):
        jaxpeft.merge(params, {"up": {"kernel": jnp.zeros(3)}})


def test_stacked_delta_matches_per_layer():
    w = jax.random.normal(jax.random.key(0), (3, 6, 5))
    layouts = {"s/kernel": jaxpeft.Layout(stack=1)}
    adapters = perturb(
        jaxpeft.init(
            jaxpeft.LoraConfig(rank=2, targets=["s"]), {"s": {"kernel": w}}, key=jax.random.key(1), layouts=layouts
        )
    )
    lora = adapters["s"]["kernel"]
    assert lora.a.shape == (3, 6, 2) and lora.b.shape == (3, 2, 5)
    merged = jaxpeft.merge({"s": {"kernel": w}}, adapters)["s"]["kernel"]
    for i in range(3):
        np.testing.assert_allclose(merged[i], w[i] + lora.scale * lora.a[i] @ lora.b[i], rtol=1e-5, atol=1e-5)


def test_merge_refuses_integer_weights_and_float16_overflow():
    adapters = jaxpeft.init(
        jaxpeft.LoraConfig(rank=2, targets=["w"]), {"w": {"kernel": jnp.ones((4, 3))}}, key=jax.random.key(0)
    )
    with pytest.raises(jaxpeft.NotMergeableError, match=r"adapter 'w/kernel': the weight is int8, not floating"):
        jaxpeft.merge({"w": {"kernel": jnp.ones((4, 3), jnp.int8)}}, adapters)
    big = jax.tree.map(lambda x: x + 300.0, adapters)
    with pytest.raises(
        ValueError, match=r"folding the adapter into 'w/kernel' overflows float16 \(largest finite 65504\)"
    ):
        jaxpeft.merge({"w": {"kernel": jnp.full((4, 3), 60000.0, jnp.float16)}}, big)
    merged = jax.jit(jaxpeft.merge)({"w": {"kernel": jnp.ones((4, 3), jnp.float16)}}, adapters)  # under jit: no check
    assert merged["w"]["kernel"].dtype == jnp.float16
