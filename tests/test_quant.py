"""jaxpeft.quant (QLoRA): int8 / NF4 round trips and bounds, scan stacks, Linen and NNX over a quantised base,
QLoRA vs LoRA on the Llama example model, bytes, merge bounds, no full-precision residual, FLOPs, errors."""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import jaxpeft
import jaxpeft.linen
import jaxpeft.nnx as jnnx
from examples.models import llama
from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths, map_with_paths

EPS = 1e-6  # float32 slack on the exact-arithmetic bounds


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def gaussian(shape, seed=0, std=0.02, dtype=np.float32):
    return jnp.asarray((std * np.random.default_rng(seed).standard_normal(shape)).astype(dtype))


def perturb(adapters, seed=3, size=0.05):
    """Adapters plus Gaussian noise (made on the host), so every branch is non-zero."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + jnp.asarray(size * rng.standard_normal(x.shape), x.dtype), adapters)


def flat(tree) -> dict:
    return dict(leaves_with_paths(tree, is_leaf=quant.is_quantized))


# ------------------------------------------------------------------------------------------------ storage


def test_nf4_code_book_is_qloras_normal_float():
    """NF4 = quantiles of N(0, 1), 8 positive and 7 negative, an exact zero, scaled to [-1, 1] (QLoRA, eq. 4)."""
    offset = 0.5 * (1 / 32 + 1 / 30)  # 0.9677083: the outermost quantile used by QLoRA / bitsandbytes
    inv = statistics.NormalDist().inv_cdf
    pos = [inv(offset + (0.5 - offset) * i / 8) for i in range(8)]
    neg = [-inv(offset + (0.5 - offset) * i / 7) for i in range(7)]
    book = sorted(v / pos[0] for v in [*pos, *neg, 0.0])
    np.testing.assert_allclose(quant.NF4_CODE, book, atol=1e-6)
    assert quant.NF4_CODE[7] == 0.0 and quant.NF4_CODE[0] == -1.0 and quant.NF4_CODE[-1] == 1.0
    assert abs(quant.NF4_HALF_GAP - 0.1519) < 1e-4


def test_storage_layout_and_bytes():
    w = gaussian((3, 256, 96))  # 3 stacked layers; 384 blocks a layer: two double-quantisation groups
    layout = jaxpeft.Layout(stack=1)
    q4 = quant.quantize_array(w, layout, "nf4")
    q8 = quant.quantize_array(w, layout, "int8")
    # NF4 keeps the weight's axes: blocks of 64 along fan-in (256 -> 128 bytes of codes, 4 scales) in every column,
    # one double-quantisation group per 96 block scales along the last axis
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(q4)] == [
        ((3, 128, 96), jnp.uint8),
        ((3, 4, 96), jnp.uint8),
        ((3, 4, 1), jnp.float32),
    ]
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(q8)] == [((3, 256, 96), jnp.int8), ((3, 96), jnp.float32)]
    for q in (q4, q8):
        assert (q.shape, q.dtype, q.ndim, q.size) == (w.shape, w.dtype, 3, w.size)
        assert q.nbytes == nbytes(q)
    assert q4.nbytes / w.size == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 96))  # ~0.516 B a weight
    assert q8.nbytes / w.size == pytest.approx(1 + 4 / 256)


def _nf4_block_scales(q):
    return np.asarray(quant._block_scales(q.scales, q.group_scales, q.group_size))


def _nf4_blocks(w, q):
    """``|w|`` laid out per NF4 block of ``q``: ``(*q.scales.shape, block)`` (zero padded along the block axis)."""
    axis, block = quant._nf4_axis(q), q.block_size
    v = np.abs(np.asarray(w, np.float64))
    v = np.pad(v, [(0, -v.shape[axis] % block if i == axis else 0) for i in range(v.ndim)])
    v = v.reshape(*v.shape[:axis], -1, block, *v.shape[axis + 1 :])
    return np.moveaxis(v, axis + 1, -1)


@pytest.mark.parametrize("shape, stack", [((3, 256, 96), 1), ((50, 7), 0), ((4, 6, 5, 3), 1), ((2, 100, 300), 1)])
def test_nf4_round_trip_within_bounds(shape, stack):
    w = gaussian(shape, seed=1)
    w = w.at[(0,) * len(shape)].set(0.5)  # an outlier: its block's scale is large, its group's max too
    q = quant.quantize_array(w, jaxpeft.Layout(stack=stack, fan_in=len(shape) - stack - 1), "nf4")
    err = _nf4_blocks(np.asarray(quant.dequantize(q)) - np.asarray(w), q)
    absmax = _nf4_blocks(w, q).max(-1)
    scale = _nf4_block_scales(q)
    group_max = np.repeat(np.asarray(q.group_scales), 256, axis=-1)[..., : scale.shape[-1]]
    assert np.all(scale >= absmax * (1 - 1e-5)) and np.all(scale < absmax + group_max / 255 + EPS)
    assert np.all(err.max(-1) <= quant.NF4_HALF_GAP * scale + EPS)


def test_nf4_relative_error_on_gaussian_weights():
    w = np.asarray(gaussian((512, 384), seed=6))
    err = np.asarray(quant.dequantize(quant.quantize_array(jnp.asarray(w), jaxpeft.Layout(), "nf4"))) - w
    assert np.linalg.norm(err) / np.linalg.norm(w) < 0.10  # measured 0.092


def test_int8_round_trip_within_bounds_and_zero_columns_stay_zero():
    w = gaussian((2, 4, 6, 10), seed=2).at[:, :, :, 3].set(0.0)  # DenseGeneral-like: 2 fan-in axes
    q = quant.quantize_array(w, jaxpeft.Layout(stack=1, fan_in=2), "int8")
    assert q.scales.shape == (2, 10)
    err = np.abs(np.asarray(quant.dequantize(q)) - np.asarray(w))
    colmax = np.abs(np.asarray(w)).max(axis=(1, 2), keepdims=True)
    assert np.all(err <= colmax * quant.INT8_ERROR + EPS)
    assert np.all(np.asarray(quant.dequantize(q))[..., 3] == 0.0)
    assert np.linalg.norm(err) / np.linalg.norm(np.asarray(w)) < 0.01  # measured 0.007


@pytest.mark.parametrize("kind", quant.KINDS)
def test_requantizing_dequantized_values_gives_the_same_codes(kind):
    q = quant.quantize_array(gaussian((2, 64, 48), seed=4), jaxpeft.Layout(stack=1), kind)
    again = quant.requantize(quant.dequantize(q, jnp.float32), q)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(q), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6)
    np.testing.assert_array_equal(again.codes, q.codes)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_stacked_kernel_slices_like_its_layers(kind):
    """Every leaf keeps the stack axis leading: slicing it (as nn.scan / lax.scan do) is quantising the slice."""
    w = gaussian((3, 40, 24), seed=5)
    q = quant.quantize_array(w, jaxpeft.Layout(stack=1), kind)
    for i in range(3):
        one = quant.quantize_array(w[i], jaxpeft.Layout(), kind)
        sliced = jax.tree.map(lambda x, i=i: x[i], q)
        assert sliced.shape == (40, 24)
        for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(one), strict=True):
            np.testing.assert_array_equal(a, b)
    _, per_layer = jax.lax.scan(lambda c, qi: (c, quant.dequantize(qi)), 0, q)
    np.testing.assert_allclose(per_layer, quant.dequantize(q), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ linen kinds


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(8, name="down")(jnp.tanh(nn.Dense(16, name="up")(x))), None


class Zoo(nn.Module):
    """A scanned Dense stack, DenseGeneral, Einsum with bias, Conv, and a float embedding and head."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(12, 8, name="embed")(ids)
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(
            x, None
        )
        h = nn.DenseGeneral((2, 4), name="heads")(x)
        x = x + nn.Einsum((2, 4, 8), "sthk,hkc->stc", name="merge_heads")(h)
        x = x + nn.Conv(8, (3,), name="conv")(x)
        return nn.Dense(12, name="lm_head")(x)


ZOO = Zoo()
ZOO_IDS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
ZOO_TARGETS = ["up", "down", "heads", "merge_heads", "conv"]


@pytest.fixture(scope="module")
def zoo_params():
    abstract = jax.eval_shape(ZOO.init, jax.random.key(0), ZOO_IDS)["params"]
    leaves, treedef = jax.tree.flatten(abstract)
    return jax.tree.unflatten(treedef, [gaussian(x.shape, seed=i, std=0.3) for i, x in enumerate(leaves)])


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_identity_at_init_equals_the_dequantized_model_for_every_kind(zoo_params, kind, method):
    cfgs = {
        "lora": jaxpeft.LoraConfig(rank=2, alpha=4, targets=ZOO_TARGETS),
        "dora": jaxpeft.DoraConfig(rank=2, alpha=4, targets=ZOO_TARGETS),
        "ia3": jaxpeft.IA3Config(targets=ZOO_TARGETS, feedforward=["down"]),
    }
    cfg = cfgs[method]
    qp = jaxpeft.linen.quantize(cfg, ZOO, zoo_params, ZOO_IDS, kind=kind)
    assert all(quant.is_quantized(flat(qp)[f"{t}/kernel"]) for t in ["heads", "merge_heads", "conv"])
    adapters = jaxpeft.linen.init(cfg, ZOO, qp, ZOO_IDS, key=jax.random.key(1))
    out = jax.jit(lambda p, a: jaxpeft.linen.apply(ZOO, {"params": p}, a, ZOO_IDS))(qp, adapters)
    expected = ZOO.apply({"params": jaxpeft.dequantize(qp)}, ZOO_IDS)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_a_quantised_weight_without_an_adapter_runs_dequantised(zoo_params):
    """All five kinds quantised, only `up` adapted: the others run their own code on the dequantised weight."""
    qp = jaxpeft.linen.quantize(ZOO_TARGETS, ZOO, zoo_params, ZOO_IDS, kind="int8")
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["up"])
    adapters = jaxpeft.linen.init(cfg, ZOO, qp, ZOO_IDS, key=jax.random.key(1))
    out = jaxpeft.linen.apply(ZOO, {"params": qp}, adapters, ZOO_IDS)
    np.testing.assert_allclose(out, ZOO.apply({"params": jaxpeft.dequantize(qp)}, ZOO_IDS), atol=1e-5)
    no_adapters = jaxpeft.linen.apply(ZOO, {"params": qp}, {}, ZOO_IDS)
    np.testing.assert_allclose(no_adapters, out, atol=1e-5)


@pytest.mark.parametrize("layer", [nn.Conv(4, (3,)), nn.Dense(4)])
def test_layers_at_the_model_root_are_not_intercepted_twice(layer):
    """The detached clone that runs a dequantised (or conv-branch) layer has the root's path; it is not adapted."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32))
    params = {"kernel": gaussian((3, 4, 4) if isinstance(layer, nn.Conv) else (4, 4), std=0.5), "bias": jnp.zeros(4)}
    cfg = jaxpeft.LoraConfig(rank=2, targets=r"kernel$")
    for p in (params, jaxpeft.linen.quantize(cfg, layer, params, x, kind="int8")):
        adapters = jaxpeft.linen.init(cfg, layer, p, x, key=jax.random.key(1))
        expected = layer.apply({"params": jaxpeft.dequantize(p)}, x)
        np.testing.assert_allclose(jaxpeft.linen.apply(layer, {"params": p}, adapters, x), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ llama


LLAMA = llama.LlamaConfig(
    vocab_size=32,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
IDS = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 0]])
LORA = jaxpeft.LoraConfig(rank=4, alpha=8, targets="all-linear")  # every projection; embeddings and head stay


def llama_params(dtype=np.float32):
    """Host-made params (std 0.02 as Llama's initializer, norms at 1): no XLA compilation of flax's init."""
    abstract = llama.abstract_params(LLAMA)
    rng = np.random.default_rng(0)

    def make(path, x):
        if path.endswith("scale"):
            return jnp.ones(x.shape, dtype)
        return jnp.asarray((0.02 * rng.standard_normal(x.shape)).astype(dtype))

    return map_with_paths(make, abstract)


@pytest.fixture(scope="module")
def lm():
    params = llama_params()
    bf16 = dataclasses.replace(LLAMA, dtype="bfloat16", param_dtype="bfloat16")
    model, model_bf16 = llama.LlamaForCausalLM(LLAMA), llama.LlamaForCausalLM(bf16)
    adapters = perturb(jaxpeft.linen.init(LORA, model, params, IDS, key=jax.random.key(1)), size=0.1)
    return {
        "model": model,
        "model_bf16": model_bf16,
        "params": params,
        "params_bf16": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params),
        "adapters": adapters,
        "forward": jax.jit(lambda p, a: jaxpeft.linen.apply(model, {"params": p}, a, IDS)),
        "forward_bf16": jax.jit(lambda p, a: jaxpeft.linen.apply(model_bf16, {"params": p}, a, IDS)),
    }


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# Output error of QLoRA against LoRA with the same adapters on the full-precision base (relative Frobenius norm of
# the logits). Measured: NF4 0.074 (f32 base) / 0.088 (bf16 base), int8 0.005 / 0.009; for scale, bf16 LoRA
# differs from f32 LoRA by 0.008. NF4's ~9% weight error per layer dominates, as for bitsandbytes' NF4.
QLORA_TOLERANCE = {"nf4": 0.15, "int8": 0.02}


@pytest.mark.parametrize("kind", quant.KINDS)
def test_qlora_is_within_tolerance_of_lora_f32_and_bf16(lm, kind):
    for params, forward in ((lm["params"], lm["forward"]), (lm["params_bf16"], lm["forward_bf16"])):
        qp = jaxpeft.linen.quantize(LORA, lm["model"], params, IDS, kind=kind)
        assert all(quant.is_quantized(x) == (p.endswith("_proj/kernel")) for p, x in flat(qp).items()), (
            "all-linear quantises the projections only"
        )
        lora, qlora = forward(params, lm["adapters"]), forward(qp, lm["adapters"])
        assert _rel(qlora, lora) <= QLORA_TOLERANCE[kind]
        # identity at init: exactly the model on the dequantised base
        zero = jax.tree.map(jnp.zeros_like, lm["adapters"])
        base = forward(jaxpeft.dequantize(qp), zero)
        np.testing.assert_allclose(forward(qp, zero), base, atol=1e-6, rtol=1e-6)


def test_nf4_base_takes_at_most_0_30_of_the_bf16_bytes(lm):
    qp = jaxpeft.linen.quantize(LORA, lm["model"], lm["params_bf16"], IDS, kind="nf4")
    quantised = jaxpeft.summary(qp, lm["adapters"]).base_bytes
    full = jaxpeft.summary(lm["params_bf16"], lm["adapters"]).base_bytes
    assert quantised == nbytes(qp) and full == nbytes(lm["params_bf16"])
    assert quantised / full <= 0.30  # measured 0.284: projections 0.258x, embeddings/head/norms stay bf16


def _loss(forward, params):
    return lambda a: jnp.mean(forward(params, a) ** 2)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_gradients_only_for_adapters(lm, kind):
    qp = jaxpeft.linen.quantize(LORA, lm["model"], lm["params"], IDS, kind=kind)
    grads = jax.jit(jax.grad(_loss(lm["forward"], qp)))(lm["adapters"])
    assert nbytes(grads) == nbytes(lm["adapters"])
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_no_full_precision_weight_is_kept_for_the_backward_pass(lm, capsys):
    """The saved residuals hold codes, never a dequantised kernel (a float base keeps its kernels, for free)."""
    model = lm["model"]
    qp = jaxpeft.linen.quantize(LORA, model, lm["params"], IDS, kind="nf4")
    kernels = {f"f32[{','.join(map(str, x.shape))}]" for p, x in flat(qp).items() if quant.is_quantized(x)}
    assert len(kernels) == 4  # q/o, k/v, gate/up, down

    def residuals(params):
        print_saved_residuals(
            lambda a: jnp.mean(jaxpeft.linen.apply(model, {"params": params}, a, IDS)), lm["adapters"]
        )
        return capsys.readouterr().out

    float_base, quantized = residuals(lm["params"]), residuals(qp)
    assert all(k in float_base for k in kernels)
    assert not any(k in quantized for k in kernels)
    assert "u8[2,32,256]" in quantized  # gate/up codes: 2 layers x 64 / 2 x 256


@pytest.mark.parametrize("kind", quant.KINDS)
def test_merge_into_a_quantised_base_is_within_one_rounding(lm, kind):
    qp = jaxpeft.linen.quantize(LORA, lm["model"], lm["params"], IDS, kind=kind)
    adapters = perturb(jaxpeft.linen.init(LORA, lm["model"], qp, IDS, key=jax.random.key(5)), size=0.01)
    merged = jaxpeft.merge(qp, adapters)  # ΔW of about 15% of W (std 0.003 vs 0.02)
    exact = jaxpeft.merge(jaxpeft.dequantize(qp, jnp.float32), adapters)  # Ŵ + ΔW in float32
    for path, q in flat(merged).items():
        if not quant.is_quantized(q):
            np.testing.assert_array_equal(q, flat(qp)[path])
            continue
        w = np.asarray(flat(exact)[path])
        err = np.abs(np.asarray(quant.dequantize(q)) - w)
        if kind == "int8":  # |err| <= column absmax / 254
            assert np.all(err <= np.abs(w).max(axis=1, keepdims=True) * quant.INT8_ERROR + EPS), path
        else:  # |err| <= 0.152 · m̂ per block, m̂ < m + M / 255
            blocks = _nf4_blocks(err, q)
            assert np.all(blocks.max(-1) <= quant.NF4_HALF_GAP * _nf4_block_scales(q) + EPS), path
    # the merged quantised model runs (no adapters) and stays near the adapted one: one more rounding
    adapted = lm["forward"](qp, adapters)
    zero = jax.tree.map(jnp.zeros_like, adapters)
    assert _rel(lm["forward"](merged, zero), adapted) <= QLORA_TOLERANCE[kind]  # measured 0.10 (nf4), 0.008
    # unmerge: within two roundings of the start
    back = jaxpeft.unmerge(merged, adapters)
    for path, q in flat(back).items():
        if quant.is_quantized(q):
            start = np.asarray(quant.dequantize(flat(qp)[path]))
            err = np.abs(np.asarray(quant.dequantize(q)) - start)
            bound = (
                2
                * np.abs(np.asarray(flat(exact)[path])).max()
                * (quant.INT8_ERROR if kind == "int8" else quant.NF4_HALF_GAP * 1.01)
            )
            assert err.max() <= bound + EPS, path


@pytest.mark.parametrize("kind", quant.KINDS)
def test_merging_identity_adapters_gives_back_the_same_codes(lm, kind):
    qp = jaxpeft.linen.quantize(LORA, lm["model"], lm["params"], IDS, kind=kind)
    merged = jaxpeft.merge(qp, jaxpeft.linen.init(LORA, lm["model"], qp, IDS, key=jax.random.key(1)))
    for path, q in flat(merged).items():
        if quant.is_quantized(q):
            np.testing.assert_array_equal(q.codes, flat(qp)[path].codes)


def _one_lora(d_in, d_out, delta_std, rank=8, seed=0):
    """``{"lin": {"kernel": LoRA}}`` whose update ``ΔW = 2·A·B`` has entries of standard deviation ``delta_std``."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d_in, rank)) / np.sqrt(d_in)
    b = rng.standard_normal((rank, d_out))
    b *= delta_std / np.std(2.0 * a @ b)
    node = jaxpeft.LoraWeights(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 2.0, layout=jaxpeft.Layout())
    return {"lin": {"kernel": node}}


@pytest.mark.parametrize("kind", quant.KINDS)
def test_merge_refuses_a_float16_overflow_of_the_quantised_weight(kind):
    """A float16 base quantises with logical dtype float16: merged values past 65504 would dequantise to inf (finite
    in float32 before requantising), so the merge is refused by name, as for a float16 array."""
    params = {"lin": {"kernel": quant.quantize_array(gaussian((64, 32), dtype=np.float16), jaxpeft.Layout(), kind)}}
    big = _one_lora(64, 32, 3e4)  # |ΔW| up to ~1e5: finite in float32, inf in float16
    with pytest.raises(
        ValueError,
        match=(
            r"folding the adapter into 'lin/kernel' overflows float16 \(largest finite 65504\): the merged values "
            rf"reach max \|value\| [0-9.]+e\+0[45], and this {kind}-quantised weight dequantises to float16 \(its "
            r"logical dtype\), so it would hold inf and could not be unmerged. Merge into float32 params instead"
        ),
    ):
        jaxpeft.merge(params, big)
    with pytest.raises(ValueError, match=r"overflows float16"):
        jaxpeft.unmerge(params, big)
    # a trained-size update merges as before: float16, finite, within one rounding of Ŵ + ΔW
    small = _one_lora(64, 32, 0.005)
    merged = flat(jaxpeft.merge(params, small))["lin/kernel"]
    assert quant.is_quantized(merged) and merged.dtype == jnp.float16 and merged.kind == kind
    values = np.asarray(quant.dequantize(merged), np.float32)
    exact = np.asarray(flat(jaxpeft.merge(jaxpeft.dequantize(params, jnp.float32), small))["lin/kernel"])
    assert np.all(np.isfinite(values))
    assert np.abs(values - exact).max() <= quant.NF4_HALF_GAP * np.abs(exact).max() * 1.01 + 1e-3


@pytest.mark.parametrize("kind", quant.KINDS)
def test_one_merge_unmerge_cycle_drifts_at_most_half_a_level_of_each_requantisation(kind):
    """``unmerge(merge(p))`` requantises twice, so each element moves by at most half a quantisation level of the
    merged weight's scale plus half a level of the result's (int8: per output channel, ``(s₁ + s₂) / 2``; NF4: per
    block of 64, ``0.152 · (m̂₁ + m̂₂)``), on a realistic layer: 256×256 weights ~ N(0, 0.05), rank 8, ΔW std 0.005.
    The measured drift of 1 / 5 / 20 cycles is in ``jaxpeft.merge``'s docstring."""
    params = {"lin": {"kernel": quant.quantize_array(gaussian((256, 256), std=0.05), jaxpeft.Layout(), kind)}}
    adapters = _one_lora(256, 256, 0.005)
    merged = jaxpeft.merge(params, adapters)
    back = jaxpeft.unmerge(merged, adapters)
    start, q1, q2 = (flat(t)["lin/kernel"] for t in (params, merged, back))
    drift = np.abs(np.asarray(quant.dequantize(q2), np.float64) - np.asarray(quant.dequantize(start)))
    if kind == "int8":  # half a step of each column's scale, twice
        bound = (np.asarray(q1.scales) + np.asarray(q2.scales))[None, :] / 2
        assert np.all(drift <= bound + EPS)
        assert drift.max() <= 0.002  # measured 0.0016
    else:  # half the widest NF4 gap of each block's scale, twice
        bound = quant.NF4_HALF_GAP * (_nf4_block_scales(q1) + _nf4_block_scales(q2))[..., None]
        assert np.all(_nf4_blocks(drift, q1) <= bound + EPS)
        assert drift.max() <= 0.05  # measured 0.040
    assert not np.array_equal(q2.codes, start.codes)  # requantising twice does move codes: the bound is what holds


# ------------------------------------------------------------------------------------------------ nnx


class NnxBlock(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(16, 64, rngs=rngs)
        self.down = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jnp.tanh(self.up(x)))


class NnxNet(nnx.Module):
    """A vmap-built stack run by nnx.scan, and an unrolled head."""

    def __init__(self, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return NnxBlock(rngs=rngs)

        self.layers = create(rngs)
        self.out = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return self.out(body(x, self.layers))


X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32))


@nnx.jit
def nnx_forward(model, x):
    return model(x)


def nnx_net():
    model = nnx.eval_shape(lambda: NnxNet(rngs=nnx.Rngs(0)))
    for i, (_, node) in enumerate(nnx.iter_graph(model)):
        if isinstance(node, nnx.Param):
            node.set_value(gaussian(node.get_value().shape, seed=i, std=0.25))
    return model


def dequantized_copy(model):
    """The plain float model holding each quantised weight's dequantised values."""
    plain = nnx.recursive_map(lambda _, n: n.base if isinstance(n, jnnx.QuantizedLayer) else n, nnx.clone(model))
    for _, node in nnx.iter_graph(plain):
        if isinstance(node, nnx.Param) and quant.is_quantized(node.get_value()):
            node.set_value(quant.dequantize(node.get_value()))
    return plain


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_nnx_over_a_quantised_base(kind, method):
    cfg = {
        "lora": jaxpeft.LoraConfig(rank=2, alpha=4, targets=["up", "down"]),
        "dora": jaxpeft.DoraConfig(rank=2, alpha=4, targets=["up", "down"]),
        "ia3": jaxpeft.IA3Config(targets=["up", "down"], feedforward=["down"]),
    }[method]
    qm = jnnx.quantize(nnx_net(), ["up", "down", "out"], kind=kind)
    assert isinstance(qm.layers.up, jnnx.QuantizedLayer) and isinstance(qm.out, jnnx.QuantizedLayer)
    assert jnnx.infer_layouts(qm)["layers/up/kernel"] == jaxpeft.Layout(stack=1)
    base = nnx_forward(dequantized_copy(qm), X)
    np.testing.assert_allclose(nnx_forward(qm, X), base, atol=1e-6)
    adapted = jnnx.adapt(qm, cfg, key=jax.random.key(0))
    assert isinstance(adapted.layers.up, jnnx.AdapterLayer) and isinstance(adapted.out, jnnx.QuantizedLayer)
    np.testing.assert_allclose(nnx_forward(adapted, X), base, atol=1e-6)  # identity at init
    jnnx.load_adapters(adapted, perturb(jnnx.adapters_of(adapted), size=0.2))
    graphdef, trainable, frozen = nnx.split(adapted, jnnx.AdapterParam, ...)
    grads = jax.grad(lambda t: jnp.mean(nnx.merge(graphdef, t, frozen, copy=True)(X) ** 2))(trainable)
    assert nbytes(grads) == nbytes(trainable)
    # the pure form agrees: jaxpeft.merge over base_params equals jaxpeft.nnx.merge
    if method != "dora":  # a DoRA merge cannot be undone, but merges fine
        back = jnnx.unmerge(jnnx.merge(adapted), jnnx.adapters_of(adapted))
        assert isinstance(back.out, jnnx.QuantizedLayer) and isinstance(back.layers.up, jnnx.AdapterLayer)
    merged = jnnx.merge(adapted)
    assert isinstance(merged.layers.up, jnnx.QuantizedLayer)
    pure = jaxpeft.merge(jnnx.base_params(qm), jnnx.adapters_of(adapted))
    for path, q in flat(jnnx.base_params(merged)).items():
        np.testing.assert_allclose(jaxpeft.dequantize(q), jaxpeft.dequantize(flat(pure)[path]), atol=1e-6)
    assert isinstance(jnnx.remove(adapted).layers.up, jnnx.QuantizedLayer)


# ------------------------------------------------------------------------------------------------ sharded step

SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jaxpeft, jaxpeft.linen, jaxpeft.sharding
from tests import test_quant as t

model, ids = t.llama.LlamaForCausalLM(t.LLAMA), jnp.tile(t.IDS, (4, 1))
params = t.llama_params()
qp = jaxpeft.linen.quantize(t.LORA, model, params, ids, kind="nf4")
adapters = t.perturb(jaxpeft.linen.init(t.LORA, model, qp, ids, key=jax.random.key(1)), size=0.01)
step = jax.jit(jax.value_and_grad(lambda a, p, x: jnp.mean(jaxpeft.linen.apply(model, {"params": p}, a, x) ** 2)))
loss, grads = step(adapters, qp, ids)
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
fsdp = lambda x: P(*([None] * (x.ndim - 1)), "fsdp") if x.ndim and x.shape[-1] % 4 == 0 else P()
put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
sharded_qp = jax.tree.map(lambda x: put(x, fsdp(x)), qp)  # codes and scales split along their last axis
specs = jaxpeft.sharding.adapter_specs(adapters, jax.tree.map(fsdp, params), mesh=mesh)  # the float base's specs
sharded = jax.tree.map(put, adapters, specs)
loss8, grads8 = step(sharded, sharded_qp, put(ids, P("data")))
diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads8)))
print(float(abs(loss - loss8)), diff)
"""


def test_sharded_qlora_step_equals_one_device():
    """8 CPU devices (data 2 x fsdp 4): NF4 codes and scales sharded, adapters sharded as derived from the float
    base's specs; loss and gradients equal the one-device step."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss_diff, grad_diff = map(float, proc.stdout.split())
    assert loss_diff < 1e-6 and grad_diff < 1e-6


# ------------------------------------------------------------------------------------------------ flops


def test_qlora_step_pays_only_the_dequantisation():
    """FLOPs (XLA cost analysis): the base matmuls are not recomputed in the backward pass, only dequantisation."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "benchmarks"))
    from flops import BenchConfig, step_flops

    cfg = BenchConfig(width=128, ffn=512, layers=1, heads=2, tokens=256, seq=32, vocab=128, rank=2)
    lora = step_flops("lora", cfg)
    for kind in ("qlora-nf4", "qlora-int8"):
        assert step_flops(kind, cfg) / lora <= 1.05  # measured 1.005 (nf4) and 1.001 (int8) at width 256


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_argument_path_and_fix(lm, zoo_params):
    params, model = lm["params"], lm["model"]
    with pytest.raises(ValueError, match=r"`kind`='nf3'; expected one of \('int8', 'nf4'\)"):
        jaxpeft.linen.quantize(LORA, model, params, IDS, kind="nf3")
    with pytest.raises(
        ValueError, match=r"cannot quantise 'embed/embedding': it is a weight of kind 'embed'.*`exclude`"
    ):
        jaxpeft.linen.quantize(r"kernel$|embedding$", ZOO, zoo_params, ZOO_IDS)
    qp = jaxpeft.linen.quantize(["up"], ZOO, zoo_params, ZOO_IDS)
    with pytest.raises(ValueError, match=r"'layers/up/kernel' is already quantised \(nf4\)"):
        jaxpeft.linen.quantize(["up"], ZOO, qp, ZOO_IDS)
    with pytest.raises(ValueError, match=r"`targets`=\['nope'\] matched no parameter"):
        jaxpeft.quantize(params, ["nope"])
    with pytest.raises(ValueError, match=r"cannot quantise 'w': it is int32, not floating"):
        jaxpeft.quantize({"w": jnp.zeros((4, 4), jnp.int32)}, r"w")
    with pytest.raises(ValueError, match=r"cannot quantise 'w': it holds inf or NaN"):
        jaxpeft.quantize({"w": jnp.full((4, 4), jnp.nan)}, r"w")
    with pytest.raises(ValueError, match=r"looks like the whole variables dict"):
        jaxpeft.linen.quantize(["up"], ZOO, {"params": zoo_params}, ZOO_IDS)
    with pytest.raises(ValueError, match=r"requantize: the values have shape \(3, 3\), the quantised array \(4, 4\)"):
        quant.requantize(jnp.zeros((3, 3)), jaxpeft.quantize({"w": jnp.ones((4, 4))}, r"w")["w"])
    adapted = jnnx.adapt(nnx_net(), jaxpeft.LoraConfig(rank=2, targets=["up"]), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"already has adapters.*jaxpeft.nnx.quantize takes a plain model"):
        jnnx.quantize(adapted, ["down"])


def test_predicates_see_quantised_weights_as_shape_dtype_structs(lm):
    qp = jaxpeft.linen.quantize(LORA, lm["model"], lm["params"], IDS, kind="int8")
    seen = {}

    def pick(path, leaf):
        seen[path] = leaf
        return path.endswith("q_proj/kernel")

    plan = jaxpeft.plan(jaxpeft.LoraConfig(targets=pick), qp, layouts=jaxpeft.linen.infer_layouts(lm["model"], IDS))
    assert [t.path for t in plan.targets] == ["model/layers/self_attn/q_proj/kernel"]
    assert seen["model/layers/self_attn/q_proj/kernel"] == jax.ShapeDtypeStruct((2, 64, 64), jnp.float32)


def test_qlora_adapters_checkpoint_against_the_quantised_base_and_load_on_the_float_one(tmp_path):
    import jaxpeft.checkpoint

    params = {"w": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((128, 64)), jnp.bfloat16)}}
    cfg = jaxpeft.LoraConfig(rank=4, targets=["w"])
    q = jaxpeft.quantize(params, cfg, kind="nf4")
    adapters = jax.tree.map(lambda x: x + 0.1, jaxpeft.init(cfg, q, key=jax.random.key(0)))
    jaxpeft.checkpoint.save_adapters(tmp_path / "ckpt", 1, adapters, cfg, q)
    for base in (q, params):  # the fingerprint sees the logical shape and dtype, not the codes
        restored = jaxpeft.checkpoint.restore_adapters(tmp_path / "ckpt", cfg, base)
        chex.assert_trees_all_equal(restored.adapters, adapters)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_merge_into_a_float_dtype_keeps_the_whole_adapter(lm, kind, capsys):
    """``merge(..., dequantize=dtype)``: no quantised leaf left (``model.apply`` reads it), and the merged logits equal
    the adapted ones; the requantising merge loses a part of the adapter's effect to rounding (see BUILD_NOTES)."""
    qp = jaxpeft.linen.quantize(LORA, lm["model"], lm["params"], IDS, kind=kind)
    adapters = lm["adapters"]
    base, adapted = lm["forward"](qp, jax.tree.map(jnp.zeros_like, adapters)), lm["forward"](qp, adapters)
    effect = float(np.linalg.norm(np.asarray(adapted) - np.asarray(base)))

    def loss_of(merged) -> float:  # error of the merged model's logits, in units of the adapter's effect
        return float(np.linalg.norm(np.asarray(merged) - np.asarray(adapted))) / effect

    floated = jaxpeft.merge(qp, adapters, dequantize=jnp.float32)
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(floated, is_leaf=quant.is_quantized))
    float_loss = loss_of(lm["model"].apply({"params": floated}, IDS))
    requant_loss = loss_of(lm["forward"](jaxpeft.merge(qp, adapters), jax.tree.map(jnp.zeros_like, adapters)))
    with capsys.disabled():
        print(f"\n[{kind}] merged-logit error / adapter effect: requantised {requant_loss:.3f}, float {float_loss:.2e}")
    assert float_loss <= 1e-4
    assert requant_loss > 10 * float_loss  # the float merge is the one that keeps the adapter
    bf16 = jaxpeft.merge(qp, adapters, dequantize=jnp.bfloat16)
    assert {x.dtype for p, x in flat(bf16).items() if p.endswith("_proj/kernel")} == {jnp.dtype(jnp.bfloat16)}
    for bad in (jnp.int8, "float33", 3):
        with pytest.raises(ValueError, match=r"`dequantize`=.*expected a float dtype"):
            jaxpeft.merge(qp, adapters, dequantize=bad)
