"""jaxpeft.nnx: layouts, identity, merged ≡ unmerged, functional split, training, stacks, bf16, interop, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft
import jaxpeft.checkpoint
import jaxpeft.linen
import jaxpeft.nnx as jnnx

WIDTH = 8


class Block(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs, **kw):
        self.norm = nnx.LayerNorm(width, rngs=rngs, **kw)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs, **kw)
        self.down = nnx.Linear(2 * width, width, rngs=rngs, **kw)

    def __call__(self, x):
        return x + self.down(jnp.tanh(self.up(self.norm(x))))


def make_stack(width: int, depth: int, rngs: nnx.Rngs, **kw) -> Block:
    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Block(width, rngs=rngs, **kw)

    return create(rngs)


def run_stack(stack: Block, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
        return block(x)

    return body(x, stack)


class Zoo(nnx.Module):
    """Every supported layer, an unrolled nnx.List, a vmap-built stack run by nnx.scan, and a tied head."""

    def __init__(self, *, rngs: nnx.Rngs):
        width = WIDTH
        self.embed = nnx.Embed(12, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, rngs=rngs) for _ in range(2)])
        self.layers = make_stack(width, 3, rngs)
        self.heads = nnx.LinearGeneral(width, (2, 4), rngs=rngs)
        self.merge_heads = nnx.LinearGeneral((2, 4), width, axis=(-2, -1), rngs=rngs)
        self.mix = nnx.Einsum("btd,de->bte", (width, width), (width,), rngs=rngs)
        self.conv = nnx.Conv(width, width, (3,), rngs=rngs)
        self.out = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        x = run_stack(self.layers, x)
        x = x + self.merge_heads(self.heads(x))
        x = self.conv(self.mix(x))
        return self.embed.attend(self.out(x))


class Small(nnx.Module):
    """Embedding, a scanned stack and a tied head; every parameter in ``param_dtype``."""

    def __init__(self, *, rngs: nnx.Rngs, **kw):
        self.embed = nnx.Embed(12, WIDTH, rngs=rngs, **kw)
        self.layers = make_stack(WIDTH, 3, rngs, **kw)
        self.out = nnx.Linear(WIDTH, WIDTH, rngs=rngs, **kw)

    def __call__(self, ids):
        return self.embed.attend(self.out(run_stack(self.layers, self.embed(ids))))


IDS = jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]])
ALL_WEIGHTS = jaxpeft.LoraConfig(rank=2, alpha=4, targets=r"(kernel|embedding)$")


@nnx.jit
def forward(model, x):
    """One compiled forward per model structure (eager ``nnx.scan`` would recompile its body on every call)."""
    return model(x)


def build(factory, *, seed: int = 0, dtype=np.float32):
    """``factory()`` with host-made parameters: no XLA compilation (flax's initializers compile slowly on CPU)."""
    model = nnx.eval_shape(factory)
    rng = np.random.default_rng(seed)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            shape = node.get_value().shape
            std = 1.0 / np.sqrt(shape[-2]) if len(shape) >= 2 else 0.1  # keeps activations O(1)
            value = std * rng.standard_normal(shape) + (1.0 if path[-1] == "scale" else 0.0)
            node.set_value(jnp.asarray(value.astype(dtype)))
    return model


def zoo() -> Zoo:
    return build(lambda: Zoo(rngs=nnx.Rngs(0)))


def small(**kw) -> Small:
    return build(lambda: Small(rngs=nnx.Rngs(0), **kw), dtype=kw.get("param_dtype", np.float32))


def perturb(adapters, seed: int = 3, size: float = 0.1):
    """Adapters plus Gaussian noise, made on the host (no XLA compilation: threefry compiles slowly on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + size * rng.normal(size=x.shape).astype(x.dtype)), adapters
    )


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- layouts and paths


def test_infer_layouts_reads_every_kind_and_stack():
    layouts = jnnx.infer_layouts(zoo())
    assert layouts["embed/embedding"] == jaxpeft.Layout(kind="embed")
    assert layouts["blocks/0/up/kernel"] == jaxpeft.Layout(kind="dense")
    assert layouts["layers/up/kernel"] == jaxpeft.Layout(stack=1, kind="dense")
    assert layouts["heads/kernel"] == jaxpeft.Layout(fan_in=1, fan_out=2, kind="dense_general")
    assert layouts["merge_heads/kernel"] == jaxpeft.Layout(fan_in=2, fan_out=1, kind="dense_general")
    assert layouts["mix/kernel"] == jaxpeft.Layout(kind="einsum")
    assert layouts["conv/kernel"] == jaxpeft.Layout(fan_in=2, fan_out=1, kind="conv")
    assert isinstance(layouts["blocks/0/norm/scale"], jaxpeft.Unsupported)
    assert "not its `bias`" in layouts["out/bias"].reason


def test_unsupported_layers_say_why():
    class Odd(nnx.Module):
        def __init__(self, rngs):
            self.grouped = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=rngs)
            self.batched = nnx.LinearGeneral(4, 3, batch_axis={0: 2}, rngs=rngs)
            self.transposed = nnx.Einsum("btd,hd->bth", (3, 4), rngs=rngs)

    layouts = jnnx.infer_layouts(nnx.eval_shape(lambda: Odd(nnx.Rngs(0))))  # abstract models work too
    assert "grouped" in layouts["grouped/kernel"].reason
    assert "batch_axis" in layouts["batched/kernel"].reason
    assert "not ordered" in layouts["transposed/kernel"].reason


def test_base_params_and_adapters_match_the_pure_form():
    model = zoo()
    adapted = jnnx.adapt(model, ALL_WEIGHTS, key=jax.random.key(1))
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    chex.assert_trees_all_equal(jnnx.base_params(model), pure)
    chex.assert_trees_all_equal(jnnx.base_params(adapted), pure)  # the wrapper level is dropped
    expected = jaxpeft.init(ALL_WEIGHTS, pure, key=jax.random.key(1), layouts=jnnx.infer_layouts(model))
    got = jnnx.adapters_of(adapted)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    chex.assert_trees_all_equal(got, expected)  # same key -> same adapters as the core init
    assert got["layers"]["up"]["kernel"].a.shape == (3, WIDTH, 2)  # the stack axis leads A and B
    assert got["layers"]["up"]["kernel"].b.shape == (3, 2, 2 * WIDTH)
    assert str(jnnx.plan(ALL_WEIGHTS, model)) == str(jaxpeft.plan(ALL_WEIGHTS, pure, layouts=jnnx.infer_layouts(model)))


def test_all_linear_skips_heads_embeddings_and_convs():
    class WithHead(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(5, 4, rngs=rngs)
            self.proj = nnx.Linear(4, 4, rngs=rngs)
            self.conv = nnx.Conv(4, 4, (3,), rngs=rngs)
            self.lm_head = nnx.Linear(4, 5, rngs=rngs)

    abstract = nnx.eval_shape(lambda: WithHead(nnx.Rngs(0)))
    assert [t.path for t in jnnx.plan(jaxpeft.LoraConfig(), abstract).targets] == ["proj/kernel"]
    adapted = jnnx.adapt(abstract, jaxpeft.LoraConfig(rank=2), key=jax.random.key(0))
    assert list(jnnx.adapters_of(adapted)) == ["proj"]
    assert isinstance(adapted.proj.base.kernel.get_value(), jax.ShapeDtypeStruct)  # the base stays abstract


# ---------------------------------------------------------------- invariants of the forward


def test_identity_at_init_and_input_untouched():
    model = zoo()
    before = nnx.to_pure_dict(nnx.state(model))
    adapted = jnnx.adapt(model, ALL_WEIGHTS, key=jax.random.key(1))
    np.testing.assert_array_equal(adapted(IDS), model(IDS))  # eager: op by op, base(x) + 0 is exact
    # Compiled, XLA may merge dots that share an input (q·Eᵀ and q·Bᵀ of the tied head), so only rounding-close.
    np.testing.assert_allclose(forward(adapted, IDS), forward(model, IDS), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(model)), before)
    assert isinstance(model.out, nnx.Linear) and isinstance(adapted.out, jnnx.AdapterLayer)


def test_explicit_formula_single_linear():
    base = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    cfg = jaxpeft.LoraConfig(rank=2, alpha=3, targets="all-linear")
    adapted = jnnx.adapt(base, cfg, key=jax.random.key(1))
    jnnx.load_adapters(adapted, perturb(jnnx.adapters_of(adapted)))
    lora = jnnx.adapters_of(adapted)["kernel"]
    x = jax.random.normal(jax.random.key(2), (4, 5))
    w, b = base.kernel.get_value(), base.bias.get_value()
    hi = jax.lax.Precision.HIGHEST
    want = jnp.dot(x, w, precision=hi) + b + 1.5 * jnp.dot(jnp.dot(x, lora.a, precision=hi), lora.b, precision=hi)
    np.testing.assert_allclose(adapted(x), want, rtol=1e-5, atol=1e-6)


def test_merged_equals_unmerged_and_round_trips():
    adapted = jnnx.adapt(zoo(), ALL_WEIGHTS, key=jax.random.key(1))
    jnnx.load_adapters(adapted, perturb(jnnx.adapters_of(adapted)))
    y = forward(adapted, IDS)
    merged = jnnx.merge(adapted)
    assert not any(isinstance(n, jnnx.AdapterLayer) for _, n in nnx.iter_graph(merged))
    assert type(merged.out) is nnx.Linear
    np.testing.assert_allclose(forward(merged, IDS), y, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(y) - np.asarray(forward(zoo(), IDS))).max() > 1e-2  # the adapters really change the output
    back = jnnx.unmerge(merged, jnnx.adapters_of(adapted))
    chex.assert_trees_all_close(jnnx.base_params(back), jnnx.base_params(adapted), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(jnnx.adapters_of(back), jnnx.adapters_of(adapted))
    plain = jnnx.remove(adapted)
    np.testing.assert_array_equal(forward(plain, IDS), forward(zoo(), IDS))
    chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(plain)), nnx.to_pure_dict(nnx.state(zoo())))


def test_equivalent_to_flax_lora_linear():
    flax_layer = nnx.LoRALinear(6, 4, lora_rank=3, rngs=nnx.Rngs(0))
    flax_layer.lora.lora_b.set_value(jax.random.normal(jax.random.key(1), (3, 4)))
    base = nnx.Linear(6, 4, rngs=nnx.Rngs(9))
    base.kernel.set_value(flax_layer.kernel.get_value())
    base.bias.set_value(flax_layer.bias.get_value())
    ours = jnnx.adapt(base, jaxpeft.LoraConfig(rank=3, alpha=3, targets="all-linear"), key=jax.random.key(2))
    a, b = flax_layer.lora.lora_a.get_value(), flax_layer.lora.lora_b.get_value()
    jnnx.load_adapters(ours, {"kernel": jaxpeft.LoraWeights(a, b, scale=1.0, layout=jaxpeft.Layout())})
    x = jax.random.normal(jax.random.key(3), (5, 6))
    np.testing.assert_allclose(ours(x), flax_layer(x), rtol=1e-6, atol=1e-6)
    assert issubclass(nnx.LoRAParam, nnx.Param) and not issubclass(jnnx.AdapterParam, nnx.Param)


# ---------------------------------------------------------------- functional view and training


def test_split_is_three_way_and_param_filter_excludes_adapters():
    adapted = jnnx.adapt(zoo(), ALL_WEIGHTS, key=jax.random.key(1))
    graphdef, lora, frozen = nnx.split(adapted, jnnx.AdapterParam, ...)
    assert nbytes(lora) == nbytes(jnnx.adapters_of(adapted))
    assert nbytes(nnx.state(adapted, nnx.Param)) == nbytes(frozen) == nbytes(jnnx.base_params(adapted))
    assert not jax.tree.leaves(nnx.state(adapted, nnx.All(nnx.Param, jnnx.AdapterParam)))
    np.testing.assert_array_equal(forward(nnx.merge(graphdef, lora, frozen), IDS), forward(adapted, IDS))


def _pure_step(graphdef, tx):
    target = np.linspace(-1.0, 1.0, 12, dtype=np.float32)

    def loss_fn(lora, frozen, ids):
        model = nnx.merge(graphdef, lora, frozen, copy=True)
        return jnp.mean((model(ids) - target) ** 2)

    def step(lora, opt, frozen, ids):
        loss, grads = jax.value_and_grad(loss_fn)(lora, frozen, ids)
        updates, opt = tx.update(grads, opt, lora)
        return optax.apply_updates(lora, updates), opt, loss, grads

    return step


def test_pure_train_step_grads_only_adapters_and_base_frozen():
    adapted = jnnx.adapt(zoo(), ALL_WEIGHTS, key=jax.random.key(1))
    graphdef, lora, frozen = nnx.split(adapted, jnnx.AdapterParam, ...)
    frozen_before = jax.tree.map(np.asarray, frozen)
    tx = optax.adam(3e-2)
    step = jax.jit(chex.assert_max_traces(_pure_step(graphdef, tx), n=1))
    opt = tx.init(lora)
    losses = []
    for i in range(25):
        lora, opt, loss, grads = step(lora, opt, frozen, IDS)
        losses.append(float(loss))
        if i == 1:  # B starts at zero, so A's first gradient is zero too; from the second step on none is
            assert nbytes(grads) == nbytes(lora)
            assert jax.tree.structure(grads) == jax.tree.structure(lora)
            for path, g in nnx.to_flat_state(grads):
                assert np.abs(np.asarray(g.get_value())).max() > 0.0, path
    chex.assert_trees_all_equal(frozen, frozen_before)  # bit-identical
    assert losses[-1] < min(1.0, 0.1 * losses[0]), losses  # it learns (about 29 -> 0.25)


def test_jit_matches_no_jit():
    model = nnx.Linear(5, 12, rngs=nnx.Rngs(0))
    adapted = jnnx.adapt(model, ALL_WEIGHTS, key=jax.random.key(1))
    jnnx.load_adapters(adapted, perturb(jnnx.adapters_of(adapted)))
    graphdef, lora, frozen = nnx.split(adapted, jnnx.AdapterParam, ...)
    tx = optax.sgd(1e-2)
    step = _pure_step(graphdef, tx)
    x = jax.random.normal(jax.random.key(2), (3, 5))
    eager = step(lora, tx.init(lora), frozen, x)
    jitted = jax.jit(step)(lora, tx.init(lora), frozen, x)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=2e-5)


def test_nnx_optimizer_trains_only_adapters():
    adapted = jnnx.adapt(small(), ALL_WEIGHTS, key=jax.random.key(1))
    base_before = jnnx.base_params(adapted)
    optimizer = nnx.Optimizer(adapted, optax.adam(3e-2), wrt=jnnx.AdapterParam)
    target = np.linspace(-1.0, 1.0, 12, dtype=np.float32)

    @nnx.jit
    def step(model, optimizer, ids):
        def loss_fn(model):
            return jnp.mean((model(ids) - target) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, jnnx.AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(adapted, optimizer, IDS)) for _ in range(25)]
    assert losses[-1] < min(0.05, 0.1 * losses[0]), losses  # about 1.4 -> 0.016
    chex.assert_trees_all_equal(jnnx.base_params(adapted), base_before)
    assert nbytes(nnx.state(optimizer, nnx.OptState)) < 3 * nbytes(jnnx.adapters_of(adapted)) + 64


def test_bf16_base_with_float32_adapters():
    model = small(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype("bfloat16")}
    adapted = jnnx.adapt(model, ALL_WEIGHTS, key=jax.random.key(1))
    assert nnx.eval_shape(lambda m: m(IDS), adapted).dtype == jnp.bfloat16  # the branch computes in bf16
    graphdef, lora, frozen = nnx.split(adapted, jnnx.AdapterParam, ...)
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype("float32")}
    tx = optax.adam(3e-2)
    step = jax.jit(_pure_step(graphdef, tx))
    opt = tx.init(lora)
    first = None
    for _ in range(10):
        lora, opt, loss, grads = step(lora, opt, frozen, IDS)
        first = first if first is not None else float(loss)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
    assert float(loss) < first
    chex.assert_trees_all_equal(jnnx.base_params(nnx.merge(graphdef, lora, frozen)), jnnx.base_params(model))


def test_dropout_runs_with_rngs_and_stops_in_eval():
    cfg = jaxpeft.LoraConfig(rank=2, targets="all-linear", dropout=0.5)
    model = small()
    adapters = perturb(
        jaxpeft.init(cfg, jnnx.base_params(model), key=jax.random.key(1), layouts=jnnx.infer_layouts(model))
    )
    adapted = jnnx.attach(model, adapters, rngs=nnx.Rngs(dropout=7))
    assert nnx.state(adapted, nnx.RngKey)["layers"]["up"]["rngs"]["key"].shape == (3,)  # split along the stack
    a, b = forward(adapted, IDS), forward(adapted, IDS)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 0.0
    quiet = nnx.view(adapted, deterministic=True)
    np.testing.assert_array_equal(forward(quiet, IDS), forward(quiet, IDS))
    adapted.eval()
    np.testing.assert_array_equal(forward(adapted, IDS), forward(quiet, IDS))
    assert not jax.tree.leaves(nnx.state(jnnx.attach(model, adapters), nnx.RngState))  # no rngs: no dropout


# ---------------------------------------------------------------- interop with Linen and the pure form


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.Dense(2 * WIDTH, name="up")(nn.LayerNorm(name="norm")(x))
        return x + nn.Dense(WIDTH, name="down")(jnp.tanh(h)), None


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(WIDTH, name="inp")(x)
        x, _ = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(
            x, None
        )
        return nn.Dense(4, name="out")(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.inp = nnx.Linear(5, WIDTH, rngs=rngs)
        self.layers = make_stack(WIDTH, 3, rngs)
        self.out = nnx.Linear(WIDTH, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(run_stack(self.layers, self.inp(x)))


def test_linen_and_nnx_adapters_share_one_layout():
    x = jax.random.normal(jax.random.key(0), (2, 5))
    model = build(lambda: NnxNet(nnx.Rngs(0)))
    params = jnnx.base_params(model)
    linen = LinenNet()
    linen_shapes = jax.eval_shape(linen.init, jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, linen_shapes) == jax.tree.map(jnp.shape, params)
    cfg = jaxpeft.LoraConfig(rank=2, targets="all-linear")
    from_linen = jaxpeft.linen.init(cfg, linen, params, x, key=jax.random.key(5))
    adapted = jnnx.adapt(model, cfg, key=jax.random.key(5))
    chex.assert_trees_all_equal(jnnx.adapters_of(adapted), from_linen)  # same paths, shapes, stack axes, values
    trained = perturb(from_linen)  # e.g. adapters trained on the Linen model, restored from a checkpoint
    jnnx.load_adapters(adapted, trained)
    want = jax.jit(lambda a: jaxpeft.linen.apply(linen, {"params": params}, a, x))(trained)
    np.testing.assert_allclose(forward(adapted, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(forward(jnnx.attach(model, trained), x), want, rtol=1e-5, atol=1e-5)


def test_checkpoint_written_from_linen_restores_into_nnx(tmp_path):
    x = jax.random.normal(jax.random.key(0), (2, 5))
    model = build(lambda: NnxNet(nnx.Rngs(0)))
    params = jnnx.base_params(model)
    linen = LinenNet()
    cfg = jaxpeft.LoraConfig(rank=2, targets="all-linear")
    trained = perturb(jaxpeft.linen.init(cfg, linen, params, x, key=jax.random.key(5)))
    jaxpeft.checkpoint.save_adapters(tmp_path / "ckpt", 7, trained, cfg, params)
    restored = jaxpeft.checkpoint.restore_adapters(
        tmp_path / "ckpt", cfg, jnnx.base_params(model), layouts=jnnx.infer_layouts(model)
    )
    assert restored.step == 7
    want = jax.jit(lambda a: jaxpeft.linen.apply(linen, {"params": params}, a, x))(trained)
    np.testing.assert_allclose(forward(jnnx.attach(model, restored.adapters), x), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors


def test_errors_name_the_path_and_the_fix():
    model = zoo()
    with pytest.raises(ValueError, match=r"matched no parameter. Paths look like"):
        jnnx.adapt(model, jaxpeft.LoraConfig(targets=["nope"]), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"'heads/bias' cannot be adapted: only the layer's `kernel` is adapted, not"):
        jnnx.adapt(model, jaxpeft.LoraConfig(targets=r"heads/bias"), key=jax.random.key(0))
    adapted = jnnx.adapt(model, ALL_WEIGHTS, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"already has adapters \(e.g. at 'blocks/0/down/kernel'\)"):
        jnnx.adapt(adapted, ALL_WEIGHTS, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"already has adapters"):
        jnnx.unmerge(adapted, jnnx.adapters_of(adapted))
    with pytest.raises(ValueError, match=r"`model` \(Zoo\) has no adapters; call jaxpeft.nnx.adapt"):
        jnnx.adapters_of(model)
    lora = jaxpeft.LoraWeights(
        np.zeros((WIDTH, 2), np.float32), np.zeros((2, WIDTH), np.float32), 1.0, layout=jaxpeft.Layout()
    )
    with pytest.raises(ValueError, match=r"adapter 'missing/kernel' names no nnx.Linear"):
        jnnx.attach(model, {"missing": {"kernel": lora}})
    with pytest.raises(
        ValueError,
        match=r"adapter 'layers/up/kernel' \(LoraWeights: a \(8, 2\), b \(2, 8\)\) does not fit the weight of "
        r"shape \(3, 8, 16\)",
    ):
        jnnx.attach(model, {"layers": {"up": {"kernel": lora}}})
    with pytest.raises(ValueError, match=r"do not match the model's adapted layers: missing \['blocks/0/down/kernel'"):
        jnnx.load_adapters(adapted, {"out": {"kernel": lora}})
    wrong_rank = jax.tree.map(lambda x: np.zeros((*x.shape[:-1], 3), np.float32), jnnx.adapters_of(adapted))
    with pytest.raises(ValueError, match=r"Use adapters of the same method and shapes"):
        jnnx.load_adapters(adapted, wrong_rank)
    dropout = jaxpeft.LoraConfig(rank=2, targets="all-linear", dropout=0.1)
    with pytest.raises(ValueError, match=r"`rngs` has no 'dropout' \(or 'default'\) stream"):
        jnnx.adapt(model, dropout, key=jax.random.key(0), rngs=nnx.Rngs(params=0))
    with pytest.raises(AttributeError, match=r"has no attribute 'kernel'. The wrapped layer is `.base`"):
        _ = adapted.out.kernel
    with pytest.raises(AttributeError, match=r"`attend` exists on wrapped nnx.Embed layers only"):
        adapted.out.attend(np.ones((WIDTH,), np.float32))
    with pytest.raises(TypeError, match=r"AdapterLayer wraps nnx.Linear"):
        jnnx.AdapterLayer(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), lora)


def test_subclass_with_its_own_forward_is_refused():
    class Gated(nnx.Linear):
        def __call__(self, x):
            return jax.nn.sigmoid(super().__call__(x))

    layer = Gated(4, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'kernel' cannot be adapted: its class Gated overrides nnx.Linear.__call__"):
        jnnx.adapt(layer, jaxpeft.LoraConfig(targets=r"kernel$"), key=jax.random.key(0))


# ---------------------------------------------------------------- efficiency


def test_lora_step_flops_at_most_072_of_full_fine_tuning():
    from examples.benchmarks.flops import BenchConfig, step_flops

    cfg = BenchConfig(width=256, ffn=1024, layers=2, heads=8, tokens=256, seq=32, vocab=256, rank=8)
    full, lora = step_flops("nnx-full", cfg), step_flops("nnx-lora", cfg)
    assert lora / full <= 0.72, (full, lora)


def test_dropout_on_an_einsum_with_its_own_head_axis():
    """The dropout stream is split over nnx.vmap/scan axes only, not over an einsum kernel's own batch axis."""

    class Heads(nnx.Module):
        def __init__(self, rngs):
            self.mix = nnx.Einsum("bthd,hde->bthe", (2, 4, 3), rngs=rngs)

        def __call__(self, x):
            return self.mix(x)

    model = build(lambda: Heads(nnx.Rngs(0)))
    cfg = jaxpeft.LoraConfig(rank=2, targets=["mix"], dropout=0.5)
    adapted = jnnx.adapt(model, cfg, key=jax.random.key(1), rngs=nnx.Rngs(dropout=3))
    adapted.mix.b.set_value(jnp.ones_like(adapted.mix.b.get_value()))
    x = jnp.ones((2, 5, 2, 4))
    first, second = forward(adapted, x), forward(adapted, x)
    assert first.shape == (2, 5, 2, 3) and np.abs(np.asarray(first) - np.asarray(second)).max() > 0.0


def test_optimizer_helper_trains_adapters_only_and_refuses_plain_models():
    adapted = jnnx.adapt(small(), ALL_WEIGHTS, key=jax.random.key(1))
    opt = jnnx.optimizer(adapted, optax.sgd(0.1))
    assert nnx.state(opt, nnx.OptState) is not None
    base_before = jax.tree.map(jnp.copy, nnx.state(adapted, nnx.Param))
    before = jnnx.adapters_of(adapted)
    grads = nnx.grad(lambda m: jnp.sum(m(IDS) ** 2), argnums=nnx.DiffState(0, jnnx.AdapterParam))(adapted)
    opt.update(adapted, grads)
    chex.assert_trees_all_equal(nnx.state(adapted, nnx.Param), base_before)
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), jnnx.adapters_of(adapted), before)))
    with pytest.raises(ValueError, match=r"has no adapters; call jaxpeft.nnx.adapt"):
        jnnx.optimizer(small(), optax.sgd(0.1))


def test_flax_lora_param_filter_holds_nothing_of_ours():
    """The one-letter trap: flax's nnx.LoRAParam selects nothing on a jaxpeft model (use jnnx.optimizer)."""
    adapted = jnnx.adapt(small(), ALL_WEIGHTS, key=jax.random.key(1))
    assert not jax.tree.leaves(nnx.state(adapted, nnx.LoRAParam))
    assert jax.tree.leaves(nnx.state(adapted, jnnx.AdapterParam))
