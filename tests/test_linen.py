"""jaxpeft.linen: layouts, identity at init, merged ≡ unmerged, grads only for adapters, training, bf16, stacks."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft
import jaxpeft.linen


class Block(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(2 * self.width, name="up")(nn.LayerNorm(name="norm")(x))
        return x + nn.Dense(self.width, name="down")(jnp.tanh(h)), None


class Zoo(nn.Module):
    """Every supported layer, a scanned stack, a remat'd block, a vmapped dense and a tied head."""

    vocab: int = 12
    width: int = 8

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.width, name="embed")
        x = embed(ids)
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True}, length=2)(
            name="layers"
        )(x, None)
        x, _ = nn.remat(Block)(name="remat_block")(x)
        x = nn.DenseGeneral((2, 4), name="heads")(x)
        x = nn.Einsum((2, 4, self.width), "...ab,abc->...c", name="merge_heads")(x)
        img = x.reshape(x.shape[0], x.shape[1], 1, self.width)
        x = x + nn.Conv(self.width, (3, 1), padding="SAME", name="conv")(img).reshape(x.shape)
        vdense = nn.vmap(
            nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0, axis_size=2
        )
        x = vdense(self.width, name="per_batch")(x)
        return embed.attend(x) + nn.Dense(self.vocab, name="lm_head")(x)


MODEL = Zoo()
IDS = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]])
PARAMS = MODEL.init(jax.random.key(0), IDS)["params"]
TARGETS = ["up", "down", "heads", "merge_heads", "conv", "per_batch", "embed", "lm_head"]


def make_adapters(cfg=None, params=PARAMS, perturbed=True):
    cfg = cfg or jaxpeft.LoraConfig(rank=2, alpha=4, targets=TARGETS)
    adapters = jaxpeft.linen.init(cfg, MODEL, params, IDS, key=jax.random.key(1))
    if perturbed:
        leaves, treedef = jax.tree.flatten(adapters)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        adapters = jax.tree.unflatten(
            treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=False)]
        )
    return adapters


def run_eager(params, adapters, rngs=None):
    return jaxpeft.linen.apply(MODEL, {"params": params}, adapters, IDS, rngs=rngs)


run = jax.jit(run_eager)  # the tests' forward; test_jit_equals_no_jit compares it with the eager one


def test_infer_layouts():
    layouts = jaxpeft.linen.infer_layouts(MODEL, IDS)
    assert layouts["layers/up/kernel"] == jaxpeft.Layout(stack=1, fan_in=1, fan_out=1, kind="dense")
    assert layouts["remat_block/up/kernel"].stack == 0
    assert layouts["heads/kernel"] == jaxpeft.Layout(fan_in=1, fan_out=2, kind="dense_general")
    assert layouts["merge_heads/kernel"] == jaxpeft.Layout(fan_in=2, fan_out=1, kind="einsum")
    assert layouts["conv/kernel"] == jaxpeft.Layout(fan_in=3, fan_out=1, kind="conv")
    assert layouts["per_batch/kernel"].stack == 1
    assert layouts["embed/embedding"].kind == "embed"


def test_all_linear_with_layouts_skips_head_conv_and_embedding():
    plan = jaxpeft.plan(jaxpeft.LoraConfig(), PARAMS, layouts=jaxpeft.linen.infer_layouts(MODEL, IDS))
    chosen = {t.path for t in plan.targets}
    assert "lm_head/kernel" not in chosen and "conv/kernel" not in chosen and "embed/embedding" not in chosen
    assert {"layers/up/kernel", "heads/kernel", "merge_heads/kernel", "per_batch/kernel"} <= chosen


def test_stacked_adapter_shapes():
    adapters = make_adapters(perturbed=False)
    up = adapters["layers"]["up"]["kernel"]
    assert up.a.shape == (2, 8, 2) and up.b.shape == (2, 2, 16)
    assert adapters["heads"]["kernel"].b.shape == (2, 2, 4)
    assert adapters["merge_heads"]["kernel"].a.shape == (2, 4, 2)
    assert adapters["conv"]["kernel"].a.shape == (3, 1, 8, 2)


def test_identity_at_init_is_exact():
    np.testing.assert_array_equal(run(PARAMS, make_adapters(perturbed=False)), MODEL.apply({"params": PARAMS}, IDS))


def test_merged_equals_unmerged():
    adapters = make_adapters()
    out = run(PARAMS, adapters)
    base = MODEL.apply({"params": PARAMS}, IDS)
    assert float(jnp.abs(out - base).max()) > 1e-2  # every branch is live
    merged = MODEL.apply({"params": jaxpeft.merge(PARAMS, adapters)}, IDS)
    np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jaxpeft.merged(lambda p, x: MODEL.apply({"params": p}, x))(PARAMS, adapters, IDS), merged
    )


def test_each_layer_kind_contributes():
    adapters = make_adapters()
    full = run(PARAMS, adapters)
    for name in TARGETS:
        without = {k: v for k, v in adapters.items() if k != name}
        if name in ("up", "down"):
            without = {k: v for k, v in adapters.items() if k != "layers"}
        assert float(jnp.abs(run(PARAMS, without) - full).max()) > 1e-4, name


def test_jit_equals_no_jit_and_no_retrace():
    adapters = make_adapters()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(a):
        return run_eager(PARAMS, a)

    np.testing.assert_allclose(f(adapters), run_eager(PARAMS, adapters), rtol=1e-5, atol=1e-5)
    f(jax.tree.map(lambda x: x * 2, adapters))  # new values, same structure: no retrace


def loss_fn(adapters, params=PARAMS, **kw):
    logits = run(params, adapters, **kw)
    return optax.softmax_cross_entropy_with_integer_labels(logits, (IDS + 1) % 12).mean()


def test_grads_exist_only_for_adapters():
    adapters = make_adapters()
    grads = jax.grad(loss_fn)(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    assert nbytes(grads) == nbytes(adapters)
    for path, g in jaxpeft._paths.leaves_with_paths(grads):
        assert float(jnp.abs(g).max()) > 0, path


def test_frozen_params_bit_identical_after_training_and_loss_drops():
    cfg = jaxpeft.LoraConfig(rank=4, alpha=8, targets="all-linear")
    adapters = jaxpeft.linen.init(cfg, MODEL, PARAMS, IDS, key=jax.random.key(1))
    before = jax.tree.map(np.array, PARAMS)
    tx = optax.adam(3e-2)
    opt = tx.init(adapters)

    @jax.jit
    def step(adapters, opt):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt = tx.update(grads, opt, adapters)
        return optax.apply_updates(adapters, updates), opt, loss

    first = None
    for _ in range(60):
        adapters, opt, loss = step(adapters, opt)
        first = first if first is not None else float(loss)
    assert float(loss) < 0.5 * first
    jax.tree.map(np.testing.assert_array_equal, PARAMS, before)


def test_bf16_base():
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    adapters = make_adapters(params=params16)
    assert jax.tree.leaves(adapters)[0].dtype == jnp.float32
    out = run(params16, adapters)
    merged = MODEL.apply({"params": jaxpeft.merge(params16, adapters)}, IDS)
    assert out.dtype == MODEL.apply({"params": params16}, IDS).dtype
    out, merged = np.asarray(out, np.float32), np.asarray(merged, np.float32)
    np.testing.assert_allclose(out, merged, atol=0.02 * np.abs(merged).max())  # bf16 rounding of W + ΔW
    grads = jax.grad(lambda a: loss_fn(a, params16))(adapters)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_dropout_needs_a_key_and_changes_the_branch():
    cfg = jaxpeft.LoraConfig(rank=2, targets=["up", "down"], dropout=0.5)
    adapters = make_adapters(cfg)
    no_key = run(PARAMS, adapters)
    k1 = run(PARAMS, adapters, rngs={"dropout": jax.random.key(0)})
    k1_again = run(PARAMS, adapters, rngs={"dropout": jax.random.key(0)})
    k2 = run(PARAMS, adapters, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(k1, k1_again)
    assert not np.allclose(k1, no_key) and not np.allclose(k1, k2)
    zero = make_adapters(jaxpeft.LoraConfig(rank=2, targets=["up", "down"]))
    np.testing.assert_array_equal(run(PARAMS, zero, rngs={"dropout": jax.random.key(0)}), run(PARAMS, zero))


def test_apply_without_params_collection_is_an_error():
    with pytest.raises(ValueError, match=r"`variables` has collections \['weights'\]; expected a 'params'"):
        jaxpeft.linen.apply(MODEL, {"weights": PARAMS}, {}, IDS)


def test_unused_adapters_are_an_error_unless_not_strict():
    adapters = make_adapters(perturbed=False)
    stray = {**adapters, "missing": {"kernel": adapters["lm_head"]["kernel"]}}
    with pytest.raises(ValueError, match=r"adapters \['missing/kernel'\] were not used by this forward"):
        jaxpeft.linen.apply(MODEL, {"params": PARAMS}, stray, IDS)
    out = jaxpeft.linen.apply(MODEL, {"params": PARAMS}, stray, IDS, strict=False)
    np.testing.assert_array_equal(out, run(PARAMS, adapters))


def test_unsupported_layers_are_refused_by_name():
    class Grouped(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3,), feature_group_count=2, name="gconv")(x)

    x = jnp.ones((1, 5, 4))
    params = Grouped().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="'gconv/kernel' cannot be adapted: grouped convolutions"):
        jaxpeft.linen.init(jaxpeft.LoraConfig(targets=["gconv"]), Grouped(), params, x, key=jax.random.key(0))


def test_train_state_composition():
    from flax.training import train_state

    adapters = make_adapters(perturbed=False)
    state = train_state.TrainState.create(
        apply_fn=lambda a, ids: jaxpeft.linen.apply(MODEL, {"params": PARAMS}, a, ids),
        params=adapters,
        tx=optax.sgd(0.1),
    )
    grads = jax.grad(loss_fn)(state.params)
    new = state.apply_gradients(grads=grads)
    assert new.step == 1 and jax.tree.structure(new.params) == jax.tree.structure(adapters)


def test_init_and_plan_refuse_the_whole_variables_dict():
    cfg = jaxpeft.LoraConfig(rank=2, targets=["up"])
    with pytest.raises(ValueError, match=r"`params` has the top-level keys \['params'\]: it looks like the whole"):
        jaxpeft.linen.init(cfg, MODEL, {"params": PARAMS}, IDS, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"Pass its 'params' collection"):
        jaxpeft.linen.plan(cfg, MODEL, {"params": PARAMS}, IDS)


def test_plan_matches_init():
    cfg = jaxpeft.LoraConfig(rank=2, targets=TARGETS)
    plan = jaxpeft.linen.plan(cfg, MODEL, PARAMS, IDS)
    adapters = jaxpeft.linen.init(cfg, MODEL, PARAMS, IDS, key=jax.random.key(0))
    assert [t.path for t in plan.targets] == [p for p, _ in jaxpeft.adapter_items(adapters)]
    assert plan.n_params == sum(x.size for x in jax.tree.leaves(adapters))
    layers_up = next(t for t in plan.targets if t.path == "layers/up/kernel")
    assert layers_up.shapes == {"a": (2, 8, 2), "b": (2, 2, 16)} and layers_up.layout.stack == 1


def test_adapters_for_a_wider_model_name_the_path_and_shapes():
    wider = {"lm_head": {"kernel": jnp.zeros((16, 12))}}
    adapters = jaxpeft.init(jaxpeft.LoraConfig(rank=2, targets=["lm_head"]), wider, key=jax.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"adapter 'lm_head/kernel' \(LoraWeights: a \(16, 2\), b \(2, 12\)\) does not fit the weight of shape "
        r"\(8, 12\): expected A \(8, 2\) and B \(2, 12\)",
    ):
        jaxpeft.linen.apply(MODEL, {"params": PARAMS}, adapters, IDS)


def test_hand_built_adapter_with_mismatched_rank_is_named():
    adapters = make_adapters(jaxpeft.LoraConfig(rank=2, targets=["lm_head"]), perturbed=False)
    node = adapters["lm_head"]["kernel"]
    bad = {"lm_head": {"kernel": jaxpeft.LoraWeights(node.a, jnp.zeros((3, 12)), 1.0, layout=node.layout)}}
    with pytest.raises(
        ValueError,
        match=r"adapter 'lm_head/kernel' \(LoraWeights: a \(8, 2\), b \(3, 12\)\) .* "
        r"expected A \(8, 2\) and B \(2, 12\)",
    ):
        jaxpeft.linen.apply(MODEL, {"params": PARAMS}, bad, IDS)
