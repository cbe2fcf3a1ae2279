"""Tests for the example Llama and BERT models: name mapping, safetensors loading, transformers parity."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from examples.models import bert, llama

LLAMA_TINY = llama.LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
BERT_TINY = bert.BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small enough that all three frequency bands occur with head_dim 16 and theta 10000.
    "original_max_position_embeddings": 64,
}


def _replace(config: Any, **changes: Any) -> Any:
    return type(config)(**{**config.__dict__, **changes})


def _random_params(abstract: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Random params of the given structure (norm scales near 1, everything else near 0).

    Drawn with numpy rather than ``model.init``: with few CPU cores, compiling JAX's per-shape random
    initializers takes seconds.
    """
    rng = np.random.default_rng(seed)
    flat = {
        path: jnp.asarray(((path[-1] == "scale") + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype))
        for path, leaf in traverse_util.flatten_dict(abstract).items()
    }
    return traverse_util.unflatten_dict(flat)


def _write_checkpoint(directory: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _assert_trees_equal(a: Any, b: Any) -> None:
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert sorted(flat_a) == sorted(flat_b)
    for path, value in flat_a.items():
        assert value.dtype == flat_b[path].dtype, path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]), err_msg=str(path))


def _ids(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, (batch, seq)).astype(np.int32)


# --------------------------------------------------------------------------------------------- name mapping


def test_llama_module_names_round_trip() -> None:
    assert llama.hf_module_name("model/layers/self_attn/q_proj") == "model.layers.{layer}.self_attn.q_proj"
    assert llama.hf_module_name("model/embed_tokens") == "model.embed_tokens"
    assert llama.hf_module_name("lm_head") == "lm_head"
    assert llama.our_module_path("model.layers.3.mlp.down_proj") == ("model/layers/mlp/down_proj", 3)
    assert llama.our_module_path("model.norm") == ("model/norm", None)
    params = llama.abstract_params(LLAMA_TINY)
    paths = {"/".join(path[:-1]) for path in traverse_util.flatten_dict(params)}
    assert "model/layers/self_attn/q_proj" in paths and "lm_head" in paths
    for path in paths:
        template = llama.hf_module_name(path)
        assert llama.our_module_path(template) == (path, None)
        if "{layer}" in template:
            assert llama.our_module_path(template.replace("{layer}", "1")) == (path, 1)


def test_llama_module_name_errors() -> None:
    with pytest.raises(ValueError, match=r"'encoder/x' is not a LlamaForCausalLM path"):
        llama.hf_module_name("encoder/x")
    with pytest.raises(ValueError, match="without a layer index"):
        llama.our_module_path("model.layers.mlp")


def test_bert_module_names_round_trip() -> None:
    assert bert.hf_module_name("encoder/layer_3/attention/self/query") == "encoder.layer.3.attention.self.query"
    assert bert.hf_module_name("pooler/dense", prefix="bert.") == "bert.pooler.dense"
    assert bert.hf_module_name("bert/encoder/layer_0/output/LayerNorm") == "bert.encoder.layer.0.output.LayerNorm"
    assert bert.our_module_path("encoder.layer.11.intermediate.dense") == (
        "encoder/layer_11/intermediate/dense",
        None,
    )
    assert bert.our_module_path("bert.embeddings.LayerNorm", prefix="bert.") == ("embeddings/LayerNorm", None)
    for with_classifier in (False, True):
        params = bert.abstract_params(BERT_TINY, with_classifier=with_classifier)
        for path in {"/".join(p[:-1]) for p in traverse_util.flatten_dict(params)}:
            assert bert.our_module_path(bert.hf_module_name(path)) == (path, None)
            assert bert.our_module_path(bert.hf_module_name(path, "bert."), "bert.") == (path, None)


def test_bert_module_name_errors() -> None:
    with pytest.raises(ValueError, match="expected 'layer_N' after 'encoder'"):
        bert.hf_module_name("encoder/block_0/output")
    with pytest.raises(ValueError, match=r"does not start with prefix 'bert\.'"):
        bert.our_module_path("encoder.layer.0.output", prefix="bert.")
    with pytest.raises(ValueError, match=r"expected 'encoder\.layer\.N'"):
        bert.our_module_path("encoder.layer.output")


# --------------------------------------------------------------------------------------- config handling


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE])
def test_llama_config_hf_dict_round_trip(rope: dict[str, Any] | None) -> None:
    config = LLAMA_TINY
    if rope is not None:
        config = llama.LlamaConfig.from_hf_dict({**LLAMA_TINY.to_hf_dict(), "rope_parameters": rope})
        assert config.rope_type == "llama3" and config.rope_factor == 8.0
    assert llama.LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
    # transformers 4 layout: rope_theta and rope_scaling at the top level.
    legacy = {k: v for k, v in config.to_hf_dict().items() if k != "rope_parameters"}
    assert llama.LlamaConfig.from_hf_dict(legacy) == config
    assert llama.LlamaConfig.from_hf_dict(config.to_hf_dict(), dtype="bfloat16").dtype == "bfloat16"


def test_bert_config_hf_dict_round_trip() -> None:
    assert bert.BertConfig.from_hf_dict(BERT_TINY.to_hf_dict()) == BERT_TINY
    assert bert.BertConfig.from_hf_dict({**BERT_TINY.to_hf_dict(), "id2label": {"0": "a"}}).num_labels == 1


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="model_type='mistral'; LlamaConfig expects 'llama'"):
        llama.LlamaConfig.from_hf_dict({**LLAMA_TINY.to_hf_dict(), "model_type": "mistral"})
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        llama.LlamaConfig.from_hf_dict({**LLAMA_TINY.to_hf_dict(), "rope_parameters": {"rope_type": "yarn"}})
    with pytest.raises(ValueError, match="num_attention_heads=4 must be a multiple of num_key_value_heads=3"):
        _replace(LLAMA_TINY, num_key_value_heads=3)
    with pytest.raises(ValueError, match="param_dtype='int8' must be a floating point dtype"):
        _replace(LLAMA_TINY, param_dtype="int8")
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        bert.BertConfig.from_hf_dict({**BERT_TINY.to_hf_dict(), "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="hidden_act='tanh' is not supported"):
        _replace(BERT_TINY, hidden_act="tanh")


# -------------------------------------------------------------------------------- safetensors round trips


@pytest.mark.parametrize("tied", [False, True])
def test_llama_safetensors_round_trip(tmp_path: Path, tied: bool) -> None:
    config = _replace(LLAMA_TINY, tie_word_embeddings=tied)
    params = _random_params(llama.abstract_params(config))
    tensors = llama.to_hf_state_dict(params)
    assert ("lm_head.weight" in tensors) is not tied
    assert tensors["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)  # [out, in]
    np.testing.assert_array_equal(
        tensors["model.layers.1.self_attn.k_proj.weight"],
        np.asarray(params["model"]["layers"]["self_attn"]["k_proj"]["kernel"][1]).T,
    )
    if tied:  # Some tied checkpoints still store the shared matrix as lm_head; it is ignored.
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    directory = _write_checkpoint(tmp_path / "ckpt", tensors, config.to_hf_dict())
    loaded_config, loaded = llama.load_hf_checkpoint(directory)
    assert loaded_config == config
    _assert_trees_equal(loaded, params)
    # Round trip again through the HF state dict.
    for name, array in load_file(str(directory / "model.safetensors")).items():
        if name in llama.to_hf_state_dict(loaded):
            np.testing.assert_array_equal(llama.to_hf_state_dict(loaded)[name], array)


def test_llama_loader_casts_to_param_dtype(tmp_path: Path) -> None:
    params = _random_params(llama.abstract_params(LLAMA_TINY))
    directory = _write_checkpoint(tmp_path, llama.to_hf_state_dict(params), LLAMA_TINY.to_hf_dict())
    config, loaded = llama.load_hf_checkpoint(directory, param_dtype="bfloat16", dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
    logits = llama.LlamaForCausalLM(config).apply({"params": loaded}, jnp.asarray(_ids(1, 5, 128)))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 5, 128)


@pytest.mark.parametrize(("with_pooler", "with_classifier"), [(True, False), (False, False), (True, True)])
def test_bert_safetensors_round_trip(tmp_path: Path, with_pooler: bool, with_classifier: bool) -> None:
    config = _replace(BERT_TINY, add_pooling_layer=with_pooler, num_labels=3)
    params = _random_params(bert.abstract_params(config, with_classifier=with_classifier))
    tensors = bert.to_hf_state_dict(params)
    assert ("pooler.dense.weight" in tensors) is (with_pooler and not with_classifier)
    if with_classifier:
        assert tensors["classifier.weight"].shape == (3, 32)
        assert "bert.encoder.layer.1.attention.self.query.weight" in tensors
    tensors["embeddings.position_ids"] = np.arange(40)[None]  # buffer stored by older checkpoints
    directory = _write_checkpoint(tmp_path, tensors, config.to_hf_dict())
    loaded_config, loaded = bert.load_hf_checkpoint(directory, with_classifier=with_classifier)
    assert loaded_config == config
    _assert_trees_equal(loaded, params)


def test_bert_loader_handles_prefix(tmp_path: Path) -> None:
    params = _random_params(bert.abstract_params(BERT_TINY))
    directory = _write_checkpoint(tmp_path, bert.to_hf_state_dict(params, prefix="bert."), BERT_TINY.to_hf_dict())
    assert all(name.startswith("bert.") for name in load_file(str(directory / "model.safetensors")))
    _, loaded = bert.load_hf_checkpoint(directory)  # prefix detected
    _assert_trees_equal(loaded, params)
    _, loaded = bert.load_hf_checkpoint(directory, prefix="bert.")
    _assert_trees_equal(loaded, params)


# --------------------------------------------------------------------------------------- loader errors


@pytest.fixture
def llama_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    params = _random_params(llama.abstract_params(LLAMA_TINY))
    tensors = llama.to_hf_state_dict(params)
    return _write_checkpoint(tmp_path / "ok", tensors, LLAMA_TINY.to_hf_dict()), tensors


def test_llama_loader_missing_key(tmp_path: Path, llama_checkpoint: tuple[Path, dict[str, np.ndarray]]) -> None:
    _, tensors = llama_checkpoint
    tensors = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    directory = _write_checkpoint(tmp_path / "bad", tensors, LLAMA_TINY.to_hf_dict())
    with pytest.raises(
        ValueError,
        match=r"does not match the LlamaForCausalLM config; "
        r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight\. Fix:",
    ):
        llama.load_hf_checkpoint(directory)


def test_llama_loader_unexpected_key(tmp_path: Path, llama_checkpoint: tuple[Path, dict[str, np.ndarray]]) -> None:
    _, tensors = llama_checkpoint
    tensors = {**tensors, "score.weight": np.zeros((2, 64), np.float32)}
    directory = _write_checkpoint(tmp_path / "bad", tensors, LLAMA_TINY.to_hf_dict())
    with pytest.raises(ValueError, match=r"unexpected keys: score\.weight\. Fix: .*strict=False"):
        llama.load_hf_checkpoint(directory)
    _, params = llama.load_hf_checkpoint(directory, strict=False)
    assert "score" not in params


def test_llama_loader_layer_count_mismatch(
    tmp_path: Path, llama_checkpoint: tuple[Path, dict[str, np.ndarray]]
) -> None:
    directory, _ = llama_checkpoint
    with pytest.raises(
        ValueError,
        match=r"missing keys: model\.layers\.2\.input_layernorm\.weight, "
        r".*, model\.layers\.2\.self_attn\.v_proj\.weight\. Fix",
    ):
        llama.load_hf_checkpoint(directory, num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"unexpected keys: model\.layers\.1\.input_layernorm\.weight"):
        llama.load_hf_checkpoint(directory, num_hidden_layers=1)


def test_llama_loader_untied_config_needs_lm_head(
    tmp_path: Path, llama_checkpoint: tuple[Path, dict[str, np.ndarray]]
) -> None:
    _, tensors = llama_checkpoint
    tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    directory = _write_checkpoint(tmp_path / "bad", tensors, LLAMA_TINY.to_hf_dict())
    with pytest.raises(ValueError, match=r"missing keys: lm_head\.weight\."):
        llama.load_hf_checkpoint(directory)
    _, params = llama.load_hf_checkpoint(directory, tie_word_embeddings=True)
    assert "lm_head" not in params


def test_llama_loader_shape_mismatch(tmp_path: Path, llama_checkpoint: tuple[Path, dict[str, np.ndarray]]) -> None:
    _, tensors = llama_checkpoint
    tensors = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
    directory = _write_checkpoint(tmp_path / "bad", tensors, LLAMA_TINY.to_hf_dict())
    with pytest.raises(
        ValueError,
        match=r"tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(64, 64\), "
        r"but LlamaForCausalLM parameter 'model/layers/self_attn/k_proj/kernel' "
        r"\(shape \(2, 64, 32\)\) needs \(32, 64\)\. Fix:",
    ):
        llama.load_hf_checkpoint(directory)


def test_loader_file_errors(tmp_path: Path, llama_checkpoint: tuple[Path, dict[str, np.ndarray]]) -> None:
    directory, _ = llama_checkpoint
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(LLAMA_TINY.to_hf_dict()))
    with pytest.raises(ValueError, match=r"No \*\.safetensors file in .*empty"):
        llama.load_hf_checkpoint(empty)
    os.remove(directory / "config.json")
    with pytest.raises(ValueError, match=r"No config file at .*config\.json"):
        llama.load_hf_checkpoint(directory)
    with pytest.raises(ValueError, match="model_type='llama'; BertConfig expects 'bert'"):
        bert.BertConfig.from_json_file(empty)


def test_bert_loader_errors(tmp_path: Path) -> None:
    config = _replace(BERT_TINY, num_labels=2)
    params = _random_params(bert.abstract_params(config, with_classifier=True))
    directory = _write_checkpoint(tmp_path / "cls", bert.to_hf_state_dict(params), config.to_hf_dict())
    with pytest.raises(
        ValueError,
        match=r"does not match the BertModel config; unexpected keys: classifier\.bias, classifier\.weight",
    ):
        bert.load_hf_checkpoint(directory)
    _, encoder = bert.load_hf_checkpoint(directory, strict=False)
    _assert_trees_equal(encoder, params["bert"])

    encoder_dir = _write_checkpoint(tmp_path / "enc", bert.to_hf_state_dict(params["bert"]), config.to_hf_dict())
    with pytest.raises(
        ValueError,
        match=r"missing keys: bert\.embeddings\.LayerNorm\.bias, .* \(and 31 more\); "
        r"unexpected keys: embeddings\.LayerNorm\.bias, ",
    ):
        bert.load_hf_checkpoint(encoder_dir, with_classifier=True)
    with pytest.raises(ValueError, match=r"missing keys: encoder\.layer\.2\.attention"):
        bert.load_hf_checkpoint(encoder_dir, num_hidden_layers=3)
    with pytest.raises(
        ValueError,
        match=r"tensor 'embeddings\.word_embeddings\.weight' has shape \(100, 32\), but BertModel parameter "
        r"'embeddings/word_embeddings/embedding' \(shape \(90, 32\)\) needs \(90, 32\)\.",
    ):
        bert.load_hf_checkpoint(encoder_dir, vocab_size=90)


# ------------------------------------------------------------------------------------------ model behaviour


def test_llama_remat_matches_and_differentiates() -> None:
    ids = jnp.asarray(_ids(2, 6, 128))
    params = _random_params(llama.abstract_params(LLAMA_TINY))
    plain = llama.LlamaForCausalLM(LLAMA_TINY).apply({"params": params}, ids)
    remat = llama.LlamaForCausalLM(_replace(LLAMA_TINY, remat=True))

    def loss(p: dict[str, Any]) -> jax.Array:
        return remat.apply({"params": p}, ids, None, False, rngs={"dropout": jax.random.key(0)}).mean()

    np.testing.assert_allclose(remat.apply({"params": params}, ids), plain, atol=1e-6)
    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert float(jnp.abs(grads["model"]["layers"]["self_attn"]["q_proj"]["kernel"]).sum()) > 0


def test_llama_is_causal() -> None:
    ids = _ids(1, 8, 128)
    params = _random_params(llama.abstract_params(LLAMA_TINY))
    changed = ids.copy()
    changed[0, 5:] = (changed[0, 5:] + 1) % 128
    model = llama.LlamaForCausalLM(LLAMA_TINY)
    a = model.apply({"params": params}, jnp.asarray(ids))
    b = model.apply({"params": params}, jnp.asarray(changed))
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-3


def test_bert_dropout_needs_rng_and_changes_output() -> None:
    ids = jnp.asarray(_ids(2, 6, 100))
    model = bert.BertModel(BERT_TINY)
    params = _random_params(bert.abstract_params(BERT_TINY))
    a = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    b = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_mean_pool() -> None:
    hidden = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    mask = jnp.asarray([[1, 1, 0], [1, 0, 0]])
    expected = np.stack([np.asarray(hidden[0, :2]).mean(0), np.asarray(hidden[1, 0])])
    np.testing.assert_allclose(bert.mean_pool(hidden, mask), expected)
    np.testing.assert_allclose(bert.mean_pool(hidden), np.asarray(hidden).mean(1))


# ------------------------------------------------------------------------------- parity with transformers


def _randomize_torch(model: Any, torch: Any) -> None:
    """Gives every parameter non-trivial values (norm weights near 1) so that parity tests have signal."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("LayerNorm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))


@pytest.mark.parametrize(("tied", "rope"), [(False, None), (True, None), (False, LLAMA3_ROPE)])
def test_llama_matches_transformers(tmp_path: Path, tied: bool, rope: dict[str, Any] | None) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_parameters={"rope_theta": 10000.0, **(rope or {"rope_type": "default"})},
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    _randomize_torch(hf_model, torch)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)

    config, params = llama.load_hf_checkpoint(tmp_path)
    assert config.tie_word_embeddings is tied and config.rms_norm_eps == 1e-5
    assert config.rope_type == ("default" if rope is None else "llama3")
    model = llama.LlamaForCausalLM(config)

    ids = _ids(3, 12, 128, seed=1)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    mask[2, :5] = 0  # left padding
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids).long()).logits.numpy()
        expected_masked = hf_model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).logits.numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    got_masked = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))

    assert np.abs(expected).max() > 0.5  # the comparison has signal
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.isfinite(got_masked).all()  # fully masked (left-pad) query rows must not give NaN
    valid = mask.astype(bool)  # outputs at padded positions are unspecified
    np.testing.assert_allclose(got_masked[valid], expected_masked[valid], atol=1e-4, rtol=0)
    # Padding changes the left-padded row, so the mask is really applied.
    assert np.abs(got_masked[2, 5:] - got[2, 5:]).max() > 1e-3

    # Our state dict loads back into torch exactly.
    state = {k: torch.from_numpy(v) for k, v in llama.to_hf_state_dict(params).items()}
    result = hf_model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == ({"lm_head.weight"} if tied else set())


def _tiny_hf_bert_config(transformers, **kw):
    """A tiny transformers ``BertConfig`` (hidden 32, 2 layers, 4 heads, vocab 100)."""
    return transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        **kw,
    )


def test_bert_matches_transformers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = _tiny_hf_bert_config(transformers)
    hf_model = transformers.BertModel(hf_config).eval()
    _randomize_torch(hf_model, torch)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)

    config, params = bert.load_hf_checkpoint(tmp_path)
    assert config.add_pooling_layer and config.hidden_act == "gelu"
    model = bert.BertModel(config)

    ids = _ids(3, 10, 100, seed=2)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    token_types = np.zeros_like(ids)
    token_types[:, 4:] = 1
    with torch.no_grad():
        out = hf_model(torch.from_numpy(ids).long())
        out_masked = hf_model(
            torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            token_type_ids=torch.from_numpy(token_types).long(),
        )
    hidden, pooled = model.apply({"params": params}, jnp.asarray(ids), return_pooled=True)
    hidden_masked = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(token_types))

    np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=0)
    expected_masked = out_masked.last_hidden_state.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden_masked)[valid], expected_masked[valid], atol=1e-4, rtol=0)
    assert np.abs(np.asarray(hidden_masked)[1, :6] - np.asarray(hidden)[1, :6]).max() > 1e-3

    # Sentence-transformers style embedding of the padded batch.
    expected_pool = (expected_masked * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(bert.mean_pool(hidden_masked, jnp.asarray(mask))), expected_pool, atol=1e-4)


def test_bert_classifier_matches_transformers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = _tiny_hf_bert_config(transformers, num_labels=3)
    hf_model = transformers.BertForSequenceClassification(hf_config).eval()
    _randomize_torch(hf_model, torch)
    hf_model.save_pretrained(tmp_path, safe_serialization=True)

    config, params = bert.load_hf_checkpoint(tmp_path, with_classifier=True)
    assert config.num_labels == 3
    ids = _ids(2, 7, 100, seed=3)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    got = bert.BertForSequenceClassification(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)
