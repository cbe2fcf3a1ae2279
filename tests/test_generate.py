"""Tests for the Llama KV cache (``llama.init_cache``) and ``examples/models/generate.py``."""

from __future__ import annotations

import dataclasses
import functools
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


@functools.partial(jax.jit, static_argnames="hook")
def _full_forward(params: Any, x: jax.Array, adapters: Any, hook: str | None, hook_value: Any) -> Any:
    """Full-sequence logits without a cache, through layer ``adapters`` (or none) and the Llama's ``hook``."""
    kw = {} if hook is None else {hook: hook_value}
    if hook == "prefix":
        kw["prefix"] = jaxpeft.prefix_kv(hook_value, x.shape[0])
    if adapters is None:
        return MODEL.apply({"params": params}, x, **kw)
    return jaxpeft.linen.apply(MODEL, {"params": params}, adapters, x, **kw)


def _naive_greedy(params: Any, ids: jax.Array, steps: int, adapters: Any = None, **hook: Any) -> np.ndarray:
    """Argmax loop over full-sequence forwards without a cache (right-padded to one length: causal attention makes
    the padding invisible to earlier positions, and there is one compilation). ``hook``: the Llama's ``prompt=`` or
    ``prefix=`` (an adapter tree); ``adapters``: layer adapters run by ``jaxpeft.linen.apply``."""
    (name, value), *_ = [*hook.items(), (None, None)]
    batch, prompt_len = ids.shape
    x = jnp.concatenate([ids, jnp.zeros((batch, steps), jnp.int32)], axis=1)
    for t in range(prompt_len, prompt_len + steps):
        logits = _full_forward(params, x, adapters, name, value)
        x = x.at[:, t].set(jnp.argmax(logits[:, t - 1], axis=-1).astype(jnp.int32))
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


# ------------------------------------------------------------------------------------- serving: adapters per row

LORA = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
PROMPT = jaxpeft.PromptTuningConfig(num_virtual_tokens=3)
PREFIX = jaxpeft.PrefixTuningConfig(3, num_layers=2, num_kv_heads=2, head_dim=8)
ROWS = [[5, 9, 1, 30], [11, 3], [7, 7, 2], [40, 1, 22, 9]]  # one request per row, of different lengths
ROW_IDS = [2, 0, 1, 2]  # the adapter of each row (adapters 0..2)


def _noisy(adapters: Any, seed: int, scale: float = 0.3) -> Any:
    """Adapters far from init (so each adapter changes what is generated), deterministic per seed."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


def _make(kind: str, params: Any, seed: int) -> Any:
    """One trained-looking adapter tree of ``kind`` (``lora``, ``prompt`` or ``prefix``)."""
    if kind == "lora":
        return _noisy(jaxpeft.linen.init(LORA, MODEL, params, _ids(1, 2), key=jax.random.key(seed)), seed)
    return jaxpeft.init(PROMPT if kind == "prompt" else PREFIX, params, key=jax.random.key(seed))


def _served(kind: str, params: Any, named: dict[str, Any], row_ids: list[int]) -> tuple[Any, Any, dict[str, Any]]:
    """``(apply_fn, params, generate kwargs)`` that run row ``i`` with adapter ``row_ids[i]`` of ``named``."""
    ids = jnp.asarray(row_ids, jnp.int32)
    if kind == "lora":
        return apply_adapted, (params, jaxpeft.stack_adapters(named)), {"adapter_ids": ids}
    if kind == "prompt":
        return apply_base, params, {"prompt": gen.stack_prompts(named, CONFIG)[ids]}
    return apply_base, params, {"prefix": gen.pick_rows(gen.stack_prefixes(named, CONFIG), ids)}


def _alone(kind: str, params: Any, adapters: Any) -> tuple[Any, Any, dict[str, Any]]:
    """``(apply_fn, params, generate kwargs)`` of one adapter for the whole batch."""
    if kind == "lora":
        return apply_adapted, (params, adapters), {}
    return apply_base, params, {kind: adapters}


@pytest.mark.parametrize("kind", ["lora", "prompt", "prefix"])
def test_mixed_batch_rows_equal_each_row_alone(params: dict[str, Any], kind: str) -> None:
    named = {f"a{i}": _make(kind, params, seed=10 + i) for i in range(3)}
    ids, mask = gen.left_pad(ROWS)
    fn, p, kw = _served(kind, params, named, ROW_IDS)
    mixed = np.asarray(gen.generate(fn, p, ids, 6, config=CONFIG, attention_mask=mask, **kw))
    for row, (tokens, adapter) in enumerate(zip(ROWS, ROW_IDS, strict=True)):
        fn, p, kw = _alone(kind, params, named[f"a{adapter}"])
        alone = np.asarray(gen.generate(fn, p, jnp.asarray([tokens]), 6, config=CONFIG, **kw))
        np.testing.assert_array_equal(mixed[row], alone[0], err_msg=f"row {row} (adapter a{adapter})")
    fn, p, kw = _served(kind, params, named, [0, 0, 0, 0])
    one = np.asarray(gen.generate(fn, p, ids, 6, config=CONFIG, attention_mask=mask, **kw))
    assert not np.array_equal(mixed[[0, 2, 3]], one[[0, 2, 3]])  # the rows' own adapters change their tokens
    np.testing.assert_array_equal(mixed[1], one[1])  # row 1 runs adapter 0 in both


def test_mixed_lora_bank_logits_equal_each_row_alone(params: dict[str, Any]) -> None:
    """The bank's per-row logits (the cached prefill, every position) equal each row alone with its adapter."""
    named = {f"a{i}": _make("lora", params, seed=10 + i) for i in range(3)}
    bank = jaxpeft.stack_adapters(named)
    ids = _ids(4, 5, seed=7)
    cache = llama.init_cache(CONFIG, 4, 5)
    mixed, _ = apply_adapted(
        (params, bank), ids, cache=cache, cache_index=0, adapter_ids=jnp.asarray(ROW_IDS, jnp.int32)
    )
    for row, adapter in enumerate(ROW_IDS):
        alone = apply_adapted((params, named[f"a{adapter}"]), ids[row : row + 1])
        np.testing.assert_allclose(mixed[row], alone[0], rtol=1e-5, atol=1e-5)


def test_lora_bank_with_a_prompt_per_row(params: dict[str, Any]) -> None:
    """Both at once: row i runs LoRA ids[i] and prompt ids[i]; the virtual tokens go through the row's LoRA too."""
    loras = {f"a{i}": _make("lora", params, seed=10 + i) for i in range(3)}
    prompts = {f"a{i}": _make("prompt", params, seed=20 + i) for i in range(3)}
    rows, row_adapters = [[5, 9, 1], [11, 3], [7, 7, 2]], [2, 0, 1]
    ids, mask = gen.left_pad(rows)
    row_ids = jnp.asarray(row_adapters, jnp.int32)
    bank = jaxpeft.stack_adapters(loras)
    mixed = gen.generate(
        apply_adapted,
        (params, bank),
        ids,
        5,
        config=CONFIG,
        attention_mask=mask,
        adapter_ids=row_ids,
        prompt=gen.stack_prompts(prompts, CONFIG)[row_ids],
    )
    for row, (tokens, adapter) in enumerate(zip(rows, row_adapters, strict=True)):
        name = f"a{adapter}"
        alone = gen.generate(
            apply_adapted, (params, loras[name]), jnp.asarray([tokens]), 5, config=CONFIG, prompt=prompts[name]
        )
        np.testing.assert_array_equal(mixed[row], alone[0], err_msg=f"row {row}")
        reference = _naive_greedy(params, jnp.asarray([tokens]), 5, adapters=loras[name], prompt=prompts[name])
        np.testing.assert_array_equal(mixed[row], reference[0], err_msg=f"row {row}, full recompute")


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_generate_equal_full_recompute(params: dict[str, Any], kind: str) -> None:
    """One prompt / prefix for every row: the cached decode equals an argmax loop over full forwards with the
    Llama's own ``prompt=`` / ``prefix=`` hooks (virtual tokens at positions 0..n-1, the text from n)."""
    adapters = _make(kind, params, seed=3)
    prompt = _ids(2, 4, seed=6)
    tokens = gen.generate(apply_base, params, prompt, 6, config=CONFIG, **{kind: adapters})
    np.testing.assert_array_equal(tokens, _naive_greedy(params, prompt, 6, **{kind: adapters}))
    assert not np.array_equal(tokens, gen.generate(apply_base, params, prompt, 6, config=CONFIG))
    if kind == "prefix":  # the prefix as arrays (jaxpeft.prefix_kv) is the same request
        kv = jaxpeft.prefix_kv(adapters, 2)
        np.testing.assert_array_equal(tokens, gen.generate(apply_base, params, prompt, 6, config=CONFIG, prefix=kv))
    else:  # and so is the prompt's table
        table = jax.tree.leaves(adapters)[0]
        np.testing.assert_array_equal(tokens, gen.generate(apply_base, params, prompt, 6, config=CONFIG, prompt=table))


def _restored(kind: str, params: Any, adapters: Any, source: str, directory: Any) -> Any:
    """``adapters`` written and read back: a jaxpeft checkpoint or a HF PEFT directory."""
    cfg = {"lora": LORA, "prompt": PROMPT, "prefix": PREFIX}[kind]
    if source == "checkpoint":
        jaxpeft.checkpoint.save_adapters(directory, 0, adapters, cfg, params)
        return jaxpeft.checkpoint.restore_adapters(directory, cfg, params).adapters
    layouts = jaxpeft.linen.infer_layouts(MODEL, _ids(1, 2)) if kind == "lora" else None
    module_name = llama.hf_module_name if kind == "lora" else None
    jaxpeft.hf.export_adapters(directory, adapters, cfg, params, module_name, layouts=layouts)  # type: ignore[arg-type]
    imported_cfg, imported = jaxpeft.hf.import_adapters(directory, params, module_name, layouts=layouts)  # type: ignore[arg-type]
    assert type(imported_cfg) is type(cfg)
    return imported


def _counting(traces: list[tuple[int, ...]]) -> Any:
    """A fresh apply_fn (so its first use compiles) that records one entry per trace; adapted when params is a
    ``(params, adapters)`` pair."""

    def apply_fn(p: Any, *args: Any, **kwargs: Any) -> Any:
        traces.append(args[0].shape)
        return apply_adapted(p, *args, **kwargs) if isinstance(p, tuple) else apply_base(p, *args, **kwargs)

    return apply_fn


@pytest.mark.parametrize("source", ["checkpoint", "peft"])
@pytest.mark.parametrize("kind", ["lora", "prompt", "prefix"])
def test_replacing_one_adapter_of_a_live_bank_does_not_recompile(
    params: dict[str, Any], kind: str, source: str, tmp_path: Any
) -> None:
    named = {f"a{i}": _make(kind, params, seed=10 + i) for i in range(3)}
    ids, mask = gen.left_pad(ROWS)
    _, p, kw = _served(kind, params, named, ROW_IDS)
    traces: list[tuple[int, ...]] = []
    apply_counting = _counting(traces)
    before = np.asarray(gen.generate(apply_counting, p, ids, 6, config=CONFIG, attention_mask=mask, **kw))
    traced = len(traces)
    assert traced == (3 if kind == "prompt" else 2)  # (the virtual tokens,) the prefill and the loop body

    trained = _restored(kind, params, _make(kind, params, seed=99), source, tmp_path / kind)
    if kind == "lora":
        p = (params, gen.replace_adapter(p[1], "a1", trained))  # slot 1: row 2's adapter
    elif kind == "prompt":
        stacked = gen.stack_prompts(named, CONFIG).at[1].set(gen.stack_prompts({"new": trained}, CONFIG)[0])
        kw = {"prompt": stacked[jnp.asarray(ROW_IDS)]}
    else:
        keys, values = gen.stack_prefixes(named, CONFIG)
        new_keys, new_values = gen.stack_prefixes({"new": trained}, CONFIG)
        kv = (keys.at[:, 1].set(new_keys[:, 0]), values.at[:, 1].set(new_values[:, 0]))
        kw = {"prefix": gen.pick_rows(kv, ROW_IDS)}
    after = np.asarray(gen.generate(apply_counting, p, ids, 6, config=CONFIG, attention_mask=mask, **kw))
    assert len(traces) == traced, "replacing an adapter recompiled the decode"
    assert not np.array_equal(after[2], before[2])  # row 2 runs the new adapter
    np.testing.assert_array_equal(after[[0, 1, 3]], before[[0, 1, 3]])  # the other rows are untouched
    fn, p_alone, kw_alone = _alone(kind, params, trained)
    alone = gen.generate(fn, p_alone, jnp.asarray([ROWS[2]]), 6, config=CONFIG, **kw_alone)
    np.testing.assert_array_equal(after[2], alone[0])


def _is_prompt(x: Any) -> bool:
    return isinstance(x, jaxpeft.PromptWeights)


def test_serving_errors(params: dict[str, Any]) -> None:
    prompt = _ids(2, 3)
    prompts = {"x": _make("prompt", params, 1)}
    prefixes = {"x": _make("prefix", params, 2)}
    with pytest.raises(ValueError, match="`prompt` and `prefix` were both given"):
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, prompt=prompts["x"], prefix=prefixes["x"])
    with pytest.raises(ValueError, match=r"`adapter_ids` has dtype int32 and shape \(3,\); .* \(batch,\) = \(2,\)"):
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, adapter_ids=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="`adapter_ids` has dtype float32"):
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, adapter_ids=np.zeros(2, np.float32))
    stacked = gen.stack_prompts({"x": prompts["x"], "y": _make("prompt", params, 3), "z": prompts["x"]}, CONFIG)
    with pytest.raises(ValueError, match=r"`prompt` has shape \(3, 3, 32\).*stack_prompts\(named, config\)\[ids\]"):
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, prompt=stacked)
    with pytest.raises(ValueError, match="bank of"):  # a bank of prompts is refused by the library's hook
        node = dataclasses.replace(jax.tree.leaves(prompts["x"], is_leaf=_is_prompt)[0], embeddings=stacked)
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, prompt=node)
    with pytest.raises(ValueError, match=r"`prefix` keys and values have shapes \(2, 1, 3, 2, 8\)"):
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, prefix=gen.stack_prefixes(prefixes, CONFIG))
    with pytest.raises(ValueError, match=r"`prefix` keys and values have shapes \(\) and \(\)"):
        gen.generate(apply_base, params, prompt, 2, config=CONFIG, prefix=(1, 2, 3))
    longer = jaxpeft.init(jaxpeft.PromptTuningConfig(num_virtual_tokens=4), params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"prompts 'x' and 'long' have shapes \(3, 32\) and \(4, 32\)"):
        gen.stack_prompts({"x": prompts["x"], "long": longer}, CONFIG)
    with pytest.raises(ValueError, match="`named` must be a non-empty mapping"):
        gen.stack_prefixes({}, CONFIG)
    bank = jaxpeft.stack_adapters({"a": _make("lora", params, 1), "b": _make("lora", params, 2)})
    with pytest.raises(ValueError, match=r"`name`='c' is not in the bank; it holds \['a', 'b'\]"):
        gen.replace_adapter(bank, "c", _make("lora", params, 3))
    wider = dataclasses.replace(LORA, rank=4)
    bigger = jaxpeft.linen.init(wider, MODEL, params, _ids(1, 2), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"replacing 'a' changes the bank's array shapes .* would recompile"):
        gen.replace_adapter(bank, "a", bigger)
    other_scale = jaxpeft.linen.init(
        dataclasses.replace(LORA, alpha=8), MODEL, params, _ids(1, 2), key=jax.random.key(0)
    )
    with pytest.raises(ValueError, match="changes the bank's static parts"):
        gen.replace_adapter(bank, "a", other_scale)
