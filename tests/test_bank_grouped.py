"""The grouped mixed-batch paths of adapter banks (``rows``, ``ragged``) against the reference path (``vmap``):
outputs and gradients equal for every layer-call method in Linen and NNX, ids that name no adapter, the route each
bank takes, and what the grouped path costs in the compiled step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft
import jaxpeft.linen
import jaxpeft.nnx as jnnx
from jaxpeft import ops
from jaxpeft.methods.bank import GROUPINGS, choose_route
from tests.test_adapter_sets import BANKED, BATCH, MIXED, close, named_adapters, run
from tests.test_methods import METHODS, nnx_model
from tests.test_methods import params as params  # the shared fixture

METHODS_BANKED = [*BANKED, "lora_fa"]
GROUPED = {"lora", "dora", "lora_fa"}  # x·A·B-shaped branches: their dense calls take the grouped path
UNEVEN = jnp.asarray([2, 2, 2, 0, 2, 0], jnp.int32)  # adapter 1 unused, adapter 2 on four rows


def banks(method, params):
    named = named_adapters(METHODS[method], params)
    return {g: jaxpeft.stack_adapters(named, grouping=g) for g in ("vmap", "rows", "ragged")}


def leaves_close(x, y, tol):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


@pytest.mark.parametrize("method", METHODS_BANKED)
def test_grouped_paths_equal_the_reference_in_outputs_and_gradients_linen(method, params):
    by_path = banks(method, params)

    @jax.jit
    def loss_and_grad(bank, ids):
        return jax.value_and_grad(lambda b: jnp.sum(jnp.tanh(run(params, b, BATCH, ids))))(bank)

    for ids in (jnp.asarray(MIXED), UNEVEN):
        ref_out = run(params, by_path["vmap"], BATCH, ids)
        ref_loss, ref_grad = loss_and_grad(by_path["vmap"], ids)
        for grouping in ("rows", "ragged"):
            close(run(params, by_path[grouping], BATCH, ids), ref_out)
            loss, grad = loss_and_grad(by_path[grouping], ids)
            close(loss, ref_loss, 1e-4)
            leaves_close(grad, ref_grad, 1e-4)
    unused = jaxpeft.select_adapter(loss_and_grad(by_path["rows"], UNEVEN)[1], "de")  # no row of UNEVEN uses it
    assert all(np.abs(np.asarray(g)).max() == 0 for g in jax.tree.leaves(unused))


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("grouping", ["rows", "ragged"])
def test_grouped_paths_equal_the_reference_nnx(method, grouping, params):
    by_path = banks(method, params)
    model = jnnx.attach(nnx_model(params), by_path[grouping])

    @nnx.jit
    def forward(m, ids, x):
        jnnx.set_adapter_ids(m, ids)
        return m(x)

    for ids in (jnp.asarray(MIXED), UNEVEN):
        close(forward(model, ids, BATCH), run(params, by_path["vmap"], BATCH, ids))


@pytest.mark.parametrize("grouping", ["rows", "ragged"])
def test_grouped_paths_give_nan_rows_for_ids_that_name_no_adapter(grouping, params):
    by_path = banks("lora", params)
    ids = jnp.asarray([0, -1, 1, 7, 2, 3], jnp.int32)  # 3 adapters: rows 1, 3 and 5 name none
    out = np.asarray(run(params, by_path[grouping], BATCH, ids))
    assert np.isnan(out.reshape(6, -1)).any(axis=1).tolist() == [False, True, False, True, False, True]
    ref = np.asarray(run(params, by_path["vmap"], BATCH, jnp.asarray([0, 0, 1, 0, 2, 0], jnp.int32)))
    for i in (0, 2, 4):
        close(out[i], ref[i])
    loss = jax.jit(lambda b: jnp.sum(run(params, b, BATCH, ids)))(by_path[grouping])
    assert np.isnan(loss)  # loud, never a clipped or wrapped neighbour


def test_which_path_each_bank_and_call_takes(params):
    assert choose_route("auto", True, 64, 16, "cpu") == "rows"
    assert choose_route("auto", True, 1, 16, "gpu") == "ragged"  # decoding on a native grouped matmul
    assert choose_route("auto", True, 1, 16, "tpu") == "ragged"
    assert choose_route("auto", True, 64, 16, "tpu") == "rows"  # long rows: gathering factors moves less
    assert choose_route("ragged", True, 64, 16, "cpu") == "ragged"
    for grouping in GROUPINGS:
        assert choose_route(grouping, False, 1, 16, "gpu") == "vmap"  # IA3, LoHa, ...: the reference path
    for method in METHODS_BANKED:
        rows = jaxpeft.stack_adapters(named_adapters(METHODS[method], params), grouping="rows")
        text = str(jax.make_jaxpr(lambda b: run(params, b, BATCH, jnp.asarray(MIXED)))(rows))
        assert ("_rows_chain" in text) == (method in GROUPED), method
    ragged = jaxpeft.stack_adapters(named_adapters(METHODS["lora"], params), grouping="ragged")
    assert "ragged_dot" in str(jax.make_jaxpr(lambda b: run(params, b, BATCH, jnp.asarray(MIXED)))(ragged))


def test_grouping_is_checked_and_kept_through_scan_slicing(params):
    named = named_adapters(METHODS["lora"], params)
    with pytest.raises(ValueError, match=r"`grouping`='sorted'; expected one of \('auto', 'rows', 'ragged', 'vmap'\)"):
        jaxpeft.stack_adapters(named, grouping="sorted")
    bank = jaxpeft.stack_adapters(named, grouping="ragged")
    assert {n.grouping for n in jax.tree.leaves(bank, is_leaf=lambda x: hasattr(x, "grouping"))} == {"ragged"}
    scanned = next(n for n in jax.tree.leaves(bank, is_leaf=lambda x: hasattr(x, "grouping")) if n.layout.stack)
    assert scanned.at_call(scanned.layout.stack).grouping == "ragged"


@pytest.mark.parametrize("axes", [None, (1, 2)])
def test_row_and_ragged_ops_follow_their_formula(axes):
    k = jax.random.split(jax.random.key(0), 4)
    if axes is None:
        x, a, b = (
            jax.random.normal(k[0], (5, 3, 4)),
            jax.random.normal(k[1], (3, 4, 2)),
            jax.random.normal(k[2], (3, 2, 6)),
        )
        spec = "btd,bdr,bro->bto"
    else:
        x, a = jax.random.normal(k[0], (5, 4, 2, 3)), jax.random.normal(k[1], (3, 4, 2, 2))
        b = jax.random.normal(k[2], (3, 2, 6))
        spec = "bdet,bder,bro->bto"
    ids = jnp.asarray([2, 0, 2, 1, 0], jnp.int32)
    want = 0.5 * jnp.einsum(spec, x, a[ids], b[ids], precision="highest")
    close(ops.dense_lowrank_rows(x, ids, a, b, 0.5, axes=axes), want, 1e-4)
    close(ops.dense_lowrank_grouped(x, ids, a, b, 0.5, axes=axes), want, 1e-4)
    grads = [
        jax.grad(lambda *f, op=op: jnp.sum(op(x, ids, *f, 0.5, axes=axes) ** 2), argnums=(0, 1))(a, b)
        for op in (ops.dense_lowrank_rows, ops.dense_lowrank_grouped)
    ]
    want_grads = jax.grad(
        lambda a, b: jnp.sum((0.5 * jnp.einsum(spec, x, a[ids], b[ids], precision="highest")) ** 2), argnums=(0, 1)
    )(a, b)
    for g in grads:
        leaves_close(g, want_grads, 1e-3)
    with pytest.raises(ValueError, match=r"needs one id per row of its leading, uncontracted axis"):
        ops.dense_lowrank_rows(x, ids[:3], a, b, 0.5, axes=axes)


def test_grouped_mixed_step_costs_one_adapter_and_keeps_no_per_row_factors():
    """examples/benchmarks/train_step.py's ``mixed16`` against ``lora16`` and the reference path ``mixed16-vmap``
    (XLA cost analysis of the donated AdamW step on a scanned Llama)."""
    from examples.benchmarks.train_step import PRESETS, LlamaForCausalLM, compile_step, hlo_op_counts

    shape = dataclasses.replace(
        PRESETS["tiny"], width=64, ffn=128, layers=2, heads=4, kv_heads=4, vocab=256, batch=2, seq=64, rank=4
    )
    model = LlamaForCausalLM(shape.llama())
    ids = jnp.zeros((shape.batch, shape.seq), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    stats = {}
    for mode in ("lora16", "mixed16", "mixed16-vmap"):
        compiled = compile_step(mode, shape, params, ids)[0]
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        moves = hlo_op_counts(compiled.as_text(), shape.batch * shape.seq * shape.width // 2)
        stats[mode] = (
            float(cost["flops"]),
            compiled.memory_analysis().temp_size_in_bytes,
            moves.get("transpose", 0) + moves.get("copy", 0),
        )
    assert stats["mixed16"][0] / stats["lora16"][0] <= 1.08, stats  # 1.06 at width 64 (gathers); 1.005 on `tiny`
    assert stats["mixed16"][0] <= stats["mixed16-vmap"][0], stats
    assert stats["mixed16"][1] < stats["mixed16-vmap"][1], stats  # no gathered factors kept per scan step
    assert stats["mixed16"][2] <= stats["mixed16-vmap"][2], stats


@pytest.mark.parametrize("method", ["lora_fa", "vera_stored"])
def test_banks_of_methods_with_frozen_fields_partition_and_train_only_the_rest(method, params):
    import optax

    bank = jaxpeft.stack_adapters(named_adapters(METHODS[method], params))
    trainable, frozen = jaxpeft.partition(bank, True)
    frozen_leaves = [x for x in jax.tree.leaves(frozen) if x is not None]
    assert frozen_leaves, "the frozen fields (LoRA-FA's A, VeRA's stored projections) must land on the frozen side"
    tx = jaxpeft.freeze(optax.adam(0.1), True)
    grads = jax.grad(lambda b: jnp.sum(jnp.tanh(run(params, b, BATCH, jnp.asarray(MIXED)))))(bank)
    updates, _ = tx.update(grads, tx.init(bank), bank)
    new = optax.apply_updates(bank, updates)
    kept = jaxpeft.partition(new, True)[1]
    for a, b in zip(jax.tree.leaves(kept), frozen_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = jaxpeft.partition(new, True)[0]
    assert any(
        np.abs(np.asarray(a) - np.asarray(b)).max() > 0
        for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(trainable), strict=True)
    )
