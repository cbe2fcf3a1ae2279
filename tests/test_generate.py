"""Tests for the Llama KV cache (``llama.init_cache``) and ``examples/models/generate.py``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxpeft
import jaxpeft.linen
from examples.models import generate as gen
from examples.models import llama

CONFIG = llama.LlamaConfig(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    rope_theta=500.0,
)
MODEL = llama.LlamaForCausalLM(CONFIG)


def apply_base(p: Any, *args: Any, **kwargs: Any) -> Any:
    """One module-level apply_fn, so that generate() compiles once per shape for the whole file."""
    return MODEL.apply({"params": p}, *args, **kwargs)


def apply_adapted(pa: Any, *args: Any, **kwargs: Any) -> Any:
    """Base params and LoRA adapters in one pytree, adapters run unmerged."""
    return jaxpeft.linen.apply(MODEL, {"params": pa[0]}, pa[1], *args, **kwargs)


def _params(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    flat = {
        path: jnp.asarray(((path[-1] == "scale") + 0.3 * rng.standard_normal(leaf.shape)).astype(np.float32))
        for path, leaf in traverse_util.flatten_dict(llama.abstract_params(CONFIG)).items()
    }
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def params() -> dict[str, Any]:
    return _params()


def _ids(batch: int, seq: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch, seq)), jnp.int32)


def _naive_greedy(params: Any, prompt: jax.Array, steps: int) -> np.ndarray:
    """Argmax loop over full-sequence forwards without a cache (right-padded to one length: causal attention makes
    the padding invisible to earlier positions, and there is one compilation)."""
    batch, prompt_len = prompt.shape
    forward = jax.jit(lambda p, x: MODEL.apply({"params": p}, x))
    x = jnp.concatenate([prompt, jnp.zeros((batch, steps), jnp.int32)], axis=1)
    for t in range(prompt_len, prompt_len + steps):
        x = x.at[:, t].set(jnp.argmax(forward(params, x)[:, t - 1], axis=-1).astype(jnp.int32))
    return np.asarray(x[:, prompt_len:])


def test_cache_decode_matches_full_forward(params: dict[str, Any]) -> None:
    ids = _ids(2, 9)
    full = MODEL.apply({"params": params}, ids)
    cache = llama.init_cache(CONFIG, 2, 12)
    assert cache["k"].shape == (2, 2, 12, 2, 8)
    logits, cache = MODEL.apply({"params": params}, ids[:, :4], cache=cache, cache_index=0)
    steps = [logits]
    step = jax.jit(lambda p, x, c, i: MODEL.apply({"params": p}, x, cache=c, cache_index=i))
    for t in range(4, 9):
        logits, cache = step(params, ids[:, t : t + 1], cache, jnp.int32(t))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(cache["k"][:, :, 9:]).max()) == 0.0  # untouched slots


def test_cache_respects_left_padding(params: dict[str, Any]) -> None:
    ids = _ids(1, 5)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], axis=1)
    mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]])
    positions = jnp.asarray([[0, 0, 0, 0, 1, 2, 3, 4]])
    logits, _ = MODEL.apply(
        {"params": params},
        padded,
        attention_mask=mask,
        position_ids=positions,
        cache=llama.init_cache(CONFIG, 1, 10),
        cache_index=0,
    )
    np.testing.assert_allclose(logits[:, 3:], MODEL.apply({"params": params}, ids), rtol=1e-5, atol=1e-5)


def test_greedy_generate_equals_naive_loop(params: dict[str, Any]) -> None:
    prompt = _ids(2, 4, seed=1)
    tokens = gen.generate(apply_base, params, prompt, 8, config=CONFIG)
    assert tokens.shape == (2, 8) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, _naive_greedy(params, prompt, 8))


def test_left_padded_batch_equals_each_prompt_alone(params: dict[str, Any]) -> None:
    prompts = [[5, 9, 1, 30], [11, 3]]
    ids, mask = gen.left_pad(prompts, pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    batched = gen.generate(apply_base, params, ids, 8, config=CONFIG, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = gen.generate(apply_base, params, jnp.asarray([prompt]), 8, config=CONFIG)
        np.testing.assert_array_equal(batched[row], alone[0])


def test_adapters_unmerged_equal_merged(params: dict[str, Any]) -> None:
    prompt = _ids(2, 4, seed=2)
    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    adapters = jaxpeft.linen.init(cfg, MODEL, params, prompt, key=jax.random.key(0))
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    adapters = jax.tree.unflatten(
        treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )
    unmerged = gen.generate(apply_adapted, (params, adapters), prompt, 8, config=CONFIG)
    merged = gen.generate(apply_base, jaxpeft.merge(params, adapters), prompt, 8, config=CONFIG)
    base = gen.generate(apply_base, params, prompt, 8, config=CONFIG)
    np.testing.assert_array_equal(unmerged, merged)
    assert not np.array_equal(unmerged, base)  # the adapters change what is generated


def test_eos_stops_each_row(params: dict[str, Any]) -> None:
    prompt = _ids(2, 4, seed=3)
    free = np.asarray(gen.generate(apply_base, params, prompt, 8, config=CONFIG))
    eos = int(free[0, 2])
    assert eos not in free[0, :2].tolist()
    stopped = np.asarray(gen.generate(apply_base, params, prompt, 8, config=CONFIG, eos_id=eos, pad_id=-1))
    np.testing.assert_array_equal(stopped[0], [*free[0, :3], -1, -1, -1, -1, -1])
    row1 = free[1].tolist()
    cut = row1.index(eos) + 1 if eos in row1 else 8
    np.testing.assert_array_equal(stopped[1, :cut], free[1, :cut])
    assert (stopped[1, cut:] == -1).all()


def test_sampling_is_reproducible(params: dict[str, Any]) -> None:
    prompt = _ids(2, 4, seed=4)

    def sample(key: jax.Array, **kw: Any) -> np.ndarray:
        return np.asarray(gen.generate(apply_base, params, prompt, 8, config=CONFIG, temperature=2.0, key=key, **kw))

    a, b, c = sample(jax.random.key(0)), sample(jax.random.key(0)), sample(jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    top1 = sample(jax.random.key(5), top_k=1)
    np.testing.assert_array_equal(top1, gen.generate(apply_base, params, prompt, 8, config=CONFIG))


def test_generate_compiles_once_per_shape(params: dict[str, Any]) -> None:
    calls = []

    def counting(p: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].shape)
        return apply_base(p, *args, **kwargs)

    prompt = _ids(1, 2, seed=5)
    gen.generate(counting, params, prompt, 2, config=CONFIG)
    traced = len(calls)
    assert traced == 2  # prefill + the loop body, each traced once
    gen.generate(counting, _params(seed=9), prompt + 1, 2, config=CONFIG)
    assert len(calls) == traced


def test_generate_text_cuts_at_eos(params: dict[str, Any]) -> None:
    class Chars:
        def encode(self, text: str) -> list[int]:
            return [ord(c) % CONFIG.vocab_size for c in text]

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return ",".join(str(i) for i in ids if not (skip_special_tokens and i == eos))

    free = gen.generate(apply_base, params, jnp.asarray([Chars().encode("heya")]), 8, config=CONFIG)
    row = np.asarray(free[0]).tolist()
    eos = row[-1]
    expected = ",".join(str(i) for i in row[: row.index(eos)])  # the first eos ends the text and is dropped
    texts = gen.generate_text(apply_base, params, Chars(), ["heya", "ab"], 8, config=CONFIG, eos_id=eos)
    assert texts[0] == expected
    assert len(texts) == 2


def test_generate_errors(params: dict[str, Any]) -> None:
    prompt = _ids(2, 3)
    with pytest.raises(ValueError, match="needs `key`"):
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, temperature=1.0)
    with pytest.raises(ValueError, match="`top_k`=3 needs temperature > 0"):
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, top_k=3)
    with pytest.raises(ValueError, match="must be left padding"):
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, attention_mask=np.asarray([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="`max_new_tokens`=0"):
        gen.generate(apply_base, params, prompt, 0, config=CONFIG)
    with pytest.raises(ValueError, match=r"`prompt_ids` has shape \(3,\)"):
        gen.generate(apply_base, params, prompt[0], 2, config=CONFIG)


def test_cache_errors(params: dict[str, Any]) -> None:
    ids = _ids(2, 3)
    cache = llama.init_cache(CONFIG, 2, 8)
    with pytest.raises(ValueError, match="`cache` needs `cache_index`"):
        MODEL.apply({"params": params}, ids, cache=cache)
    with pytest.raises(ValueError, match="`cache_index` was given without `cache`"):
        MODEL.apply({"params": params}, ids, cache_index=0)
    with pytest.raises(ValueError, match=r"expected \(layers, batch, max_len, kv_heads, head_dim\)"):
        MODEL.apply({"params": params}, ids, cache=llama.init_cache(CONFIG, 3, 8), cache_index=0)
    with pytest.raises(ValueError, match=r"expected \(batch, max_len \(one entry per cache slot\)\) = \(2, 8\)"):
        MODEL.apply({"params": params}, ids, attention_mask=jnp.ones((2, 3)), cache=cache, cache_index=0)
    with pytest.raises(ValueError, match="must be the \\{'k', 'v'\\} dict"):
        MODEL.apply({"params": params}, ids, cache={"k": cache["k"]}, cache_index=0)
