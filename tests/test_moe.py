"""Tests for the example Mixtral MoE decoder: transformers parity, LoRA/DoRA on expert weights (one adapter per
expert), merge exactness, train-step FLOPs, expert-axis sharding and HF PEFT ``target_parameters`` files both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

import jaxpeft
import jaxpeft.hf
import jaxpeft.linen
from examples.models import moe

TINY = moe.MoeConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=64,
)
#: Attention, router and both expert kernels.
TARGETS = ["q_proj", "v_proj", "gate", "gate_up_proj", "down_proj"]
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]


def _ids(batch: int = 2, seq: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, seq)).astype(np.int32)


def _random_params(config: moe.MoeConfig, seed: int = 0) -> dict[str, Any]:
    """Random params drawn with numpy (norm scales near 1, everything else N(0, 0.1))."""
    rng = np.random.default_rng(seed)
    flat = {
        path: jnp.asarray(((path[-1] == "scale") + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype))
        for path, leaf in traverse_util.flatten_dict(moe.abstract_params(config)).items()
    }
    return traverse_util.unflatten_dict(flat)


def _nonzero(adapters: Any, seed: int = 3) -> Any:
    leaves, treedef = jax.tree.flatten(adapters)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves])


@pytest.fixture(scope="module")
def tiny() -> tuple[moe.MoeForCausalLM, dict[str, Any], np.ndarray]:
    return moe.MoeForCausalLM(TINY), _random_params(TINY), _ids()


# ------------------------------------------------------------------------------------------------ the model


def test_config_round_trip_and_errors() -> None:
    d = TINY.to_hf_dict()
    assert d["num_local_experts"] == 4 and d["model_type"] == "mixtral"
    assert moe.MoeConfig.from_hf_dict(d) == TINY
    assert moe.MoeConfig.from_hf_dict(d, capacity_factor=1.5).capacity(10) == 8  # ceil(1.5 * 10 * 2 / 4)
    assert TINY.capacity(10) == 10
    with pytest.raises(ValueError, match=r"model_type='llama'; MoeConfig expects 'mixtral'"):
        moe.MoeConfig.from_hf_dict({**d, "model_type": "llama"})
    with pytest.raises(ValueError, match=r"sliding_window=4096; this Mixtral implements full causal attention"):
        moe.MoeConfig.from_hf_dict({**d, "sliding_window": 4096})
    with pytest.raises(ValueError, match=r"`num_experts_per_tok`=5 must be between 1 and `num_local_experts`=4"):
        moe.MoeConfig(num_local_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match=r"`capacity_factor`=0 must be positive"):
        moe.MoeConfig(capacity_factor=0)


def test_module_names_round_trip() -> None:
    name = moe.hf_module_name("model/layers/mlp/experts/gate_up_proj")
    assert name == "model.layers.{layer}.mlp.experts.gate_up_proj"
    assert moe.our_module_path("model.layers.1.mlp.experts.down_proj") == ("model/layers/mlp/experts/down_proj", 1)
    assert moe.our_module_path("lm_head") == ("lm_head", None)
    with pytest.raises(ValueError, match=r"is not a MoeForCausalLM path"):
        moe.hf_module_name("encoder/x")


def test_dispatch_drops_past_capacity() -> None:
    experts = jnp.asarray([[0, 1], [0, 2], [0, 1]])  # expert 0 gets three assignments
    slot, kept = moe.dispatch_slots(experts, 3, capacity=2)
    np.testing.assert_array_equal(np.asarray(kept), [True, True, True, True, False, True])
    np.testing.assert_array_equal(np.asarray(slot), [0, 2, 1, 4, 0, 3])


def test_capacity_drop_changes_output_and_dropless_does_not(tiny) -> None:
    model, params, ids = tiny
    full = model.apply({"params": params}, ids)
    big = moe.MoeForCausalLM(moe.MoeConfig(**{**TINY.__dict__, "capacity_factor": 2.0}))  # 14 slots >= 14 tokens
    np.testing.assert_allclose(big.apply({"params": params}, ids), full, atol=1e-6)
    small = moe.MoeForCausalLM(moe.MoeConfig(**{**TINY.__dict__, "capacity_factor": 0.5}))
    assert np.abs(np.asarray(small.apply({"params": params}, ids)) - np.asarray(full)).max() > 1e-3


def _torch_mixtral(directory: Path) -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.1 * torch.randn_like(param)
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def torch_pair(tmp_path_factory) -> tuple[Any, moe.MoeForCausalLM, dict[str, Any], Path]:
    directory = tmp_path_factory.mktemp("mixtral")
    torch_model = _torch_mixtral(directory)
    config, params = moe.load_hf_checkpoint(directory)
    assert config == TINY
    return torch_model, moe.MoeForCausalLM(config), params, directory


def _torch_logits(torch_model: Any, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch_model(torch.from_numpy(ids).long()).logits.numpy()


def test_matches_transformers_and_state_dict_round_trip(torch_pair, tmp_path: Path) -> None:
    import torch

    torch_model, model, params, directory = torch_pair
    assert any("block_sparse_moe.experts.0.w1" in k for k in _safetensors_keys(directory))  # the on-disk layout
    ids = _ids(3, 9, seed=1)
    expected = _torch_logits(torch_model, ids)
    got = np.asarray(model.apply({"params": params}, ids))
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # fused names load into torch exactly; the per-expert layout reads back through our loader
    state = {k: torch.from_numpy(v) for k, v in moe.to_hf_state_dict(params).items()}
    assert not torch_model.load_state_dict(state, strict=True).missing_keys
    save_file(moe.to_hf_state_dict(params), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    for per_expert in (False, True):
        save_file(moe.to_hf_state_dict(params, per_expert=per_expert), str(tmp_path / "model.safetensors"))
        _, again = moe.load_hf_checkpoint(tmp_path)
        jax.tree.map(np.testing.assert_array_equal, again, params)


def _safetensors_keys(directory: Path) -> list[str]:
    from safetensors.numpy import load_file

    return list(load_file(str(directory / "model.safetensors")))


def test_loader_errors(tmp_path: Path, tiny) -> None:
    _, params, _ = tiny
    tensors = moe.to_hf_state_dict(params)
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    kept = {k: v for k, v in tensors.items() if "layers.1.mlp.experts.down_proj" not in k}
    save_file(kept, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys: \['model.layers.1.mlp.experts.down_proj'\]"):
        moe.load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY.to_hf_dict(), "num_local_experts": 2}))
    save_file(tensors, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"check num_local_experts, hidden_size and intermediate_size"):
        moe.load_hf_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------ LoRA / DoRA


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_one_adapter_per_expert_identity_and_exact_merge(tiny, method: str) -> None:
    model, params, ids = tiny
    cls = jaxpeft.LoraConfig if method == "lora" else jaxpeft.DoraConfig
    cfg = cls(rank=2, alpha=4, targets=TARGETS)
    adapters = jaxpeft.linen.init(cfg, model, params, ids, key=jax.random.key(1))
    node = adapters["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
    # (layers, experts, in, r) and (layers, experts, r, out): one rank-r adapter per expert
    assert node.a.shape == (2, 4, 32, 2) and node.b.shape == (2, 4, 2, 48)
    assert node.layout == jaxpeft.Layout(stack=2, fan_in=1, fan_out=1, kind="einsum")
    base = np.asarray(model.apply({"params": params}, ids))
    at_init = np.asarray(jaxpeft.linen.apply(model, {"params": params}, adapters, ids))
    # LoRA's B = 0 adds an exact zero; DoRA rescales by magnitude / column norm (= 1 up to rounding)
    np.testing.assert_allclose(at_init, base, atol=0 if method == "lora" else 2e-6, rtol=0)

    trained = _nonzero(adapters)
    adapted = np.asarray(jaxpeft.linen.apply(model, {"params": params}, trained, ids))
    assert np.abs(adapted - base).max() > 1e-2
    merged = jaxpeft.merge(params, trained)
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, ids)), adapted, atol=2e-5, rtol=0)
    if method == "lora":  # (DoRA refuses unmerge by design: the norm it divided by is lost)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), jaxpeft.unmerge(merged, trained), params)

    if method == "lora":  # expert e's weight gets exactly its own adapter's update
        node = trained["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
        w0 = np.asarray(params["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"])
        w = np.asarray(merged["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"])
        expected = w0 + 2.0 * np.einsum("leir,lero->leio", np.asarray(node.a), np.asarray(node.b))
        np.testing.assert_allclose(w, expected, atol=1e-5)


def test_training_changes_only_adapters_and_every_expert_gets_a_gradient(tiny) -> None:
    model, params, ids = tiny
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=TARGETS)
    adapters = _nonzero(jaxpeft.linen.init(cfg, model, params, ids, key=jax.random.key(1)))

    def loss(ad: Any) -> jax.Array:
        logits = jaxpeft.linen.apply(model, {"params": params}, ad, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    grads = jax.jit(jax.grad(loss))(adapters)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert nbytes(grads) == nbytes(adapters)  # no gradient of a frozen weight
    g = grads["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
    # 14 tokens x 2 experts over 4 experts: every expert of every layer is hit, so every expert's A gets a gradient
    assert np.all(np.abs(np.asarray(g.a)).sum(axis=(2, 3)) > 0)


def _step_flops(model: moe.MoeForCausalLM, mode: str, ids: jax.ShapeDtypeStruct) -> float:
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    tx = optax.adamw(1e-4)

    def xent(logits: jax.Array, tokens: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    def flops(step: Any, *args: Any) -> float:
        return float(jax.jit(step).lower(*args).compile().cost_analysis()["flops"])

    if mode == "floor":  # only the norms trained: backward through every layer, no weight gradient
        train, frozen = jaxpeft.partition(params, jaxpeft.path_filter(r"norm/"))

        def floor_step(train: Any, frozen: Any, opt: Any, tokens: jax.Array) -> Any:
            grads = jax.grad(lambda t: xent(model.apply({"params": jaxpeft.combine(t, frozen)}, tokens), tokens))(train)
            updates, opt = tx.update(grads, opt, train)
            return optax.apply_updates(train, updates), opt

        return flops(floor_step, train, frozen, jax.eval_shape(tx.init, train), ids)
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", *TARGETS[2:]])
    layouts = jaxpeft.linen.infer_layouts(model, ids)
    adapters = jax.eval_shape(lambda p: jaxpeft.init(cfg, p, key=jax.random.key(1), layouts=layouts), params)

    def lora_step(adapters: Any, params: Any, opt: Any, tokens: jax.Array) -> Any:
        grads = jax.grad(lambda a: xent(jaxpeft.linen.apply(model, {"params": params}, a, tokens), tokens))(adapters)
        updates, opt = tx.update(grads, opt, adapters)
        return optax.apply_updates(adapters, updates), opt

    return flops(lora_step, adapters, params, jax.eval_shape(tx.init, adapters), ids)


def test_lora_step_flops_within_5_percent_of_the_frozen_floor() -> None:
    """LoRA on attention, router and every expert: no expert-weight gradient is formed (ratio measured ~1.0)."""
    config = moe.MoeConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    model = moe.MoeForCausalLM(config)
    ids = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    floor, lora = _step_flops(model, "floor", ids), _step_flops(model, "lora", ids)
    print(f"moe lora/floor FLOPs: {lora:.4g} / {floor:.4g} = {lora / floor:.4f}")
    assert lora / floor <= 1.05


# ------------------------------------------------------------------------------------------------ HF PEFT files


def _fresh_torch(directory: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.MixtralForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def test_export_expert_lora_loads_in_peft(torch_pair, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    _, model, params, directory = torch_pair
    ids = _ids(2, 9, seed=2)
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=TARGETS)
    adapters = _nonzero(jaxpeft.linen.init(cfg, model, params, ids, key=jax.random.key(1)))
    out = tmp_path / "adapter"
    jaxpeft.hf.export_adapters(
        out, adapters, cfg, params, moe.hf_module_name, parameter_order=moe.PARAMETER_ORDER, task_type="CAUSAL_LM"
    )
    written = json.loads((out / "adapter_config.json").read_text())
    assert sorted(written["target_parameters"]) == ["down_proj", "gate_up_proj"]
    assert sorted(written["target_modules"]) == ["gate", "q_proj", "v_proj"]
    peft_model = peft.PeftModel.from_pretrained(_fresh_torch(directory), out).eval()
    expected = _torch_logits(peft_model, ids)
    got = np.asarray(jaxpeft.linen.apply(model, {"params": params}, adapters, ids))
    assert np.abs(got - np.asarray(model.apply({"params": params}, ids))).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    # and back: the file imports to the same adapters (the nesting resolved by shapes, or by the given order)
    for order in (None, moe.PARAMETER_ORDER):
        cfg2, back = jaxpeft.hf.import_adapters(out, params, moe.hf_module_name, parameter_order=order)
        assert cfg2.rank == 2 and cfg2.alpha == 4
        jax.tree.map(np.testing.assert_array_equal, back, adapters)


# PEFT checks pattern keys against module names only, then applies them to the parameters too (asserted below)
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning")
def test_import_peft_made_target_parameters_adapter(torch_pair, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    _, model, params, directory = torch_pair
    config = peft.LoraConfig(
        r=3,
        lora_alpha=5,
        target_modules=["k_proj", "o_proj", "gate"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"down_proj": 2},
    )
    peft_model = peft.get_peft_model(_fresh_torch(directory), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # random non-zero A and B
                param.copy_(0.2 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path)
    ids = _ids(2, 9, seed=3)
    expected = _torch_logits(peft_model, ids)

    _, adapters = jaxpeft.hf.import_adapters(tmp_path, params, moe.hf_module_name)
    node = adapters["model"]["layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    assert node.a.shape == (2, 4, 24, 2) and node.b.shape == (2, 4, 2, 32)  # rank_pattern applied per parameter
    got = np.asarray(jaxpeft.linen.apply(model, {"params": params}, adapters, ids))
    assert np.abs(expected - np.asarray(model.apply({"params": params}, ids))).max() > 1e-2
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    merged = jaxpeft.merge(params, adapters)  # the merged experts compute PEFT's logits too
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, ids)), expected, atol=1e-5, rtol=0)


def test_expert_export_refusals(tiny, tmp_path: Path) -> None:
    model, params, ids = tiny
    lora = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["gate_up_proj", "down_proj"])
    adapters = jaxpeft.linen.init(lora, model, params, ids, key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"Pass `parameter_order` with that order.*moe.PARAMETER_ORDER"):
        jaxpeft.hf.to_state_dict(adapters, lora, params, moe.hf_module_name)
    with pytest.raises(ValueError, match=r"`parameter_order`=\('gate_up_proj',\) does not list \['down_proj'\]"):
        jaxpeft.hf.to_state_dict(adapters, lora, params, moe.hf_module_name, parameter_order=("gate_up_proj",))
    # one parameter per module needs no order; only target_parameters then (no target_modules)
    only = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["down_proj"])
    one = jaxpeft.linen.init(only, model, params, ids, key=jax.random.key(1))
    config, tensors = jaxpeft.hf.to_state_dict(one, only, params, moe.hf_module_name)
    assert config["target_modules"] is None and config["target_parameters"] == ["down_proj"]
    assert sorted(tensors)[:2] == [
        "base_model.model.model.layers.0.mlp.experts.lora_A.weight",
        "base_model.model.model.layers.0.mlp.experts.lora_B.weight",
    ]
    _, back = jaxpeft.hf.from_state_dict(config, tensors, params, moe.hf_module_name)
    jax.tree.map(np.testing.assert_array_equal, back, one)
    dora = jaxpeft.DoraConfig(rank=2, alpha=4, targets=["down_proj"])
    with pytest.raises(ValueError, match=r"PEFT's ParamWrapper refuses use_dora"):
        jaxpeft.hf.to_state_dict(
            jaxpeft.linen.init(dora, model, params, ids, key=jax.random.key(1)), dora, params, moe.hf_module_name
        )
    dropout = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["down_proj"], dropout=0.1)
    with pytest.raises(ValueError, match=r"PEFT's ParamWrapper refuses any lora_dropout"):
        jaxpeft.hf.to_state_dict(
            jaxpeft.linen.init(dropout, model, params, ids, key=jax.random.key(1)), dropout, params, moe.hf_module_name
        )
    with pytest.raises(ValueError, match=r"sets `target_parameters`=\['w9'\], but that selects no parameter"):
        jaxpeft.hf.from_state_dict({**config, "target_parameters": ["w9"]}, tensors, params, moe.hf_module_name)
    with pytest.raises(ValueError, match=r"sets `target_parameters` with use_dora=true, which PEFT's ParamWrapper"):
        jaxpeft.hf.from_state_dict({**config, "use_dora": True}, tensors, params, moe.hf_module_name)


# ------------------------------------------------------------------------------------------------ expert sharding


def test_lora_steps_with_experts_sharded_on_an_expert_mesh_axis_equal_one_device() -> None:
    """8 CPU devices in a subprocess (tests/_moe_mesh_worker.py): kernels and adapters split along `expert`."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    worker = Path(__file__).with_name("_moe_mesh_worker.py")
    proc = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kernel"] == "P(None, 'expert', None, None)" and out["kernel_shard"] == [2, 1, 32, 48]
    # each expert's A and B live with its kernel: one expert per device of the `expert` axis
    assert out["a_b"] == ["P(None, 'expert', None, None)", "P(None, 'expert', None, None)"]
    assert out["a_shard"] == [2, 1, 32, 2]
    assert out["losses"][1] < out["losses"][0]  # it trains
    assert out["loss_diff"] < 1e-5 and out["adapter_diff"] < 1e-4, out
