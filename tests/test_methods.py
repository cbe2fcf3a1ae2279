"""The method-invariant suite: every method through Linen and NNX, and the parity of the two frameworks.

The same twin models (Linen and NNX, equal parameter paths) cover Embed, a scanned/vmapped stack of LayerNorm and
Dense layers, DenseGeneral, an Einsum with a per-head batch axis and bias, Conv and a Dense head. Each invariant is
written once and parametrised over methods and frameworks. ``ScaleShift`` below and HRA (``tests/_hra.py``) are
complete methods written only against the public protocol, touching no library file: the proof of the seam. The
parity section feeds both frameworks the same faulty inputs (a float16 overflow on merge, a masked convolution, an
int8 kernel, adapters of another model, a model input) and requires the same refusal, word for word.
"""

from __future__ import annotations

import dataclasses
import re
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
from tests._hra import HRAConfig

# ----------------------------------------------------------------------------------------------- a user's method


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScaleShift(jaxpeft.LayerAdapter):
    """A learned per-output scale and shift: ``y = base(x) ⊙ (1 + scale) + shift``."""

    scale: jax.Array  # (*stack, *fan_out)
    shift: jax.Array
    layout: jaxpeft.Layout = dataclasses.field(metadata=jaxpeft.STATIC)

    def weight_axes(self):  # both vectors run along the stack and fan-out axes: sharding and fit checks follow
        stack, _, fan_out = self.layout.axes()
        return {"scale": (*stack, *fan_out), "shift": (*stack, *fan_out)}

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
    # VeRA with its projections stored as frozen arrays (as imported from PEFT)
    "vera_stored": jaxpeft.VeraConfig(rank=4, targets=["up", "heads", "out"], store_projections=True),
    # LoRA-FA: A frozen, B trained
    "lora_fa": jaxpeft.LoraFAConfig(rank=2, alpha=4, targets=r"(kernel|embedding)$"),
    "hra": HRAConfig(rank=2, targets=["up", "down", "out"]),  # a method of a test file, Dense kernels
    # base-adjusting LoRA inits (linear maps only): scanned Dense, DenseGeneral, Einsum with a batch axis, head
    "pissa": jaxpeft.LoraConfig(rank=2, alpha=4, targets=["up", "down", "heads", "mix", "out"], init="pissa"),
    "bitfit": jaxpeft.BitFitConfig(),  # every layer bias: scanned Dense, DenseGeneral, Einsum, Conv, head
    "ln_tuning": jaxpeft.LNTuningConfig(),  # the scanned LayerNorm's scale and bias
}
UNMERGEABLE = {"dora"}  # merge is one-way: the column norm it divides by is lost
# the base holds the residual W - s·A·B: identity with the original model up to float rounding, not bit-exact
APPROX_IDENTITY = {"pissa", "olora", "hra"}  # HRA: H·H = I up to float rounding


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
    if isinstance(fw, Linen):  # frozen fields (LoRA-FA's A, stored VeRA projections) go to the frozen half
        trainable, frozen = jaxpeft.partition(adapters, True)
        grads = jax.grad(lambda t: _loss(linen_forward(fw.params, jaxpeft.combine(t, frozen), IDS)))(trainable)
        chex.assert_trees_all_equal_structs(grads, trainable)
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
        should = jaxpeft.trainable_mask(before["adapters"], True)
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
        should = jaxpeft.trainable_mask(adapters_before, True)
    assert jax.tree.leaves(moved) == jax.tree.leaves(should), f"{method}: trainable leaves moved, frozen ones stayed"


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
    configs = (ScaleShiftConfig, HRAConfig)
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


# ----------------------------------------------------------------------------------------------- framework parity
#
# One framework core, so one refusal: each faulty input below goes to Linen and to NNX and must raise the same
# exception with the same message (the entry point's own name aside).

LAYER_METHODS = [m for m in METHODS if m not in ("bitfit", "ln_tuning")]


def _refusal(fn):
    try:
        fn()
    except Exception as err:
        return type(err), str(err).replace("jaxpeft.linen.apply", "<framework>").replace(
            "jaxpeft.nnx.attach", "<framework>"
        )
    return None, ""


def _same_refusal(linen_fn, nnx_fn, expected_type, match):
    linen, nnx_side = _refusal(linen_fn), _refusal(nnx_fn)
    assert linen == nnx_side, f"Linen refuses with {linen}, NNX with {nnx_side}"
    assert linen[0] is not None and issubclass(linen[0], expected_type), linen
    assert re.search(match, linen[1]), linen[1]


def _first(adapters):
    return min(p for p, _ in jaxpeft.adapter_items(adapters))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parity_float16_overflow_is_refused_by_every_merge(method, params):
    """``jaxpeft.merge`` and ``jaxpeft.nnx.merge`` go through one fold: a float16 overflow is refused by name."""
    if method == "hra":
        pytest.skip("HRA's fold is an orthogonal map: it cannot overflow")
    cfg = METHODS[method]
    half = jax.tree.map(lambda x: x.astype(jnp.float16), params)
    side = Linen(cfg, half)
    path = _first(side.get())
    big = {p: jax.tree.map(lambda x: x + 3e5, n) if p == path else n for p, n in jaxpeft.adapter_items(side.get())}
    adapters = {}
    for p, n in big.items():
        adapters = jaxpeft._paths.set_path(adapters, p, n)
    model = Nnx(cfg, half)
    model.set(adapters)
    _same_refusal(
        lambda: jaxpeft.merge(side.params, adapters),
        lambda: jnnx.merge(model.model),
        ValueError,
        rf"folding the adapter into '{path}' overflows float16 \(largest finite 65504\)",
    )


class LinenMasked(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(4, (3,), mask=jnp.ones((3, 4, 4)), name="conv")(x)


class NnxMasked(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 4, (3,), mask=jnp.ones((3, 4, 4)), rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_parity_masked_convolution_is_refused_by_name(method):
    cfg = METHODS[method]
    cfg = dataclasses.replace(cfg, targets=["conv"], **({"feedforward": ()} if method == "ia3" else {}))
    x = jnp.ones((1, 5, 4))
    params = LinenMasked().init(jax.random.key(0), x)["params"]
    key = jax.random.key(0)
    if cfg.adjusts_base:
        linen_fn = lambda: jaxpeft.linen.init_adjusted(cfg, LinenMasked(), params, x, key=key)  # noqa: E731
    else:
        linen_fn = lambda: jaxpeft.linen.init(cfg, LinenMasked(), params, x, key=key)  # noqa: E731
    _same_refusal(
        linen_fn,
        lambda: jnnx.adapt(NnxMasked(nnx.Rngs(0)), cfg, key=key),
        ValueError,
        r"'conv/kernel' cannot be adapted: masked convolution kernels \(`mask`\) are not supported\. Add it to",
    )
    # adapters made without the model's layouts are refused when they run, with the same reason
    lora = jaxpeft.init(
        jaxpeft.LoraConfig(rank=1, targets=["conv"]),
        params,
        key=key,
        layouts={"conv/kernel": jaxpeft.Layout(fan_in=2, fan_out=1, kind="conv")},
    )
    with pytest.raises(ValueError, match=r"'conv/kernel' cannot be adapted: masked convolution kernels"):
        jaxpeft.linen.apply(LinenMasked(), {"params": params}, lora, x)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parity_int8_weights_are_not_folded(method, params):
    cfg = METHODS[method]
    side = Linen(cfg, params)
    adapters = perturb(side.get())
    path = _first(adapters)
    as_int8 = jaxpeft._paths.map_with_paths(lambda p, x: x.astype(jnp.int8) if p == path else x, side.params)
    int8_model = nnx_model(as_int8)
    _same_refusal(
        lambda: jaxpeft.merge(as_int8, adapters),
        lambda: jnnx.merge(jnnx.attach(int8_model, adapters)),
        jaxpeft.NotMergeableError,
        rf"adapter '{path}': the weight is int8, not floating; folding into it would truncate",
    )


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parity_adapters_of_another_model_are_refused_with_both_shapes(method, params):
    cfg = METHODS[method]
    adapters = Linen(cfg, params).get()
    path = _first(adapters)
    node = dict(jaxpeft.adapter_items(adapters))[path]
    wrong = jax.tree.map(lambda x: jnp.concatenate([x, x], axis=0), node)  # every array twice as long
    bad = jaxpeft._paths.map_with_paths(
        lambda p, n: wrong if p == path else n, adapters, is_leaf=lambda x: isinstance(x, jaxpeft.Adapter)
    )
    _same_refusal(
        lambda: jaxpeft.linen.apply(LINEN, {"params": params}, bad, IDS),
        lambda: jnnx.attach(nnx_model(params), bad),
        ValueError,
        rf"adapter '{path}' \({type(node).__name__}: .*\) does not fit the weight of shape",
    )


def test_parity_model_inputs_are_refused_by_both(params):
    prompt = jaxpeft.init(jaxpeft.PromptTuningConfig(2, targets=r"embed/embedding$"), params, key=jax.random.key(0))
    _same_refusal(
        lambda: jaxpeft.linen.apply(LINEN, {"params": params}, prompt, IDS),
        lambda: jnnx.attach(nnx_model(params), prompt),
        ValueError,
        r"'embed/embedding' is a PromptWeights, a model input .* so <framework> does not run it",
    )


# ----------------------------------------------------------------------------------------------- the protocol


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Shift(jaxpeft.LayerAdapter):
    """A broken method: it adds a constant at init (as the issue's user method moved the outputs by 9.6)."""

    shift: jax.Array
    layout: jaxpeft.Layout = dataclasses.field(metadata=jaxpeft.STATIC, kw_only=True)

    def forward(self, call):
        return call.base(call.x) + self.shift


@dataclasses.dataclass(frozen=True)
class ShiftConfig(jaxpeft.MethodConfig):
    method: ClassVar[str] = "shift"
    value: float = 9.6
    targets: Any = ("out",)
    exclude: Any = ()

    def init_target(self, path, weight, layout, key):
        return Shift(jnp.full(weight.shape[-1:], self.value), layout=layout)


def test_init_refuses_a_method_that_is_not_the_identity(params):
    with pytest.raises(ValueError, match=r"ShiftConfig is not the identity at init: its Shift at 'out/kernel' changes"):
        jaxpeft.init(ShiftConfig(), params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"is not the identity at init.*pass check_identity=False"):
        jnnx.adapt(nnx_model(params), ShiftConfig(), key=jax.random.key(0))
    assert jaxpeft.init(ShiftConfig(), params, key=jax.random.key(0), check_identity=False)
    assert jaxpeft.init(ShiftConfig(value=0.0), params, key=jax.random.key(0))  # the identity: accepted
    # a config that says it is not the identity is not checked (IA3's random draw, for tests)
    assert jaxpeft.init(
        jaxpeft.IA3Config(targets=["out"], feedforward=(), init_ones=False), params, key=jax.random.key(0)
    )


def test_three_hook_kinds_and_no_stubs(params):
    from jaxpeft.protocol import hook_kind

    lora = jaxpeft.init(jaxpeft.LoraConfig(rank=1, targets=["out"]), params, key=jax.random.key(0))
    leaf = jaxpeft.init(jaxpeft.BitFitConfig(targets=["out"]), params, key=jax.random.key(0))
    prompt = jaxpeft.init(jaxpeft.PromptTuningConfig(2, targets=r"embed/embedding$"), params, key=jax.random.key(0))
    kinds = [hook_kind(n) for tree in (lora, leaf, prompt) for _, n in jaxpeft.adapter_items(tree)]
    assert kinds == ["layer", "leaf", "input"]
    node = next(n for _, n in jaxpeft.adapter_items(prompt))
    assert not hasattr(node, "forward") and not hasattr(node, "value")  # a model input has neither hook
    with pytest.raises(TypeError, match=r"adapter node with no hook: subclass jaxpeft.LayerAdapter"):
        hook_kind(jaxpeft.Adapter())
    with pytest.raises(TypeError, match=r"missing 1 required keyword-only argument: 'layout'"):
        jaxpeft.LoraWeights(jnp.zeros((4, 1)), jnp.zeros((1, 4)), 1.0)  # no default layout


def test_unsupported_is_not_a_layout():
    assert (
        jaxpeft.linen.infer_layouts(LINEN, IDS)["layers/norm/scale"]
        == jnnx.infer_layouts(nnx_model_shapes())["layers/norm/scale"]
    )
    with pytest.raises(ValueError, match=r"`kind`='unsupported' is not one of"):
        jaxpeft.Layout(kind="unsupported")


def nnx_model_shapes():
    return nnx.eval_shape(lambda: NnxNet(rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("kind", ["dense", "dense_general", "einsum", "conv", "embed"])
def test_layer_call_contract_applies_a_weight_sized_update_for_every_kind(kind):
    """``LayerCall.contract(w)`` is the layer's own contraction with another kernel: equal to ``base`` on the
    kernel itself minus nothing (the probe's base has no bias), and linear in ``w``."""
    from jaxpeft.protocol import probe_call

    layouts = {
        "dense": jaxpeft.Layout(kind="dense"),
        "dense_general": jaxpeft.Layout(fan_in=2, fan_out=2, kind="dense_general"),
        "einsum": jaxpeft.Layout(stack=1, kind="einsum"),
        "conv": jaxpeft.Layout(fan_in=2, kind="conv"),
        "embed": jaxpeft.Layout(kind="embed"),
    }
    shapes = {"dense": (4, 3), "dense_general": (2, 3, 4, 2), "einsum": (2, 3, 4), "conv": (3, 4, 5), "embed": (9, 4)}
    kernel = jax.random.normal(jax.random.key(0), shapes[kind])
    call = probe_call(layouts[kind], kernel, jax.random.key(1))
    np.testing.assert_allclose(call.contract(kernel), call.base(call.x), rtol=1e-6, atol=1e-6)
    twice = call.contract(2 * kernel) if kind != "embed" else 2 * call.contract(kernel)
    np.testing.assert_allclose(twice, 2 * call.base(call.x), rtol=1e-6, atol=1e-6)
    if kind in ("dense", "dense_general"):
        assert all(ax >= 0 for ax in call.axes)  # normalised, never Flax's raw negative axis or None
    tied = jaxpeft.protocol.LayerCall("attend", jnp.ones((2, 4)), lambda q: q @ kernel.T, kernel)
    if kind == "embed":
        np.testing.assert_allclose(tied.contract(kernel), tied.base(tied.x), rtol=1e-6)


def test_layer_call_axes_are_normalised():
    call = jaxpeft.LayerCall("dense_general", jnp.ones((2, 3, 4)), lambda x: x, jnp.ones((4, 5)), axes=(-1,))
    assert call.axes == (2,)
    assert jaxpeft.LayerCall("dense", jnp.ones((2, 7, 4)), lambda x: x, jnp.ones((4, 5))).axes == (2,)
