"""Banks under faults: ids that name no adapter under jit, banks of different name orders, unused adapters under
adamw, ids traced inside nnx.jit. Each test runs every layer-call method or both frameworks where they differ."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.experimental import checkify

import jaxpeft
import jaxpeft.linen
import jaxpeft.nnx as jnnx
from tests.test_adapter_sets import BANKED, BATCH, NAMES, close, named_adapters, run
from tests.test_methods import IDS, LINEN, METHODS, nnx_model
from tests.test_methods import params as params  # the shared fixture


def nan_rows(out) -> np.ndarray:
    """Which examples of a batch output hold any NaN."""
    out = np.asarray(out)
    return np.isnan(out.reshape(out.shape[0], -1)).any(axis=1)


def nnx_forward(model, ids, tokens):
    @nnx.jit
    def forward(m, adapter_ids, x):
        jnnx.set_adapter_ids(m, adapter_ids)  # traced ids inside nnx.jit
        return m(x)

    return forward(model, ids, tokens)


# ------------------------------------------------------------------------------ ids that name no adapter (jit)


@pytest.mark.parametrize("method", BANKED)
def test_out_of_range_ids_under_jit_give_nan_rows_never_another_adapter(method, params):
    bank = jaxpeft.stack_adapters(named_adapters(METHODS[method], params))
    ids = jnp.asarray([0, -1, 1, 7, 2, -3], jnp.int32)  # 3 adapters: rows 1, 3 and 5 name none
    out = run(params, bank, BATCH, ids)
    np.testing.assert_array_equal(nan_rows(out), [False, True, False, True, False, True])
    good = run(params, bank, BATCH, jnp.asarray([0, 0, 1, 0, 2, 0], jnp.int32))
    for i in (0, 2, 4):
        close(out[i], good[i])
    for bad in (3, -1, 2**30):  # one id for the whole call
        assert nan_rows(run(params, bank, IDS, jnp.asarray(bad, jnp.int32))).all()


def test_out_of_range_ids_under_nnx_jit_give_nan_rows(params):
    bank = jaxpeft.stack_adapters(named_adapters(METHODS["lora"], params))
    model = jnnx.attach(nnx_model(params), bank)
    out = nnx_forward(model, jnp.asarray([2, 3, 0, -1, 1, 1], jnp.int32), BATCH)
    np.testing.assert_array_equal(nan_rows(out), [False, True, False, True, False, False])
    close(out[0], run(params, bank, BATCH, jnp.asarray([2] * 6, jnp.int32))[0])


def test_traced_ids_set_inside_nnx_jit_equal_linen(params):
    bank = jaxpeft.stack_adapters(named_adapters(METHODS["lora"], params))
    model = jnnx.attach(nnx_model(params), bank)
    ids = jnp.asarray([2, 1, 0, 1, 0, 2], jnp.int32)
    close(nnx_forward(model, ids, BATCH), run(params, bank, BATCH, ids))
    close(nnx_forward(model, jnp.asarray(1, jnp.int32), IDS), run(params, bank, IDS, jnp.asarray(1, jnp.int32)))


def test_checkify_names_the_ids_that_name_no_adapter(params):
    bank = jaxpeft.stack_adapters(named_adapters(METHODS["lora"], params))
    checked = jax.jit(checkify.checkify(run, errors=checkify.user_checks))
    err, _ = checked(params, bank, BATCH, jnp.asarray([0, 1, 2, 2, 1, 0], jnp.int32))
    err.throw()  # in range: no error
    err, out = checked(params, bank, BATCH, jnp.asarray([0, 1, 5, 2, -1, 0], jnp.int32))
    with pytest.raises(checkify.JaxRuntimeError, match=r"holds ids outside \[0, 3\).*\['fr', 'de', 'base'\]"):
        err.throw()
    assert nan_rows(out).tolist() == [False, False, True, False, True, False]


def test_eager_out_of_range_ids_still_raise_in_both_frameworks(params):
    bank = jaxpeft.stack_adapters(named_adapters(METHODS["lora"], params))
    with pytest.raises(ValueError, match=r"ranges over \[-1, 1\]; the bank holds 3 adapters"):
        jaxpeft.linen.apply(LINEN, {"params": params}, bank, IDS, adapter_ids=jnp.asarray([-1, 1]))
    model = jnnx.attach(nnx_model(params), bank)
    with pytest.raises(ValueError, match=r"ranges over \[3, 3\]; the bank holds 3 adapters"):
        jnnx.set_adapter_ids(model, jnp.asarray(3))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(-5, 7), min_size=6, max_size=6))
def test_property_every_row_runs_its_own_adapter_or_is_nan(ids, params):
    bank = _lora_bank(params)
    out = run(params, bank, BATCH, jnp.asarray(ids, jnp.int32))
    valid = np.asarray([0 <= i < 3 for i in ids])
    np.testing.assert_array_equal(nan_rows(out), ~valid)
    named = _NAMED[0]
    for row, i in enumerate(ids):
        if 0 <= i < 3:
            close(out[row], run(params, named[NAMES[i]], BATCH[row : row + 1])[0])


_NAMED: list = []


def _lora_bank(params):
    if not _NAMED:
        _NAMED.append(named_adapters(METHODS["lora"], params))
    return jaxpeft.stack_adapters(_NAMED[0])


# --------------------------------------------------------------------------------------------- one name order


def _two_orders(params):
    named = named_adapters(METHODS["lora"], params)
    forward = jaxpeft.stack_adapters(named)
    backward = jaxpeft.stack_adapters({k: named[k] for k in reversed(NAMES)})
    mixed = dict(forward)
    mixed["out"] = backward["out"]
    return mixed


def test_banks_with_different_name_orders_are_refused_everywhere(params):
    mixed = _two_orders(params)
    message = r"order their adapters differently: .*\['fr', 'de', 'base'\].*\['base', 'de', 'fr'\].*stack_adapters"
    with pytest.raises(ValueError, match=message):
        jaxpeft.adapter_ids(mixed, "fr")
    with pytest.raises(ValueError, match=message):
        jaxpeft.bank_names(mixed)
    with pytest.raises(ValueError, match=message):
        jaxpeft.linen.apply(LINEN, {"params": params}, mixed, IDS, adapter_ids=jnp.asarray(0))
    model = jnnx.attach(nnx_model(params), mixed)
    with pytest.raises(ValueError, match=message):
        jnnx.set_adapter_ids(model, jnp.asarray(0))


def test_adapters_differing_only_in_dropout_name_the_field(params):
    cfg = METHODS["lora"]
    a = named_adapters(cfg, params)["fr"]
    b = jaxpeft.linen.init(dataclasses.replace(cfg, dropout=0.1), LINEN, params, IDS, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"differ at '[^']+': LoraWeights dropout 0\.0 vs 0\.1;"):
        jaxpeft.stack_adapters({"a": a, "b": b})


# --------------------------------------------------------------------------- unused adapters stay bit-identical


def _sum_loss(params):
    def loss(adapters, x, ids):
        return jnp.sum(run(params, adapters, x, ids) ** 2)

    return loss


@pytest.mark.parametrize("method", BANKED)
def test_unused_adapter_is_bit_identical_under_adamw_even_after_it_was_used(method, params):
    bank = jaxpeft.stack_adapters(named_adapters(METHODS[method], params))
    loss = _sum_loss(params)
    tx = jaxpeft.skip_unused_adapters(optax.adamw(0.05, weight_decay=0.1))
    plain = optax.adamw(0.05, weight_decay=0.1)

    def stepper(opt):
        @jax.jit
        def step(adapters, state, ids):
            grads = jax.grad(loss)(adapters, BATCH, ids)
            updates, state = opt.update(grads, state, adapters)
            return optax.apply_updates(adapters, updates), state

        return step

    everyone = jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32)
    no_base = jnp.asarray([0, 1, 1, 0, 0, 1], jnp.int32)
    step = stepper(tx)
    bank1, state1 = step(bank, tx.init(bank), everyone)
    bank2, state2 = step(bank1, state1, no_base)
    for tree1, tree2 in ((bank1, bank2), (state1[0].mu, state2[0].mu), (state1[0].nu, state2[0].nu)):
        for before, after in zip(adapter_slices(tree1, 2), adapter_slices(tree2, 2), strict=True):
            np.testing.assert_array_equal(before, after)
    # the used adapters take exactly adamw's step
    plain_step = stepper(plain)
    p_bank1, p_state1 = plain_step(bank, plain.init(bank), everyone)
    p_bank2, _ = plain_step(p_bank1, p_state1, no_base)
    for k in (0, 1):
        for ours, theirs in zip(adapter_slices(bank2, k), adapter_slices(p_bank2, k), strict=True):
            np.testing.assert_array_equal(ours, theirs)
    moved = [
        not np.array_equal(x, y) for x, y in zip(adapter_slices(p_bank2, 2), adapter_slices(bank1, 2), strict=True)
    ]
    assert any(moved), "plain adamw was expected to move the unused adapter (weight decay, momentum)"


def adapter_slices(tree, k):
    """Adapter ``k`` of every array of every bank in ``tree`` (taken along each bank's adapter axis)."""
    out = []
    for _, node in jaxpeft.adapter_items(tree):
        out += [np.take(np.asarray(leaf), k, axis=node.layout.stack) for leaf in jax.tree.leaves(node)]
    return out


def test_nnx_optimizer_leaves_an_unused_adapter_bit_identical(params):
    bank = jaxpeft.stack_adapters(named_adapters(METHODS["lora"], params))
    model = jnnx.attach(nnx_model(params), bank)
    opt = jnnx.optimizer(model, optax.adamw(0.05, weight_decay=0.1))

    @nnx.jit
    def step(m, o, ids):
        def loss(m):
            jnnx.set_adapter_ids(m, ids)
            return jnp.sum(m(BATCH) ** 2)

        grads = nnx.grad(loss, argnums=nnx.DiffState(0, jnnx.AdapterParam))(m)
        o.update(m, grads)

    step(model, opt, jnp.asarray([0, 1, 2, 0, 1, 2], jnp.int32))
    before = jnnx.adapters_of(model)
    step(model, opt, jnp.asarray([0, 1, 1, 0, 0, 1], jnp.int32))
    after = jnnx.adapters_of(model)
    for b, a in zip(adapter_slices(before, 2), adapter_slices(after, 2), strict=True):
        np.testing.assert_array_equal(b, a)
    changed = [
        not np.array_equal(b, a) for b, a in zip(adapter_slices(before, 0), adapter_slices(after, 0), strict=True)
    ]
    assert any(changed), "the used adapters did not train"


def test_skip_unused_adapters_passes_trees_without_banks_through(params):
    adapters = named_adapters(METHODS["lora"], params)["fr"]
    grads = jax.tree.map(jnp.ones_like, adapters)
    tx = optax.adamw(0.1)
    ours = jaxpeft.skip_unused_adapters(tx)
    a, _ = ours.update(grads, ours.init(adapters), adapters)
    b, _ = tx.update(grads, tx.init(adapters), adapters)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_bank_is_checkpointed_as_a_set_and_the_checkpointer_says_so(params, tmp_path):
    from jaxpeft.adapter_sets import restore_adapter_set, save_adapter_set
    from jaxpeft.checkpoint import save_adapters

    cfg = METHODS["lora"]
    bank = jaxpeft.stack_adapters(named_adapters(cfg, params))
    with pytest.raises(ValueError, match=r"hold adapter banks .*save_adapter_set\(directory, jaxpeft.unstack_adapters"):
        save_adapters(str(tmp_path / "ckpt"), 0, bank, cfg, params)
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    save_adapter_set(str(tmp_path / "set"), jaxpeft.unstack_adapters(bank), cfg, params, step=4)
    restored = jaxpeft.stack_adapters(restore_adapter_set(str(tmp_path / "set"), params)[0])
    ids = jnp.asarray([2, 1, 0, 0, 1, 2], jnp.int32)
    np.testing.assert_array_equal(
        np.asarray(run(params, restored, BATCH, ids)), np.asarray(run(params, bank, BATCH, ids))
    )
