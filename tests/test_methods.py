"""The method-invariant suite: every method (LoRA, DoRA, IA3 and one defined in this file) through Linen and NNX.

The same twin models (Linen and NNX, equal parameter paths) cover Embed, a scanned/vmapped stack of LayerNorm and
Dense layers, DenseGeneral, an Einsum with a per-head batch axis and bias, Conv and a Dense head. Each invariant is
written once and parametrised over methods and frameworks. ``ScaleShift`` below is a complete method written only
against the public protocol (``jaxpeft.MethodConfig`` + ``jaxpeft.Adapter``), touching no library file: the proof of
the seam.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

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

# ----------------------------------------------------------------------------------------------- a user's method


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleShift(jaxpeft.Adapter):
    """A learned per-output scale and shift: ``y = base(x) ⊙ (1 + scale) + shift``."""

    scale: jax.Array  # (*stack, *fan_out)
    shift: jax.Array
    layout: jaxpeft.Layout = dataclasses.field(default=jaxpeft.Layout(), metadata={"static": True})

    def forward(self, call: jaxpeft.LayerCall) -> jax.Array:
        y = call.base(call.x)
        return y * (1 + call.output_vector(self.scale, y.ndim)) + call.output_vector(self.shift, y.ndim)

    def fold(self, weight, bias, sign):
        if bias is None:
            raise jaxpeft.NotMergeableError("ScaleShift needs the layer's bias to fold its shift into")
        stack, fan_in, fan_out = self.layout.split(weight.shape)
        s = jnp.reshape(1 + self.scale, (*stack, *([1] * len(fan_in)), *fan_out))
        if sign > 0:
            return weight * s, bias * (1 + self.scale) + self.shift
        return weight / s, (bias - self.shift) / (1 + self.scale)


@dataclasses.dataclass(frozen=True)
class ScaleShiftConfig(jaxpeft.MethodConfig):
    method: ClassVar[str] = "scale_shift"
    targets: Any = ("up", "heads", "out")
    exclude: Any = ()

    def init_target(self, path, weight, layout, key):
        stack, _, fan_out = layout.split(weight.shape)
        zeros = jnp.zeros((*stack, *fan_out), jnp.float32)
        return ScaleShift(zeros, zeros, layout)


# ----------------------------------------------------------------------------------------------- twin models

VOCAB, WIDTH, DEPTH = 16, 8, 2


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(name="norm")(x)
        return x + nn.Dense(WIDTH, name="down")(jnp.tanh(nn.Dense(2 * WIDTH, name="up")(h))), None


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(VOCAB, WIDTH, name="embed")(ids)
        stack = nn.scan(
            LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True}, length=DEPTH
        )
        x, _ = stack(name="layers")(x, None)
        h = nn.DenseGeneral((2, 4), name="heads")(x)
        h = nn.Einsum((2, 4, WIDTH), "bthd,hde->bthe", name="mix")(h)
        x = nn.Conv(WIDTH, (3,), name="conv")(x + h.sum(axis=2))
        return nn.Dense(VOCAB, name="out")(x)


class NnxBlock(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jnp.tanh(self.up(self.norm(x))))


class NnxNet(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)

        @nnx.split_rngs(splits=DEPTH)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(r):
            return NnxBlock(rngs=r)

        self.layers = create(rngs)
        self.heads = nnx.LinearGeneral(WIDTH, (2, 4), rngs=rngs)
        self.mix = nnx.Einsum("bthd,hde->bthe", (2, 4, WIDTH), (2, WIDTH), rngs=rngs)
        self.conv = nnx.Conv(WIDTH, WIDTH, (3,), rngs=rngs)
        self.out = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        x = body(x, self.layers)
        h = self.mix(self.heads(x))
        return self.out(self.conv(x + h.sum(axis=2)))


IDS = jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]])
LINEN = LinenNet()


@pytest.fixture(scope="module")
def params():
    """Host-made parameters (no XLA compilation of initialisers), shared by both frameworks."""
    shapes = jax.eval_shape(LINEN.init, jax.random.key(0), IDS)["params"]
    rng = np.random.default_rng(0)

    def make(x):
        std = 1.0 / np.sqrt(x.shape[-2]) if len(x.shape) >= 2 else 0.1
        return jnp.asarray((std * rng.standard_normal(x.shape)).astype(np.float32))

    return jax.tree.map(make, shapes)


def nnx_model(params):
    model = nnx.eval_shape(lambda: NnxNet(rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


# ----------------------------------------------------------------------------------------------- the methods

METHODS = {
    "lora": jaxpeft.LoraConfig(rank=2, alpha=4, targets=r"(kernel|embedding)$"),
    "dora": jaxpeft.DoraConfig(rank=2, alpha=4, targets=r"(kernel|embedding)$"),
    "ia3": jaxpeft.IA3Config(targets=r"kernel$", feedforward=["down", "conv"]),
    "scale_shift": ScaleShiftConfig(),
    "loha": jaxpeft.LohaConfig(rank=2, alpha=4, targets=r"kernel$"),  # conv included
    # rank 1 < max/2 everywhere: W1 and W2 both low-rank; the full factors are covered in test_peft_family.py
    "lokr": jaxpeft.LokrConfig(rank=1, alpha=2, targets=["up", "down", "heads", "mix", "out"], decompose_both=True),
    "vera": jaxpeft.VeraConfig(rank=4, targets=["up", "down", "heads", "mix", "out"], d_initial=0.5),
    # base-adjusting LoRA inits (linear maps only): scanned Dense, DenseGeneral, Einsum with a batch axis, head
    "pissa": jaxpeft.LoraConfig(rank=2, alpha=4, targets=["up", "down", "heads", "mix", "out"], init="pissa"),
    "bitfit": jaxpeft.BitFitConfig(),  # every layer bias: scanned Dense, DenseGeneral, Einsum, Conv, head
    "ln_tuning": jaxpeft.LNTuningConfig(),  # the scanned LayerNorm's scale and bias
}
UNMERGEABLE = {"dora"}  # merge is one-way: the column norm it divides by is lost
# the base holds the residual W - s·A·B: identity with the original model up to float rounding, not bit-exact
APPROX_IDENTITY = {"pissa", "olora"}


def perturb(adapters, seed=3, size=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + size * rng.standard_normal(x.shape).astype(np.float32), adapters)


@jax.jit
def linen_forward(params, adapters, ids):
    return jaxpeft.linen.apply(LINEN, {"params": params}, adapters, ids)


@jax.jit
def linen_base(params, ids):
    return LINEN.apply({"params": params}, ids)


@nnx.jit
def nnx_forward(model, ids):
    return model(ids)


class Linen:
    """The Linen side of the suite: adapters as a pytree, the model closed over."""

    def __init__(self, cfg, params):
        self.cfg, self.params, self.original = cfg, params, params
        if cfg.adjusts_base:  # PiSSA/OLoRA: the model runs over the residual params init_adjusted returns
            self.params, self.adapters = jaxpeft.linen.init_adjusted(cfg, LINEN, params, IDS, key=jax.random.key(1))
        else:
            self.adapters = jaxpeft.linen.init(cfg, LINEN, params, IDS, key=jax.random.key(1))

    def base(self):
        return linen_base(self.original, IDS)

    def out(self, adapters=None):
        return linen_forward(self.params, self.adapters if adapters is None else adapters, IDS)

    def merged_out(self, adapters):
        return linen_base(jaxpeft.merge(self.params, adapters), IDS)

    def set(self, adapters):
        self.adapters = adapters

    def get(self):
        return self.adapters


class Nnx:
    """The NNX side: the adapters live in ``AdapterParam`` variables of an adapted model."""

    def __init__(self, cfg, params):
        self.cfg, self.plain = cfg, nnx_model(params)
        self.model = jnnx.adapt(self.plain, cfg, key=jax.random.key(1))

    def base(self):
        return nnx_forward(self.plain, IDS)

    def out(self, adapters=None):
        if adapters is not None:
            self.set(adapters)
        return nnx_forward(self.model, IDS)

    def merged_out(self, adapters):
        self.set(adapters)
        merged = jnnx.merge(self.model)
        assert not any(isinstance(n, jnnx.AdapterLayer) for _, n in nnx.iter_graph(merged))
        return nnx_forward(merged, IDS)

    def set(self, adapters):
        jnnx.load_adapters(self.model, adapters)

    def get(self):
        return jnnx.adapters_of(self.model)


FRAMEWORKS = {"linen": Linen, "nnx": Nnx}
CASES = [(m, f) for m in METHODS for f in FRAMEWORKS]


@pytest.fixture(params=CASES, ids=[f"{m}-{f}" for m, f in CASES])
def case(request, params):
    method, framework = request.param
    return method, FRAMEWORKS[framework](METHODS[method], params)


def close(x, y, tol=1e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------- invariants


def test_identity_at_init(case):
    method, fw = case
    if method == "dora":  # magnitude / norm is 1 up to the rounding of two float32 reductions (init vs jit)
        close(fw.out(), fw.base(), 2e-5)
    elif method in APPROX_IDENTITY:
        close(fw.out(), fw.base())
    else:
        np.testing.assert_array_equal(np.asarray(fw.out()), np.asarray(fw.base()))


def test_merged_equals_unmerged_and_unmerge_inverts(case, params):
    method, fw = case
    adapters = perturb(fw.get())
    adapted = fw.out(adapters)
    assert float(jnp.max(jnp.abs(adapted - fw.base()))) > 1e-2  # the adapters do something
    close(fw.merged_out(adapters), adapted)
    merged = jaxpeft.merge(params, adapters)
    if method in UNMERGEABLE:
        with pytest.raises(jaxpeft.NotMergeableError, match=r"adapter '.*': a DoRA merge cannot be undone"):
            jaxpeft.unmerge(merged, adapters)
    else:
        chex.assert_trees_all_close(jaxpeft.unmerge(merged, adapters), params, rtol=1e-5, atol=1e-5)


def test_linen_and_nnx_agree(params):
    for cfg in METHODS.values():
        linen, nnx_side = Linen(cfg, params), Nnx(cfg, params)
        chex.assert_trees_all_equal(linen.get(), nnx_side.get())  # same init, same paths
        adapters = perturb(linen.get())
        close(linen.out(adapters), nnx_side.out(adapters))


def _loss(logits):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], IDS[:, 1:]).mean()


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_gradients_only_for_adapters_and_all_nonzero(case):
    _, fw = case
    adapters = perturb(fw.get())
    if isinstance(fw, Linen):
        grads = jax.grad(lambda a: _loss(linen_forward(fw.params, a, IDS)))(adapters)
        chex.assert_trees_all_equal_structs(grads, adapters)
        trainable = adapters
    else:
        fw.set(adapters)
        grads = nnx.grad(lambda m: _loss(m(IDS)), argnums=nnx.DiffState(0, jnnx.AdapterParam))(fw.model)
        trainable = nnx.state(fw.model, jnnx.AdapterParam)
    assert _nbytes(grads) == _nbytes(trainable)
    for leaf in jax.tree.leaves(grads):
        assert float(jnp.max(jnp.abs(leaf))) > 0.0


def test_training_moves_only_adapters_without_retracing(case):
    method, fw = case
    chex.clear_trace_counter()  # the counter is per function, across the parametrised cases
    tx = optax.adam(1e-2)
    if isinstance(fw, Linen):
        tree = {"params": fw.params, "adapters": perturb(fw.get())}
        frozen_tx = jaxpeft.freeze(tx, {"params": False, "adapters": True})
        opt = frozen_tx.init(tree)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(tree, opt):
            grads = jax.grad(lambda t: _loss(jaxpeft.linen.apply(LINEN, {"params": t["params"]}, t["adapters"], IDS)))(
                tree
            )
            updates, opt = frozen_tx.update(grads, opt, tree)
            return optax.apply_updates(tree, updates), opt

        before = tree
        for _ in range(3):
            tree, opt = step(tree, opt)
        chex.assert_trees_all_equal(tree["params"], before["params"])
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), tree["adapters"], before["adapters"])
    else:
        fw.set(perturb(fw.get()))
        optimizer = jnnx.optimizer(fw.model, tx)
        base_before = jax.tree.map(jnp.copy, nnx.state(fw.model, nnx.Param))
        adapters_before = jnnx.adapters_of(fw.model)

        @nnx.jit
        @chex.assert_max_traces(n=1)
        def step(model, optimizer):
            grads = nnx.grad(lambda m: _loss(m(IDS)), argnums=nnx.DiffState(0, jnnx.AdapterParam))(model)
            optimizer.update(model, grads)

        for _ in range(3):
            step(fw.model, optimizer)
        chex.assert_trees_all_equal(nnx.state(fw.model, nnx.Param), base_before)
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), jnnx.adapters_of(fw.model), adapters_before)
    assert all(jax.tree.leaves(moved)), f"{method}: some adapter leaves did not train"


def test_checkpoint_round_trip(case, params, tmp_path):
    method, fw = case
    cfg = METHODS[method]
    adapters = perturb(fw.get())
    fw.set(adapters)
    saved = fw.get()
    jaxpeft.checkpoint.save_adapters(tmp_path / "ckpt", 2, saved, cfg, params)
    restored = jaxpeft.checkpoint.restore_adapters(tmp_path / "ckpt", cfg, params)
    chex.assert_trees_all_equal(restored.adapters, saved)
    assert jax.tree.structure(restored.adapters) == jax.tree.structure(saved)  # static parts too
    assert restored.config == cfg and type(restored.config) is type(cfg)
    configs = (ScaleShiftConfig,) if method == "scale_shift" else ()
    assert jaxpeft.checkpoint.read_config(tmp_path / "ckpt", configs=configs) == cfg
    fw.set(jax.tree.map(jnp.zeros_like, saved))
    fw.set(restored.adapters)
    close(fw.out(), fw.out(saved))


def test_same_key_same_adapters_and_jit_matches_eager(params):
    for cfg in METHODS.values():
        _, a1 = jaxpeft.linen.init_adjusted(cfg, LINEN, params, IDS, key=jax.random.key(7))  # = init unless PiSSA/..
        _, a2 = jaxpeft.linen.init_adjusted(cfg, LINEN, params, IDS, key=jax.random.key(7))
        chex.assert_trees_all_equal(a1, a2)
        adapters = perturb(a1)
        eager = jaxpeft.linen.apply(LINEN, {"params": params}, adapters, IDS)
        close(eager, linen_forward(params, adapters, IDS))


def test_plan_counts_match_init(params):
    for cfg in METHODS.values():
        layouts = jaxpeft.linen.infer_layouts(LINEN, IDS)
        plan = jaxpeft.plan(cfg, params, layouts=layouts)
        _, adapters = jaxpeft.init_adjusted(cfg, params, key=jax.random.key(0), layouts=layouts)  # init, or PiSSA's
        assert plan.n_params == sum(x.size for x in jax.tree.leaves(adapters))
        assert [t.path for t in plan.targets] == [p for p, _ in jaxpeft.adapter_items(adapters)]
        assert plan.method in str(plan) and f"{plan.n_params:,} adapter parameters" in str(plan)


def test_custom_method_json_round_trip_and_lookup():
    cfg = ScaleShiftConfig(targets=["up"])
    assert ScaleShiftConfig.from_json(cfg.to_json()) == cfg
    assert jaxpeft.config_from_dict(cfg.to_dict(), configs=(ScaleShiftConfig,)) == cfg
    with pytest.raises(ValueError, match=r"method='scale_shift'; known methods are .*pass its config class"):
        jaxpeft.config_from_dict(cfg.to_dict())


def test_custom_method_without_bias_is_not_mergeable(params):
    no_bias = {"w": {"kernel": jnp.ones((4, 3))}}
    adapters = jaxpeft.init(ScaleShiftConfig(targets=["w"]), no_bias, key=jax.random.key(0))
    with pytest.raises(jaxpeft.NotMergeableError, match=r"adapter 'w/kernel': ScaleShift needs the layer's bias"):
        jaxpeft.merge(no_bias, adapters)


# ----------------------------------------------------------------------------------------------- formulas


def _dense_params():
    rng = np.random.default_rng(1)
    return {"lin": {"kernel": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32), "bias": jnp.ones(4)}}


class Lin(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="lin")(x)


X = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5)), jnp.float32)


def _adapted(cfg):
    params = _dense_params()
    adapters = perturb(jaxpeft.init(cfg, params, key=jax.random.key(0)), seed=5, size=0.5)
    out = jaxpeft.linen.apply(Lin(), {"params": params}, adapters, X)
    return params["lin"], adapters["lin"]["kernel"], np.asarray(out, np.float64)


def test_lora_formula():
    p, ad, out = _adapted(jaxpeft.LoraConfig(rank=2, alpha=3, targets=["lin"]))
    w, a, b = (np.asarray(t, np.float64) for t in (p["kernel"], ad.a, ad.b))
    np.testing.assert_allclose(out, X @ w + p["bias"] + 1.5 * (X @ a) @ b, rtol=1e-5)


def test_dora_formula():
    p, ad, out = _adapted(jaxpeft.DoraConfig(rank=2, alpha=3, targets=["lin"]))
    w, a, b, m = (np.asarray(t, np.float64) for t in (p["kernel"], ad.a, ad.b, ad.magnitude))
    adapted = w + 1.5 * a @ b  # (in, out): the norm of each output's column, over the inputs
    expected = X @ (adapted * (m / np.linalg.norm(adapted, axis=0))) + p["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_allclose(
        jaxpeft.methods.dora.weight_norm(p["kernel"], ad.a, ad.b, 1.5, ad.layout),
        np.linalg.norm(adapted, axis=0),
        rtol=1e-5,
    )


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_formula(feedforward):
    cfg = jaxpeft.IA3Config(targets=["lin"], feedforward=["lin"] if feedforward else ())
    p, ad, out = _adapted(cfg)
    w, v = np.asarray(p["kernel"], np.float64), np.asarray(ad.vector, np.float64)
    expected = (X * v) @ w + p["bias"] if feedforward else (X @ w + p["bias"]) * v
    np.testing.assert_allclose(out, expected, rtol=1e-5)
