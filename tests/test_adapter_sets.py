"""Adapter banks (several named adapters, switched by data) and mixed-adapter batches, through Linen and NNX."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft
import jaxpeft.linen
import jaxpeft.nnx as jnnx
from tests.test_methods import IDS, LINEN, METHODS, nnx_model, perturb
from tests.test_methods import params as params  # the shared fixture

NAMES = ("fr", "de", "base")
BATCH = jnp.concatenate([IDS, IDS[::-1], IDS[:, ::-1]], axis=0)  # 6 examples
MIXED = np.array([0, 1, 2, 1, 0, 0], np.int32)
BANKED = ["lora", "dora", "ia3", "loha", "lokr", "vera"]  # every method that adapts a layer call


def named_adapters(cfg, params):
    """Three adapters of one config: two trained-looking ones and a fresh (identity) one."""
    fresh = jaxpeft.linen.init(cfg, LINEN, params, IDS, key=jax.random.key(1))
    return {"fr": perturb(fresh, seed=1), "de": perturb(fresh, seed=2), "base": fresh}


@jax.jit
def run(params, adapters, ids, adapter_ids=None):
    return jaxpeft.linen.apply(LINEN, {"params": params}, adapters, ids, adapter_ids=adapter_ids)


def close(x, y, tol=2e-5):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("method", BANKED)
def test_mixed_batch_equals_each_example_alone_linen(method, params):
    named = named_adapters(METHODS[method], params)
    bank = jaxpeft.stack_adapters(named)
    mixed = run(params, bank, BATCH, jnp.asarray(MIXED))
    for i, k in enumerate(MIXED):
        alone = run(params, named[NAMES[k]], BATCH[i : i + 1])
        close(mixed[i : i + 1], alone)


def test_switching_adapters_is_data_and_never_recompiles(params):
    cfg = METHODS["lora"]
    named = named_adapters(cfg, params)
    bank = jaxpeft.stack_adapters(named)
    base = run(params, {}, IDS)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def switched(adapters, adapter_ids):
        return jaxpeft.linen.apply(LINEN, {"params": params}, adapters, IDS, adapter_ids=adapter_ids)

    for name in NAMES:
        close(switched(bank, jaxpeft.adapter_ids(bank, name)), run(params, named[name], IDS))
    close(switched(bank, jaxpeft.adapter_ids(bank, "base")), base)  # a fresh adapter serves the base model


def test_nnx_mixed_batch_and_switch(params):
    cfg = METHODS["lora"]
    named = named_adapters(cfg, params)
    bank = jaxpeft.stack_adapters(named)
    model = jnnx.attach(nnx_model(params), bank)

    @nnx.jit
    def forward(m, ids):
        return m(ids)

    jnnx.set_adapter_ids(model, jaxpeft.adapter_ids(bank, [NAMES[k] for k in MIXED]))
    close(forward(model, BATCH), run(params, bank, BATCH, jnp.asarray(MIXED)))
    jnnx.set_adapter_ids(model, jaxpeft.adapter_ids(bank, "de"))
    close(forward(model, IDS), run(params, named["de"], IDS))
    close(jnnx.adapters_of(model)["out"]["kernel"].adapters.b, bank["out"]["kernel"].adapters.b, 0)


def test_training_a_bank_gives_each_adapter_only_its_examples_gradient(params):
    named = named_adapters(METHODS["lora"], params)
    bank = jaxpeft.stack_adapters(named)
    ids = np.array([0, 0, 1, 1, 0, 1], np.int32)

    def loss(adapters, x, adapter_ids=None):  # a sum over examples, so each example's term is its own
        return jnp.sum(run(params, adapters, x, adapter_ids) ** 2)

    grads = jax.grad(loss)(bank, BATCH, jnp.asarray(ids))
    g = grads["out"]["kernel"].adapters.b  # (3 adapters, r, vocab)
    assert np.abs(np.asarray(g[2])).max() == 0.0, "adapter 'base' got a gradient though no example used it"
    for k, name in enumerate(("fr", "de")):
        alone = jax.grad(loss)(named[name], BATCH[ids == k])
        close(g[k], alone["out"]["kernel"].b, 1e-4)
    tx = optax.adam(0.1)
    updates, _ = tx.update(grads, tx.init(bank), bank)
    new = optax.apply_updates(bank, updates)
    unused = new["out"]["kernel"].adapters.a[2], bank["out"]["kernel"].adapters.a[2]
    np.testing.assert_array_equal(np.asarray(unused[0]), np.asarray(unused[1]))


def test_stack_unstack_select_round_trip_and_lora_ranks_may_differ(params):
    small = jaxpeft.LoraConfig(rank=2, alpha=4, targets=r"(kernel|embedding)$")
    big = jaxpeft.LoraConfig(rank=4, alpha=2, targets=r"(kernel|embedding)$")
    a = perturb(jaxpeft.linen.init(small, LINEN, params, IDS, key=jax.random.key(1)), seed=4)
    b = perturb(jaxpeft.linen.init(big, LINEN, params, IDS, key=jax.random.key(2)), seed=5)
    bank = jaxpeft.stack_adapters({"a": a, "b": b})
    assert jaxpeft.bank_names(bank) == ("a", "b")
    close(run(params, bank, IDS, jaxpeft.adapter_ids(bank, "a")), run(params, a, IDS))
    close(run(params, bank, IDS, jaxpeft.adapter_ids(bank, "b")), run(params, b, IDS))
    back = jaxpeft.unstack_adapters(bank)
    close(run(params, back["a"], IDS), run(params, a, IDS))
    merged = jaxpeft.merge(params, jaxpeft.select_adapter(bank, "b"))
    close(jax.jit(LINEN.apply)({"params": merged}, IDS), run(params, b, IDS), 1e-4)


def test_bank_errors_name_the_fix(params):
    named = named_adapters(METHODS["lora"], params)
    bank = jaxpeft.stack_adapters(named)
    with pytest.raises(ValueError, match="needs `adapter_ids`"):
        run(params, bank, IDS)
    with pytest.raises(ValueError, match=r"ranges over \[0, 3\]; the bank holds 3 adapters"):
        jaxpeft.linen.apply(LINEN, {"params": params}, bank, IDS, adapter_ids=jnp.asarray([0, 3]))
    with pytest.raises(ValueError, match=r"one id per example .* shape \(2,\)"):
        jaxpeft.linen.apply(LINEN, {"params": params}, bank, IDS, adapter_ids=jnp.asarray([0, 1, 2]))
    with pytest.raises(ValueError, match=r"adapters \['xx'\] are not in the bank; it holds \['fr', 'de', 'base'\]"):
        jaxpeft.adapter_ids(bank, ["fr", "xx"])
    with pytest.raises(ValueError, match=r"holds names; pass integer ids: jaxpeft.adapter_ids\(bank, \['fr', 'de'\]\)"):
        jaxpeft.linen.apply(LINEN, {"params": params}, bank, IDS, adapter_ids=["fr", "de"])
    model = jnnx.attach(nnx_model(params), bank)
    with pytest.raises(ValueError, match=r"`ids`='fr' holds names"):
        jnnx.set_adapter_ids(model, "fr")
    with pytest.raises(ValueError, match=r"`ids` ranges over \[0, 5\]; the bank holds 3 adapters"):
        jnnx.set_adapter_ids(model, [0, 5])
    with pytest.raises(ValueError, match="the model holds no adapter bank; attach one first"):
        jnnx.set_adapter_ids(jnnx.attach(nnx_model(params), named["fr"]), 0)
    with pytest.raises(ValueError, match="holds no adapter bank"):
        run(params, named["fr"], IDS, jnp.asarray(0))
    with pytest.raises(jaxpeft.NotMergeableError, match="merge one of them"):
        jaxpeft.merge(params, bank)
    other = jaxpeft.linen.init(METHODS["ia3"], LINEN, params, IDS, key=jax.random.key(1))
    with pytest.raises(ValueError, match="adapt different paths"):
        jaxpeft.stack_adapters({"lora": named["fr"], "ia3": other})
    bitfit = jaxpeft.linen.init(METHODS["bitfit"], LINEN, params, IDS, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"is a LeafDelta \(a leaf or model-input adapter: .*switch trees instead"):
        jaxpeft.stack_adapters({"a": bitfit, "b": bitfit})
    loha = jaxpeft.linen.init(
        jaxpeft.LohaConfig(rank=2, alpha=4, targets=r"kernel$"), LINEN, params, IDS, key=jax.random.key(1)
    )
    loha4 = jaxpeft.linen.init(
        jaxpeft.LohaConfig(rank=4, alpha=4, targets=r"kernel$"), LINEN, params, IDS, key=jax.random.key(1)
    )
    with pytest.raises(ValueError, match=r"differ at 'conv/kernel'.*Make them with the same config"):
        jaxpeft.stack_adapters({"a": loha, "b": loha4})


# ----------------------------------------------------------------------------------------------- weighted combination


def _lora(rng, d_in, d_out, rank, scale):
    a = jnp.asarray(rng.standard_normal((d_in, rank)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((rank, d_out)), jnp.float32)
    return {"lin": {"kernel": jaxpeft.LoraWeights(a, b, scale, layout=jaxpeft.Layout())}}


def _delta(tree):
    node = tree["lin"]["kernel"]
    return np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64) * node.scale


def test_weighted_combinations_follow_their_formulas():
    rng = np.random.default_rng(0)
    x, y = _lora(rng, 6, 5, 2, 2.0), _lora(rng, 6, 5, 2, 0.5)
    z = _lora(rng, 6, 5, 3, 1.0)
    w = {"x": 0.7, "y": -0.4}
    target = 0.7 * _delta(x) - 0.4 * _delta(y)
    cat, cfg = jaxpeft.add_weighted_adapter({"x": x, "y": y}, w, combination="cat")
    close(_delta(cat), target, 1e-5)
    assert cat["lin"]["kernel"].rank == cfg.rank == 4 and cfg.alpha == 4.0 and cfg.scale_for("lin/kernel") == 1.0
    svd, cfg = jaxpeft.add_weighted_adapter({"x": x, "y": y}, w, combination="svd", rank=4)
    close(_delta(svd), target, 1e-4)  # rank 4 holds the whole update
    top2, _ = jaxpeft.add_weighted_adapter({"x": x, "y": y}, w, combination="svd")  # default: the largest rank, 2
    u, s, vh = np.linalg.svd(target)
    close(_delta(top2), (u[:, :2] * s[:2]) @ vh[:2], 1e-4)
    lin, _ = jaxpeft.add_weighted_adapter({"x": x, "y": y}, [0.7, -0.4], combination="linear")
    ax = np.sqrt(0.7 * 2.0) * np.asarray(x["lin"]["kernel"].a) - np.sqrt(0.4 * 0.5) * np.asarray(y["lin"]["kernel"].a)
    bx = np.sqrt(0.7 * 2.0) * np.asarray(x["lin"]["kernel"].b) + np.sqrt(0.4 * 0.5) * np.asarray(y["lin"]["kernel"].b)
    close(_delta(lin), ax @ bx, 1e-5)
    mixed, cfg = jaxpeft.add_weighted_adapter({"x": x, "z": z}, [1.0, 1.0], combination="cat")
    assert cfg.rank == 5
    close(_delta(mixed), _delta(x) + _delta(z), 1e-5)
    with pytest.raises(ValueError, match="combination='linear' needs adapters of one rank"):
        jaxpeft.add_weighted_adapter({"x": x, "z": z}, [1.0, 1.0], combination="linear")
    with pytest.raises(ValueError, match="`combination`='ties'"):
        jaxpeft.add_weighted_adapter({"x": x}, [1.0], combination="ties")
    with pytest.raises(ValueError, match="expected one weight per adapter"):
        jaxpeft.add_weighted_adapter({"x": x, "y": y}, {"x": 1.0})
    ia3 = {"lin": {"kernel": jaxpeft.IA3Weights(jnp.ones(5), False, layout=jaxpeft.Layout())}}
    with pytest.raises(ValueError, match="'i' at 'lin/kernel' is IA3Weights; add_weighted_adapter combines LoRA"):
        jaxpeft.add_weighted_adapter({"x": x, "i": ia3}, [1.0, 1.0])


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_combination_matches_hf_peft(combination):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(1)
    ours = {"x": _lora(rng, 6, 5, 2, 2.0), "y": _lora(rng, 6, 5, 2, 0.5)}
    model = torch.nn.Sequential()
    model.add_module("lin", torch.nn.Linear(6, 5))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"]), adapter_name="x")
    pm.add_adapter("y", peft.LoraConfig(r=2, lora_alpha=1, target_modules=["lin"]))
    layer = pm.base_model.model.lin
    for name, tree in ours.items():
        node = tree["lin"]["kernel"]
        layer.lora_A[name].weight.data = torch.tensor(np.asarray(node.a).T.copy())
        layer.lora_B[name].weight.data = torch.tensor(np.asarray(node.b).T.copy())
    pm.add_weighted_adapter(["x", "y"], [0.7, -0.4], "new", combination_type=combination)
    theirs = layer.get_delta_weight("new").detach().numpy().T
    combined, _ = jaxpeft.add_weighted_adapter(ours, [0.7, -0.4], combination=combination)
    close(_delta(combined), theirs, 1e-4)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_weighted_combination_returns_the_config_of_its_adapters(combination, use_rslora, tmp_path):
    """Whatever the inputs' ranks, alphas and rsLoRA, the returned config gives the new nodes' rank and scale (1), so
    the library's own checks accept the pair: a checkpoint saves it and HF export writes it. Cat and svd (at full
    rank) compute ``Σ wᵢ·ΔWᵢ``; linear computes HF's product of the weighted factor sums."""
    import jaxpeft.checkpoint
    import jaxpeft.hf

    base = {"lin": {"kernel": jnp.zeros((6, 5))}, "out": {"kernel": jnp.zeros((5, 4))}}
    targets = r"^(lin|out)/kernel$"
    x_cfg = jaxpeft.LoraConfig(rank=2, alpha=4.0, targets=targets, use_rslora=use_rslora)
    y_rank = 2 if combination == "linear" else 3
    y_cfg = jaxpeft.LoraConfig(rank=y_rank, alpha=1.0, targets=targets, use_rslora=use_rslora)
    named = {
        "x": perturb(jaxpeft.init(x_cfg, base, key=jax.random.key(0)), seed=1),
        "y": perturb(jaxpeft.init(y_cfg, base, key=jax.random.key(1)), seed=2),
    }
    ws = {"x": 0.7, "y": -0.4}
    new_rank = {"linear": 2, "cat": 2 + y_rank, "svd": 5}[combination]
    for given in (x_cfg, None):
        combined, cfg = jaxpeft.add_weighted_adapter(
            named, ws, combination=combination, rank=5 if combination == "svd" else None, cfg=given
        )
        with jaxpeft.checkpoint.AdapterCheckpointer(tmp_path / f"ckpt-{given is None}", cfg, base) as ckpt:
            assert ckpt.check(0, combined)
        jaxpeft.hf.export_adapters(tmp_path / f"hf-{given is None}", combined, cfg, base, lambda m: m.replace("/", "."))
        assert (cfg.rank, cfg.alpha, cfg.use_rslora) == (new_rank, float(new_rank), False)
        for path, node in jaxpeft.adapter_items(combined):
            assert node.rank == cfg.rank_for(path) == new_rank and node.scale == cfg.scale_for(path) == 1.0
            nodes = {n: dict(jaxpeft.adapter_items(t))[path] for n, t in named.items()}
            if combination == "linear":
                roots = {n: np.sqrt(abs(ws[n] * nd.scale)) for n, nd in nodes.items()}
                a = sum(np.sign(ws[n]) * roots[n] * np.asarray(nd.a, np.float64) for n, nd in nodes.items())
                b = sum(roots[n] * np.asarray(nd.b, np.float64) for n, nd in nodes.items())
                expected = a @ b
            else:  # svd at rank 5 >= min(fan_in, fan_out): the whole update
                expected = sum(ws[n] * np.asarray(nd.a, np.float64) @ nd.b * nd.scale for n, nd in nodes.items())
            close(np.asarray(node.a, np.float64) @ node.b * node.scale, expected, 1e-4)


# ----------------------------------------------------------------------------------------------- sets on disk


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="out")(jnp.tanh(nn.Dense(7, name="hid")(x)))


def _two_dense_set():
    model = TwoDense()
    x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 6)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    cfgs = {
        "fr": jaxpeft.LoraConfig(rank=2, alpha=4, targets=["hid", "out"]),
        "de": jaxpeft.LoraConfig(rank=3, alpha=3, targets=["hid", "out"]),
    }
    named = {
        n: perturb(jaxpeft.init(c, params, key=jax.random.key(i)), seed=i) for i, (n, c) in enumerate(cfgs.items())
    }
    return model, params, x, cfgs, named


def test_adapter_set_checkpoint_round_trip_keeps_names_order_and_values(tmp_path):
    from jaxpeft import adapter_sets

    _, params, _, cfgs, named = _two_dense_set()
    root = adapter_sets.save_adapter_set(tmp_path / "set", named, cfgs, params)
    back, configs = adapter_sets.restore_adapter_set(root, params)
    assert list(back) == ["fr", "de"] and configs == cfgs
    chex.assert_trees_all_equal(back, named)
    with pytest.raises(FileNotFoundError, match="is not an adapter set directory"):
        adapter_sets.restore_adapter_set(tmp_path / "set" / "fr", params)
    with pytest.raises(ValueError, match="cannot be a member directory"):
        adapter_sets.save_adapter_set(tmp_path / "x", {"a/b": named["fr"]}, cfgs["fr"], params)
    with pytest.raises(ValueError, match=r"one method config or one per adapter \['fr', 'de'\]"):
        adapter_sets.save_adapter_set(tmp_path / "y", named, {"fr": cfgs["fr"]}, params)
    with pytest.raises(ValueError, match=r"`step`=0 is already committed in the adapter set"):  # never overwritten
        adapter_sets.save_adapter_set(root, named, cfgs, params)


def test_adapter_set_hf_export_loads_in_peft_per_adapter(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from jaxpeft import adapter_sets

    model, params, x, cfgs, named = _two_dense_set()
    root = adapter_sets.export_adapter_set(tmp_path / "hf", named, cfgs, params, lambda m: m)
    back, configs = adapter_sets.import_adapter_set(root, params, lambda m: m)
    chex.assert_trees_all_close(back, named, atol=0)
    assert {n: (c.rank, c.alpha) for n, c in configs.items()} == {"fr": (2, 4.0), "de": (3, 3.0)}

    torch_model = torch.nn.Sequential()
    torch_model.add_module("hid", torch.nn.Linear(6, 7))
    torch_model.add_module("act", torch.nn.Tanh())
    torch_model.add_module("out", torch.nn.Linear(7, 5))
    for name in ("hid", "out"):
        layer = getattr(torch_model, name)
        layer.weight.data = torch.tensor(np.asarray(params[name]["kernel"]).T.copy())
        layer.bias.data = torch.tensor(np.asarray(params[name]["bias"]))
    pm = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "hf" / "fr"), adapter_name="fr")
    pm.load_adapter(str(tmp_path / "hf" / "de"), adapter_name="de")
    bank = jaxpeft.stack_adapters(back)
    ours = jaxpeft.linen.apply(
        model, {"params": params}, bank, jnp.tile(x, (2, 1)), adapter_ids=jnp.asarray([0] * 4 + [1] * 4)
    )
    for k, name in enumerate(("fr", "de")):
        pm.set_adapter(name)
        theirs = pm(torch.tensor(np.asarray(x))).detach().numpy()
        close(ours[4 * k : 4 * k + 4], theirs, 1e-5)


def test_sixteen_adapter_mixed_batch_costs_about_one_adapter_in_flops():
    """examples/benchmarks/train_step.py's ``mixed16`` against ``lora16`` (XLA cost analysis; 1.005 on ``tiny``)."""
    import dataclasses

    from examples.benchmarks.train_step import PRESETS, LlamaForCausalLM, compile_step

    shape = dataclasses.replace(
        PRESETS["tiny"], width=64, ffn=128, layers=2, heads=4, kv_heads=4, vocab=256, batch=2, seq=64, rank=4
    )
    model = LlamaForCausalLM(shape.llama())
    ids = jnp.zeros((shape.batch, shape.seq), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    flops = {}
    for mode in ("lora16", "mixed16"):
        cost = compile_step(mode, shape, params, ids)[0].cost_analysis()
        flops[mode] = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    assert flops["mixed16"] / flops["lora16"] <= 1.3, flops
