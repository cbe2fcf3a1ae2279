"""Plain-JAX op helpers: each equals the merged-weight computation; stacked adapters inside lax.scan; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
from jaxpeft import ops


def lora(a_shape, b_shape, scale=0.5, seed=0, layout=None):
    """A hand-built adapter; the layout defaults to one fan-in and one fan-out axis after the stack axes."""
    ka, kb = jax.random.split(jax.random.key(seed))
    if layout is None:
        layout = jaxpeft.Layout(fan_in=len(a_shape) - 1, fan_out=len(b_shape) - 1)
    return jaxpeft.LoraWeights(jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape), scale, layout=layout)


def close(x, y):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)


def test_lora_dense_equals_merged_weight():
    x, w, ad = (
        jax.random.normal(jax.random.key(1), (3, 6)),
        jax.random.normal(jax.random.key(2), (6, 5)),
        lora((6, 2), (2, 5)),
    )
    close(ops.lora_dense(x, w, ad), x @ (w + ad.delta(w.shape)))


def test_dense_delta_with_explicit_axes():
    x = jax.random.normal(jax.random.key(1), (4, 3, 2))  # contract axes (0, 2) against fan_in (4, 2)
    ad = lora((4, 2, 3), (3, 5))
    w = ad.delta((4, 2, 5))
    close(ops.dense_delta(x, ad, axes=(0, 2)), jnp.einsum("abc,acd->bd", x, w))


def test_lora_einsum_equals_merged_weight():
    x = jax.random.normal(jax.random.key(1), (2, 3, 6))
    ad = lora((6, 2), (2, 4, 5))
    w = jax.random.normal(jax.random.key(2), (6, 4, 5))
    close(ops.lora_einsum("btd,dnh->btnh", x, w, ad), jnp.einsum("btd,dnh->btnh", x, w + ad.delta(w.shape)))


def test_einsum_with_batch_letters_is_stacked():
    x = jax.random.normal(jax.random.key(1), (3, 2, 6))  # "l" is shared: a per-layer batch axis
    ad = lora((3, 6, 2), (3, 2, 5), layout=jaxpeft.Layout(stack=1, kind="einsum"))
    w = jax.random.normal(jax.random.key(2), (3, 6, 5))
    assert ops.einsum_plan("lbd,ldh->lbh").layout == jaxpeft.Layout(stack=1, kind="einsum")
    close(ops.lora_einsum("lbd,ldh->lbh", x, w, ad), jnp.einsum("lbd,ldh->lbh", x, w + ad.delta(w.shape)))


@pytest.mark.parametrize(
    ("subscripts", "reason"),
    [
        ("bd,hd->bh", r"not ordered \(shared, contracted, output\)"),
        ("bd,dhk->bh", "summed away"),
        ("bd,d...->b...", "ellipsis"),
    ],
)
def test_unsupported_einsums_say_why(subscripts, reason):
    assert isinstance(ops.einsum_layout(subscripts), jaxpeft.Unsupported)
    assert reason.split(" ")[0] in ops.einsum_layout(subscripts).reason
    with pytest.raises(ValueError, match=f"einsum '{subscripts}' cannot be adapted: .*{reason}"):
        ops.einsum_delta(subscripts, jnp.ones((2, 3)), lora((3, 1), (1, 2)))
    with pytest.raises(ValueError, match="expected two operands"):
        ops.einsum_plan("bd->b")


def test_embed_and_attend_equal_merged_table():
    ids = jnp.array([[0, 3, 5], [1, 1, 2]])
    table = jax.random.normal(jax.random.key(1), (6, 4))
    ad = lora((6, 2), (2, 4))
    merged = table + ad.delta(table.shape)
    close(ops.lora_embed(ids, table, ad), merged[ids])
    q = jax.random.normal(jax.random.key(2), (3, 4))
    close(q @ table.T + ops.attend_delta(q, ad), q @ merged.T)


def test_lora_conv_equals_merged_kernel():
    x = jax.random.normal(jax.random.key(1), (2, 7, 7, 3))
    w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))
    ad = lora((3, 3, 3, 2), (2, 4), layout=jaxpeft.Layout(fan_in=3, kind="conv"))
    merged = w + ad.delta(w.shape)
    expected = ops.lora_conv(
        x, merged, jaxpeft.LoraWeights(ad.a, ad.b * 0, 1.0, layout=ad.layout), strides=(2, 2), padding="SAME"
    )
    close(ops.lora_conv(x, w, ad, strides=(2, 2), padding="SAME"), expected)


def test_stacked_adapters_inside_lax_scan_match_merge():
    kernels = jax.random.normal(jax.random.key(1), (3, 4, 4))
    ad = lora((3, 4, 2), (3, 2, 4), layout=jaxpeft.Layout(stack=1))
    x = jax.random.normal(jax.random.key(2), (5, 4))

    def layer(h, slices):
        w, a = slices
        return jnp.tanh(ops.lora_dense(h, w, a)), None

    out, _ = jax.lax.scan(layer, x, (kernels, ad))
    merged = jaxpeft.merge({"w": kernels}, {"w": ad})["w"]
    ref, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, merged)
    close(out, ref)


def test_unsliced_stacked_adapter_is_an_error():
    with pytest.raises(ValueError, match=r"stacked adapters must be sliced like their kernel"):
        ops.dense_delta(jnp.ones((2, 4, 4)), lora((3, 4, 2), (3, 2, 4), layout=jaxpeft.Layout(stack=1)), axes=(2,))


def test_dropout_is_inverted_and_keyed():
    ad = jaxpeft.LoraWeights(jnp.eye(4)[:, :4], jnp.eye(4), 1.0, dropout=0.5, layout=jaxpeft.Layout())
    x = jnp.ones((1000, 4))
    y = ops.dense_delta(x, ad, dropout_key=jax.random.key(0))
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 2.0}
    assert float(y.mean()) == pytest.approx(1.0, abs=0.05)
    np.testing.assert_array_equal(ops.dense_delta(x, ad), x)  # no key: no dropout


def test_compute_in_activation_dtype():
    x = jnp.ones((2, 6), jnp.bfloat16)
    y = ops.lora_dense(x, jnp.ones((6, 5), jnp.bfloat16), lora((6, 2), (2, 5)))
    assert y.dtype == jnp.bfloat16


def test_merged_fallback_equals_explicit_ops():
    params = {"w": jax.random.normal(jax.random.key(1), (6, 5))}
    adapters = {"w": lora((6, 2), (2, 5))}
    x = jnp.ones((2, 6))
    close(jaxpeft.merged(lambda p, x: x @ p["w"])(params, adapters, x), ops.lora_dense(x, params["w"], adapters["w"]))


# ------------------------------------------------------------------------------------------------ lowrank_chain


def _vjp_all(f, args, cot):
    y, pull = jax.vjp(f, *args)
    return y, pull(cot)


LOWRANK_CASES = [
    # (x_spec, f1_spec, h_spec, f2_spec, out_spec, x shape, f1 shape, f2 shape)
    ("btd,dr->btr", "btr,ro->bto", (2, 5, 6), (6, 3), (3, 4)),  # dense
    ("bdt,dr->btr", "btr,rop->btop", (2, 6, 5), (6, 3), (3, 4, 2)),  # dense_general over a middle axis
    ("bthd,hdr->bthr", "bthr,hrk->btkh", (2, 5, 3, 4), (3, 4, 2), (3, 2, 6)),  # einsum with a stack letter
    ("btd,rd->btr", "btr,vr->btv", (2, 5, 6), (3, 6), (7, 3)),  # attend: q·Bᵀ·Aᵀ
]


@pytest.mark.parametrize("first,second,xs,f1s,f2s", LOWRANK_CASES)
def test_lowrank_chain_value_and_gradients_equal_autodiff_of_two_einsums(first, second, xs, f1s, f2s):
    x_s, f1_s, h_s = first.replace("->", ",").split(",")
    _, f2_s, out_s = second.replace("->", ",").split(",")
    k = jax.random.split(jax.random.key(0), 4)
    x, f1, f2 = (jax.random.normal(kk, s) for kk, s in zip(k, (xs, f1s, f2s), strict=False))

    def plain(x, f1, f2):
        return jnp.einsum(second, jnp.einsum(first, x, f1) * 0.7, f2)

    def chain(x, f1, f2):
        return ops.lowrank_chain(x_s, f1_s, h_s, f2_s, out_s, x, f1, f2, 0.7)

    cot = jax.random.normal(k[3], plain(x, f1, f2).shape)
    (y0, g0), (y1, g1) = _vjp_all(plain, (x, f1, f2), cot), _vjp_all(chain, (x, f1, f2), cot)
    close(y1, y0)
    for a, b in zip(g1, g0, strict=True):
        close(a, b)


def test_lowrank_chain_with_ellipsis_under_vmap_scan_and_remat():
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (3, 2, 5, 6))  # vmapped over the leading axis, scanned over a stack of 2 adapters
    a, b = jax.random.normal(k[1], (2, 6, 3)), jax.random.normal(k[2], (2, 3, 4))

    def layer(branch):
        def body(carry, ab):
            return carry, jax.checkpoint(branch)(carry, *ab)

        def f(x, a, b):
            return jax.lax.scan(body, x, (a, b))[1].sum(axis=0)

        return jax.vmap(f, in_axes=(0, None, None))

    chain = layer(lambda x, a, b: ops.lowrank_chain("...d", "dr", "...r", "ro", "...o", x, a, b, 2.0))
    plain = layer(lambda x, a, b: 2.0 * (x @ a) @ b)
    cot = jax.random.normal(k[3], (3, 2, 5, 4))
    (y0, g0), (y1, g1) = _vjp_all(jax.jit(plain), (x, a, b), cot), _vjp_all(jax.jit(chain), (x, a, b), cot)
    close(y1, y0)
    for u, v in zip(g1, g0, strict=True):
        close(u, v)


def test_lowrank_chain_computes_in_the_activation_dtype_and_returns_factor_dtype_gradients():
    x = jnp.ones((4, 8), jnp.bfloat16)
    a, b = jnp.full((8, 2), 0.1, jnp.float32), jnp.full((2, 3), 0.1, jnp.float32)
    y, pull = jax.vjp(lambda x, a, b: ops.dense_lowrank(x, a, b, 1.0), x, a, b)
    dx, da, db = pull(jnp.ones_like(y))
    assert y.dtype == dx.dtype == jnp.bfloat16
    assert da.dtype == db.dtype == jnp.float32
    np.testing.assert_allclose(da, np.full((8, 2), 4 * 3 * 0.1), rtol=1e-2)  # bf16 arithmetic
