"""HF PEFT files, one suite over every codec: the built-in methods of the registry, and HRA from tests/_hra.py.

For each method, on a tiny torch Llama and our Flax Llama with the same weights:

- its exported files load in PEFT (``PeftModel.from_pretrained``) with equal logits, and import back;
- files PEFT made itself (its own init and random generator: VeRA's projections too) import with equal logits;
- config and arrays round-trip exactly through the files, and the config through JSON;
- the codec's field table classifies exactly the fields of PEFT's config class: a PEFT with new fields fails here.

A new built-in method is covered by adding one config to ``CASES`` (``test_every_codec_has_a_case`` insists).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
import jaxpeft.hf as hf
import jaxpeft.linen
from examples.models import llama
from jaxpeft.methods.registry import BUILTIN
from tests._hra import HRAConfig
from tests._tiny_llama import tiny_llama_pair

pytestmark = [
    # Notices from transformers/peft themselves (PEFT's save_pretrained probes a deprecated transformers API; PEFT's
    # prompt learning and VeRA warn about their own defaults); nothing of jaxpeft's.
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"),
]
TOL = 1e-4
IDS = np.random.default_rng(0).integers(1, 60, (2, 9)).astype(np.int32)
MASK = np.ones((2, 9), np.int32)
MASK[1, :2] = 0  # left padding in the second row
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
N = 3  # virtual tokens
#: One config per codec (and a few variants), over the tiny Llama.
CASES: dict[str, jaxpeft.MethodConfig] = {
    "lora": jaxpeft.LoraConfig(rank=4, alpha=6, targets=TARGETS, rank_pattern={"down_proj": 2}),
    "dora": jaxpeft.DoraConfig(rank=4, alpha=6, targets=TARGETS),
    "lora_fa": jaxpeft.LoraFAConfig(rank=4, alpha=8, targets=TARGETS),
    "ia3": jaxpeft.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
    "loha": jaxpeft.LohaConfig(rank=4, alpha=6, targets=TARGETS, rank_pattern={"down_proj": 2}),
    "lokr": jaxpeft.LokrConfig(rank=2, alpha=3, targets=TARGETS, decompose_both=True, alpha_pattern={"up": 5}),
    "vera": jaxpeft.VeraConfig(rank=8, targets=TARGETS, projection_prng_key=5, d_initial=0.3),
    "ln_tuning": jaxpeft.LNTuningConfig(),
    "prompt_tuning": jaxpeft.PromptTuningConfig(N),
    "prompt_text": jaxpeft.PromptTuningConfig(N, init="text", init_token_ids=(5, 9)),
    "prefix_tuning": jaxpeft.PrefixTuningConfig(N, 2, 2, 8),
    "prefix_proj": jaxpeft.PrefixTuningConfig(N, 2, 2, 8, prefix_projection=True, encoder_hidden_size=24),
    "hra": HRAConfig(rank=2, targets=["q_proj", "v_proj", "up_proj"]),
}
#: The cases PEFT can make itself from our exported config (variants of the same format are left out).
PEFT_MADE = ["lora", "dora", "ia3", "loha", "lokr", "vera", "ln_tuning", "prompt_tuning", "prefix_tuning", "hra"]
#: Configs an import is told about (a method of one's own; LoRA-FA, whose files are PEFT's plain LoRA files).
CONFIGS = (HRAConfig,)


def test_every_codec_has_a_case():
    codecs = {id(c.codec) for c in BUILTIN if c.codec is not None}
    covered = {id(type(cfg).codec) for cfg in CASES.values()}
    assert codecs <= covered, "add a config of the new method to CASES"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    pytest.importorskip("peft")
    torch_model, model, params = tiny_llama_pair(tmp_path_factory.mktemp("llama"))
    return torch_model, model, params, jaxpeft.linen.infer_layouts(model, jnp.asarray(IDS))


def _random(cfg: Any, params: Any, layouts: Any, seed: int) -> Any:
    """Adapters of ``cfg`` with every trainable array random, as after training (frozen fields as made)."""
    _, adapters = jaxpeft.init_adjusted(cfg, params, key=jax.random.key(0), layouts=layouts)
    trainable, frozen = jaxpeft.partition(adapters, True)
    rng = np.random.default_rng(seed)
    trained = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.3), trainable)
    return jaxpeft.combine(trained, frozen)


def _logits(model: Any, params: Any, adapters: Any, cfg: Any) -> jax.Array:
    """Our logits over the real tokens (the model's prompt/prefix hook for prompt learning)."""
    ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)
    if isinstance(cfg, jaxpeft.PromptTuningConfig):
        return model.apply({"params": params}, ids, mask, prompt=adapters)
    if isinstance(cfg, jaxpeft.PrefixTuningConfig):
        return model.apply({"params": params}, ids, mask, prefix=jaxpeft.prefix_kv(adapters, ids.shape[0]))
    return jaxpeft.linen.apply(model, {"params": params}, adapters, ids, mask)


def _ours(model: Any, params: Any, adapters: Any, cfg: Any) -> np.ndarray:
    return np.asarray(_logits(model, params, adapters, cfg), np.float32)


def _theirs(peft_model: Any, cfg: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = peft_model(input_ids=torch.tensor(IDS.astype(np.int64)), attention_mask=torch.tensor(MASK))
    logits = out.logits.numpy()
    return logits[:, N:] if isinstance(cfg, jaxpeft.PromptTuningConfig) else logits  # PEFT returns the virtual rows


def _plain(model: Any, params: Any) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK)), np.float32)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


def _static(node: Any) -> dict[str, Any]:
    return {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.metadata.get("static")}


def _assert_same_adapters(a: Any, b: Any, atol: float = 0.0) -> None:
    """Same paths, node types and static parts (scales to 1e-9), arrays bit for bit (or to ``atol``)."""
    na, nb = dict(jaxpeft.adapter_items(a)), dict(jaxpeft.adapter_items(b))
    assert na.keys() == nb.keys()
    for k in na:
        assert type(na[k]) is type(nb[k]), k
        sa, sb = _static(na[k]), _static(nb[k])
        assert sa.pop("scale", 1.0) == pytest.approx(sb.pop("scale", 1.0), rel=1e-9), k
        assert sa == sb, k
        for x, y in zip(jax.tree.leaves(na[k]), jax.tree.leaves(nb[k]), strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=k)


def _export(directory: Any, adapters: Any, cfg: Any, params: Any, layouts: Any) -> None:
    modules = type(cfg).codec.modules
    hf.export_adapters(
        directory,
        adapters,
        cfg,
        params,
        llama.hf_module_name,
        layouts=layouts if modules else None,
        task_type="CAUSAL_LM",
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_exported_files_load_in_peft_with_equal_logits(pair, name, tmp_path):
    import peft

    torch_model, model, params, layouts = pair
    cfg = CASES[name]
    adapters = _random(cfg, params, layouts, seed=3)
    ours = _ours(model, params, adapters, cfg)
    _export(tmp_path, adapters, cfg, params, layouts)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
    theirs = _theirs(loaded, cfg)
    diff, moved = _diff(ours, theirs), _diff(ours, _plain(model, params))
    print(f"JAX -> PEFT {name}: max |logit diff| {diff:.2e} (the adapter moved the logits by {moved:.2f})")
    assert moved > 1e-2 and diff < TOL
    cfg2, back = hf.import_adapters(tmp_path, params, llama.hf_module_name, layouts=layouts, configs=CONFIGS)
    assert _diff(_ours(model, params, back, cfg2), ours) < 1e-5


def _peft_model(torch_model: Any, directory: Any, seed: int) -> Any:
    """PEFT's own model for the config PEFT reads from ``directory``, every adapter weight random (PEFT's
    random-generator-made buffers, such as VeRA's projections, kept as PEFT made them)."""
    import peft
    import torch

    torch.manual_seed(seed)
    peft_cfg = peft.PeftConfig.from_pretrained(directory)
    peft_model = peft.get_peft_model(copy.deepcopy(torch_model), peft_cfg)
    state = peft.get_peft_model_state_dict(peft_model)
    fresh = {k: v if k.endswith(("vera_A", "vera_B")) else torch.randn_like(v) * 0.3 for k, v in state.items()}
    peft.set_peft_model_state_dict(peft_model, fresh)
    return peft_model.eval()


@pytest.mark.parametrize("name", PEFT_MADE)
def test_peft_made_files_import_with_equal_logits(pair, name, tmp_path):
    torch_model, model, params, layouts = pair
    cfg = CASES[name]
    _export(tmp_path / "ours", _random(cfg, params, layouts, seed=1), cfg, params, layouts)  # PEFT's config from it
    peft_model = _peft_model(torch_model, tmp_path / "ours", seed=7)
    theirs = _theirs(peft_model, cfg)
    peft_model.save_pretrained(tmp_path / "peft")
    cfg2, adapters = hf.import_adapters(
        tmp_path / "peft", params, llama.hf_module_name, layouts=layouts, configs=CONFIGS
    )
    ours = _ours(model, params, adapters, cfg2)
    diff, moved = _diff(ours, theirs), _diff(theirs, _plain(model, params))
    print(f"PEFT -> JAX {name}: max |logit diff| {diff:.2e} (the adapter moved the logits by {moved:.2f})")
    assert moved > 1e-2 and diff < TOL
    assert jaxpeft.plan(cfg2, params, layouts=layouts).n_params == sum(x.size for x in jax.tree.leaves(adapters))


def test_peft_made_vera_keeps_its_projections_frozen(pair, tmp_path):
    """PEFT's VeRA projections come from torch's random generator: imported as frozen arrays, never trained."""
    torch_model, model, params, layouts = pair
    cfg = CASES["vera"]
    _export(tmp_path / "ours", _random(cfg, params, layouts, seed=1), cfg, params, layouts)
    _peft_model(torch_model, tmp_path / "ours", seed=7).save_pretrained(tmp_path / "peft")
    cfg2, adapters = hf.import_adapters(tmp_path / "peft", params, llama.hf_module_name, layouts=layouts)
    assert cfg2.store_projections and jaxpeft.VeraConfig.from_json(cfg2.to_json()) == cfg2
    trainable, frozen = jaxpeft.partition(adapters, True)
    node = next(n for _, n in jaxpeft.adapter_items(frozen))
    assert node.proj_a is not None and node.lambda_d is None  # projections frozen, vectors trainable
    grads = jax.grad(lambda t: jnp.sum(_logits(model, params, jaxpeft.combine(t, frozen), cfg2) ** 2))(trainable)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    # and it exports back to the same shared matrices PEFT wrote
    _, tensors = hf.to_state_dict(adapters, cfg2, params, llama.hf_module_name, layouts=layouts)
    from safetensors.numpy import load_file

    saved = load_file(tmp_path / "peft" / hf.WEIGHTS_NAME)
    for key in ("base_model.vera_A", "base_model.vera_B"):
        np.testing.assert_allclose(tensors[key], saved[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_files_and_json_round_trip_exactly(pair, name):
    _, _, params, layouts = pair
    cfg = CASES[name]
    adapters = _random(cfg, params, layouts, seed=5)
    modules = type(cfg).codec.modules
    fn = llama.hf_module_name
    config, tensors = hf.to_state_dict(adapters, cfg, params, fn, layouts=layouts if modules else None)
    assert json.loads(json.dumps(config)) == config  # what the file holds
    assert config["peft_type"] == type(cfg).codec.peft_type
    configs = (*CONFIGS, type(cfg))  # LoRA-FA files are PEFT's LoRA files: name the method to get it back
    cfg2, back = hf.from_state_dict(config, tensors, params, fn, layouts=layouts, configs=configs)
    if name in ("prompt_text", "prefix_proj"):  # PEFT keeps neither the text init nor the projection MLP
        assert type(cfg2) is type(cfg)
    else:
        assert cfg2 == jaxpeft.config_from_dict(json.loads(cfg2.to_json()), configs=configs)
        # LN tuning's file holds base + delta (PEFT saves the tuned norms): the delta comes back up to one rounding
        _assert_same_adapters(adapters, back, atol=1e-6 if name == "ln_tuning" else 0.0)
        plan = jaxpeft.plan(cfg2, params, layouts=layouts)
        assert [t.path for t in plan.targets] == [p for p, _ in jaxpeft.adapter_items(back)]
    assert jaxpeft.config_from_dict(json.loads(cfg.to_json()), configs=CONFIGS) == cfg


@pytest.mark.parametrize("name", sorted({type(c).codec.peft_config: n for n, c in CASES.items()}.values()))
def test_field_table_is_exactly_pefts(name):
    """Every field of PEFT's config class is classified (supported, harmless or refused), and no other: a PEFT
    version with new fields fails here until they are classified beside the method."""
    peft = pytest.importorskip("peft")
    codec = type(CASES[name]).codec
    fields = {f.name for f in dataclasses.fields(getattr(peft, codec.peft_config))}
    assert not fields - codec.fields.known, f"classify PEFT {peft.__version__}'s new {codec.peft_config} fields"
    assert not codec.fields.known - fields, f"fields PEFT's {codec.peft_config} no longer has"
    supported, harmless, refused = set(codec.fields.supported), set(codec.fields.harmless), set(codec.fields.refused)
    assert not (supported & harmless or supported & refused or harmless & refused), "a field in two classes"


def test_an_import_picks_the_codec_that_accepts_the_file(pair):
    """LoRA, DoRA and LoRA-FA share PEFT's LORA format: DoRA's files go to DoRA, plain ones to LoRA unless the
    caller names LoRA-FA; a peft_type nobody reads is refused with the fix."""
    _, _, params, layouts = pair
    adapters = _random(CASES["lora_fa"], params, layouts, seed=2)
    config, tensors = hf.to_state_dict(adapters, CASES["lora_fa"], params, llama.hf_module_name, layouts=layouts)
    cfg, _ = hf.from_state_dict(config, tensors, params, llama.hf_module_name, layouts=layouts)
    assert type(cfg) is jaxpeft.LoraConfig
    cfg, back = hf.from_state_dict(
        config, tensors, params, llama.hf_module_name, layouts=layouts, configs=(jaxpeft.LoraFAConfig,)
    )
    assert type(cfg) is jaxpeft.LoraFAConfig
    _assert_same_adapters(adapters, back)
    with pytest.raises(ValueError, match=r"`peft_type`='HRA'; jaxpeft.hf imports .* configs=\(MyConfig,\)"):
        hf.from_state_dict({**config, "peft_type": "HRA"}, tensors, params, llama.hf_module_name)
    with pytest.raises(TypeError, match=r"`configs` entry .* is not a method config class"):
        hf.from_state_dict(config, tensors, params, llama.hf_module_name, configs=(dict,))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- every layer kind


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _=None):
        return h + nn.Dense(8, name="up")(h), None


class Zoo(nn.Module):
    """Embed, DenseGeneral with two fan-out and two fan-in axes, a Dense, a scanned Dense, an Einsum and a Conv."""

    @nn.compact
    def __call__(self, ids, img):
        h = nn.Embed(10, 8, name="embed")(ids)
        h = nn.DenseGeneral((2, 4), name="split")(h)
        h = nn.DenseGeneral(12, axis=(-2, -1), name="merge")(h)
        h = nn.Dense(8, name="narrow")(h)
        h, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(name="layers")(h)
        h = nn.Einsum((8, 2, 4), "btd,dhk->bthk", name="heads")(h)
        return h, nn.Conv(3, (3, 3), name="conv")(img)


ALL_KINDS = ["embed", "split", "merge", "narrow", "up", "heads", "conv"]
#: Each codec on every layer kind its method adapts (a scanned stack included).
ZOO = {
    "lora": (jaxpeft.LoraConfig(rank=2, alpha=6, targets=ALL_KINDS), {}),
    "dora": (jaxpeft.DoraConfig(rank=2, alpha=6, targets=ALL_KINDS, dropout=0.1), {"ensure_weight_tying": False}),
    "lora_fa": (jaxpeft.LoraFAConfig(rank=2, alpha=4, targets=ALL_KINDS), {}),
    "ia3": (jaxpeft.IA3Config(targets=ALL_KINDS[1:], feedforward=["merge", "heads", "conv"]), {}),
    "loha": (jaxpeft.LohaConfig(rank=2, alpha=5, targets=["split", "merge", "up", "heads", "conv"]), {}),
    "lokr": (jaxpeft.LokrConfig(rank=1, alpha=2, targets=["split", "merge", "narrow", "up", "heads"]), {}),
    "lokr_both": (jaxpeft.LokrConfig(rank=1, targets=["merge", "up"], decompose_both=True, decompose_factor=2), {}),
    "vera": (jaxpeft.VeraConfig(rank=4, targets=["split", "merge", "narrow", "up", "heads"], dropout=0.1), {}),
    "vera_stored": (jaxpeft.VeraConfig(rank=4, targets=["merge", "up", "heads"], store_projections=True), {}),
    "hra": (HRAConfig(rank=2, targets=["narrow", "up"]), {}),
}


@pytest.fixture(scope="module")
def zoo():
    model = Zoo()
    ids, img = jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 5, 5, 2))
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, img)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.3), shapes)
    return model, params, jaxpeft.linen.infer_layouts(model, ids, img), (ids, img)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_layer_kind_round_trips_exactly(zoo, name, tmp_path):
    model, params, layouts, args = zoo
    cfg, options = ZOO[name]
    fn = hf.module_name_map(stacked="layers")
    adapters = _random(cfg, params, layouts, seed=2)
    hf.export_adapters(tmp_path, adapters, cfg, params, fn, layouts=layouts, **options)
    configs = (type(cfg),) if name == "lora_fa" else CONFIGS
    cfg2, back = hf.import_adapters(tmp_path, params, fn, layouts=layouts, configs=configs)
    assert type(cfg2) is type(cfg)  # its targets are the exact imported paths, its patterns their ranks
    if name == "vera_stored":  # the file's projections are jaxpeft's own: imported compact, regenerated
        assert not cfg2.store_projections
    else:
        _assert_same_adapters(adapters, back)
    y0 = jaxpeft.linen.apply(model, {"params": params}, adapters, *args)
    y1 = jaxpeft.linen.apply(model, {"params": params}, back, *args)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-6), y0, y1)
    # the imported config reproduces the adapters' shapes and static parts (checkpoints restore against it)
    planned = {t.path: t.node for t in jaxpeft.plan(cfg2, params, layouts=layouts).targets}
    for path, node in jaxpeft.adapter_items(back):
        assert _static(planned[path]) == _static(node), path
        assert jax.tree.map(lambda x: x.shape, planned[path]) == jax.tree.map(lambda x: x.shape, node), path


def test_transposed_views_are_written_in_their_logical_order():
    """safetensors writes an array's buffer as it lies in memory; a codec may hand over a transposed view."""
    from safetensors.numpy import load

    from jaxpeft.hf import _files

    view = np.arange(6, dtype=np.float32).reshape(2, 3).T
    data = _files.serialise({"peft_type": "LORA"}, {"t": view})
    np.testing.assert_array_equal(load(data[hf.WEIGHTS_NAME])["t"], view)
