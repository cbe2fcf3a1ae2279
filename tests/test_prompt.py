"""Prompt tuning and prefix tuning: semantics through the example Llama's hook, gradients, checkpoints, JSON,
HF PEFT logits both ways (torch + peft, skipped without them), errors, the example."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
import jaxpeft.checkpoint
import jaxpeft.hf as hf
import jaxpeft.linen
from examples.models import llama
from jaxpeft.methods.prompt import INPUT_EMBEDDINGS
from tests._tiny_llama import tiny_llama_pair

CFG = llama.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
)
MODEL = llama.LlamaForCausalLM(CFG)
IDS = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 7)))
MASK = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2])
N = 3
PREFIX_ARGS = (N, CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim)
CONFIGS = {
    "prompt": jaxpeft.PromptTuningConfig(N),
    "prompt_text": jaxpeft.PromptTuningConfig(N, init="text", init_token_ids=(5, 9)),
    "prompt_vocab": jaxpeft.PromptTuningConfig(N, init="sample_vocab"),
    "prefix": jaxpeft.PrefixTuningConfig(*PREFIX_ARGS),
    "prefix_proj": jaxpeft.PrefixTuningConfig(*PREFIX_ARGS, prefix_projection=True, encoder_hidden_size=24),
}


@pytest.fixture(scope="module")
def params() -> Any:
    return MODEL.init(jax.random.key(0), IDS)["params"]


def _logits(params: Any, adapters: Any, cfg: Any, ids: jax.Array = IDS, mask: jax.Array | None = MASK) -> jax.Array:
    if isinstance(cfg, jaxpeft.PromptTuningConfig):
        return MODEL.apply({"params": params}, ids, mask, prompt=adapters)
    return MODEL.apply({"params": params}, ids, mask, prefix=jaxpeft.prefix_kv(adapters, ids.shape[0]))


def _node(adapters: Any) -> Any:
    return adapters["model"]["embed_tokens"]["embedding"]


# ------------------------------------------------------------------------------------------------ semantics


def test_text_prompt_is_the_hard_prompt(params):
    """A prompt holding the embeddings of tokens p is exactly the base model run on ``concat(p, ids)``."""
    cfg = jaxpeft.PromptTuningConfig(N, init="text", init_token_ids=(5, 9))  # tiled and cut: 5, 9, 5
    adapters = jaxpeft.init(cfg, params, key=jax.random.key(0))
    table = params["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(_node(adapters).embeddings, table[jnp.asarray([5, 9, 5])])
    hard = jnp.concatenate([jnp.broadcast_to(jnp.asarray([5, 9, 5]), (2, N)), IDS], axis=1)
    full_mask = jnp.concatenate([jnp.ones((2, N), MASK.dtype), MASK], axis=1)
    base = MODEL.apply({"params": params}, hard, full_mask)
    ours = _logits(params, adapters, cfg)
    assert ours.shape == (2, 7, CFG.vocab_size)
    np.testing.assert_allclose(ours, base[:, N:], atol=1e-5)


def test_prefix_is_a_cache_of_virtual_tokens(params):
    """A prefix equal to the cached keys/values of tokens p is the base model run on ``concat(p, ids)``: positions
    of the real tokens start at n and the prefix keys get no RoPE (HF semantics)."""
    p = jnp.broadcast_to(jnp.asarray([5, 9, 11]), (2, N))
    _, cache = MODEL.apply({"params": params}, p, cache=llama.init_cache(CFG, 2, N), cache_index=0)
    base = MODEL.apply({"params": params}, jnp.concatenate([p, IDS], axis=1))
    ours = MODEL.apply({"params": params}, IDS, prefix=(cache["k"], cache["v"]))
    np.testing.assert_allclose(ours, base[:, N:], atol=1e-5)
    # explicit position_ids are shifted by n, as PEFT does
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    shifted = MODEL.apply({"params": params}, IDS, position_ids=pos, prefix=(cache["k"], cache["v"]))
    np.testing.assert_allclose(shifted, ours, atol=1e-6)


def test_prefix_mask_hides_padding_only(params):
    """Padding hides a real key from every query; the prefix stays visible."""
    adapters = jaxpeft.init(CONFIGS["prefix"], params, key=jax.random.key(1))
    masked = _logits(params, adapters, CONFIGS["prefix"])
    unmasked = _logits(params, adapters, CONFIGS["prefix"], mask=None)
    np.testing.assert_allclose(masked[0], unmasked[0], atol=1e-6)  # row 0 has no padding
    np.testing.assert_allclose(masked[1, :5], unmasked[1, :5], atol=1e-6)  # causal: padding comes last


def test_prefix_kv_layout_is_pefts():
    """PEFT: view(batch, n, layers*2, heads, head_dim).permute(2, 0, 3, 1, 4).split(2): layer l's key is 2l."""
    L, H, D = 2, 2, 3
    flat = np.arange(N * L * 2 * H * D, dtype=np.float32).reshape(N, L * 2 * H * D)
    node = jaxpeft.PrefixWeights(
        jnp.asarray(flat), num_layers=L, num_kv_heads=H, head_dim=D, layout=jaxpeft.Layout(kind="embed")
    )
    keys, values = jaxpeft.prefix_kv(node, 2)
    theirs = np.broadcast_to(flat, (2, *flat.shape)).reshape(2, N, L * 2, H, D).transpose(2, 0, 3, 1, 4)
    for layer in range(L):
        np.testing.assert_array_equal(np.asarray(keys[layer]).transpose(0, 2, 1, 3), theirs[2 * layer])
        np.testing.assert_array_equal(np.asarray(values[layer]).transpose(0, 2, 1, 3), theirs[2 * layer + 1])
    assert jaxpeft.prefix_kv(node, 1, jnp.bfloat16)[0].dtype == jnp.bfloat16


def test_projection_is_pefts_mlp(params):
    adapters = jaxpeft.init(CONFIGS["prefix_proj"], params, key=jax.random.key(0))
    node = _node(adapters)
    e, w1, b1, w2, b2 = (np.asarray(x, np.float64) for x in (node.embeddings, node.w1, node.b1, node.w2, node.b2))
    np.testing.assert_allclose(node.flat(), np.tanh(e @ w1 + b1) @ w2 + b2, rtol=1e-5, atol=1e-5)
    assert node.embeddings.shape == (N, CFG.num_key_value_heads * CFG.head_dim)  # PEFT's token_dim
    assert node.w1.shape == (16, 24) and node.w2.shape == (24, 2 * 2 * 16)
    assert np.all(np.abs(node.w1) <= 1 / np.sqrt(16)) and np.all(np.abs(node.w2) <= 1 / np.sqrt(24))
    zero = jaxpeft.init(jaxpeft.PrefixTuningConfig(*PREFIX_ARGS, prefix_projection=True, init="zero"), params,
                        key=jax.random.key(0))  # fmt: skip
    np.testing.assert_array_equal(_node(zero).flat(), 0.0)
    plain_zero = jaxpeft.init(jaxpeft.PrefixTuningConfig(*PREFIX_ARGS, init="zero"), params, key=jax.random.key(0))
    np.testing.assert_array_equal(_node(plain_zero).flat(), 0.0)


def test_prepend_prompt_exactly(params):
    embeds = jax.random.normal(jax.random.key(0), (2, 5, 4), jnp.bfloat16)
    prompt = jax.random.normal(jax.random.key(1), (N, 4))
    out, mask = jaxpeft.prepend_prompt(embeds, jnp.ones((2, 5), jnp.int32), prompt)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, N + 5, 4)
    np.testing.assert_array_equal(out[:, :N], jnp.broadcast_to(prompt.astype(jnp.bfloat16), (2, N, 4)))
    np.testing.assert_array_equal(out[:, N:], embeds)
    np.testing.assert_array_equal(mask, np.ones((2, N + 5)))
    assert jaxpeft.prepend_prompt(embeds, None, jaxpeft.PromptWeights(prompt, jaxpeft.Layout(kind="embed")))[1] is None
    np.testing.assert_array_equal(jaxpeft.extend_attention_mask(jnp.asarray([[0, 1]]), 2), [[1, 1, 0, 1]])


def test_sample_vocab_rows_come_from_the_table(params):
    node = _node(jaxpeft.init(CONFIGS["prompt_vocab"], params, key=jax.random.key(3)))
    table = np.asarray(params["model"]["embed_tokens"]["embedding"])
    for row in np.asarray(node.embeddings):
        assert np.any(np.all(table == row, axis=1))
    random = _node(jaxpeft.init(CONFIGS["prompt"], params, key=jax.random.key(3)))
    assert 0.5 < float(jnp.std(random.embeddings)) < 2.0  # N(0, 1), as HF's nn.Embedding


@pytest.mark.parametrize("name", ["prompt", "prefix", "prefix_proj"])
def test_gradients_reach_only_and_every_prompt_leaf(params, name):
    cfg = CONFIGS[name]
    adapters = jaxpeft.init(cfg, params, key=jax.random.key(0))

    def loss(adapters: Any) -> jax.Array:
        return jnp.mean(_logits(params, adapters, cfg) ** 2)

    before = jax.tree.map(np.asarray, params)
    grads = jax.jit(jax.grad(loss))(adapters)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    leaves = jax.tree.leaves(grads)
    assert sum(g.nbytes for g in leaves) == sum(a.nbytes for a in jax.tree.leaves(adapters))
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    jax.tree.map(np.testing.assert_array_equal, before, params)  # the base is never touched


# ------------------------------------------------------------------------------------------------ state


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_json_round_trip(name):
    cfg = CONFIGS[name]
    assert jaxpeft.config_from_dict(json.loads(cfg.to_json())) == cfg
    assert type(cfg).from_json(cfg.to_json()) == cfg
    assert hash(cfg) == hash(type(cfg).from_dict(cfg.to_dict()))


@pytest.mark.parametrize("name", ["prompt_text", "prefix_proj"])
def test_checkpoint_round_trip(params, name, tmp_path):
    cfg = CONFIGS[name]
    adapters = jax.tree.map(lambda x: x + 1.0, jaxpeft.init(cfg, params, key=jax.random.key(0)))
    jaxpeft.checkpoint.save_adapters(tmp_path, 0, adapters, cfg, params)
    restored = jaxpeft.checkpoint.restore_adapters(tmp_path, cfg, params)
    jax.tree.map(np.testing.assert_array_equal, restored.adapters, adapters)
    assert type(_node(restored.adapters)) is type(_node(adapters))
    assert jaxpeft.checkpoint.read_config(tmp_path) == cfg


def test_not_mergeable_and_not_a_layer(params):
    adapters = jaxpeft.init(CONFIGS["prompt"], params, key=jax.random.key(0))
    with pytest.raises(
        jaxpeft.NotMergeableError, match=r"a PromptWeights is a model input \(virtual tokens\), not a weight update"
    ):
        jaxpeft.merge(params, adapters)
    with pytest.raises(
        ValueError, match=r"is a PromptWeights, a model input .*adapts no layer call.*jaxpeft.prepend_prompt"
    ):
        jaxpeft.linen.apply(MODEL, {"params": params}, adapters, IDS)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: jaxpeft.PromptTuningConfig(0), r"`num_virtual_tokens`=0; expected a positive integer"),
        (lambda: jaxpeft.PromptTuningConfig(2, init="TEXT"), r"`init`='TEXT'; expected one of \('random', 'text'"),
        (lambda: jaxpeft.PromptTuningConfig(2, init="text"), r'go with init="text" only.*init_token_ids=tokenizer'),
        (lambda: jaxpeft.PromptTuningConfig(2, init_token_ids=(1,)), r"`init_token_ids` \(given 1\) go with"),
        (lambda: jaxpeft.PromptTuningConfig(2, init="text", init_token_ids=(1, -2)), r"non-negative integer token"),
        (lambda: jaxpeft.PromptTuningConfig(2, dtype="int8"), r"`dtype`='int8'; adapters need a floating dtype"),
        (lambda: jaxpeft.PrefixTuningConfig(2, 0, 1, 1), r"`num_layers`=0; expected a positive integer"),
        (lambda: jaxpeft.PrefixTuningConfig(2, 1, 1, 1, init="text"), r"`init`='text'; expected one of"),
        (lambda: jaxpeft.PrefixTuningConfig(2, 1, 1, 1, encoder_hidden_size=4), r"set prefix_projection=True"),
        (lambda: jaxpeft.PrefixTuningConfig(2, 1, 1, 1, prefix_projection=1), r"`prefix_projection`=1; expected"),
    ],
)
def test_config_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_selection_errors(params):
    with pytest.raises(ValueError, match=r"selected 2 weights .* one input embedding table.*embed_tokens/embedding"):
        jaxpeft.init(jaxpeft.PromptTuningConfig(2, targets=r"(embed_tokens/embedding|lm_head/kernel)$"), params,
                     key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match=r"selected 'lm_head/kernel' .* \(a dense weight\); prefix tuning expects"):
        jaxpeft.init(jaxpeft.PrefixTuningConfig(2, 1, 1, 1, targets=r"lm_head/kernel$"), params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"`init_token_ids` \[99\] are outside the vocabulary of .* \(64 tokens\)"):
        jaxpeft.init(jaxpeft.PromptTuningConfig(2, init="text", init_token_ids=(99,)), params, key=jax.random.key(0))


def test_hook_errors(params):
    prompt = jaxpeft.init(CONFIGS["prompt"], params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"the prompt has shape \(3, 16\) but `embeds` are 32 wide"):
        MODEL.apply({"params": params}, IDS, prompt=jnp.zeros((3, 16)))
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 9\); expected \(batch, seq\) = \(2, 7\)"):
        MODEL.apply({"params": params}, IDS, jnp.ones((2, 9)), prompt=prompt)
    with pytest.raises(ValueError, match=r"`prompt` takes no `position_ids`"):
        MODEL.apply({"params": params}, IDS, position_ids=jnp.zeros((2, 7), jnp.int32), prompt=prompt)
    with pytest.raises(ValueError, match=r"`prompt` is a dict holding 0 PromptWeights nodes"):
        jaxpeft.prepend_prompt(jnp.zeros((2, 7, 32)), None, {"a": 1})
    with pytest.raises(ValueError, match=r"`embeds` has shape \(7, 32\); expected \(batch, seq, width\)"):
        jaxpeft.prepend_prompt(jnp.zeros((7, 32)), None, jnp.zeros((3, 32)))
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(7,\); expected \(batch, seq\)"):
        jaxpeft.extend_attention_mask(jnp.ones(7), 2)
    wrong = jaxpeft.init(jaxpeft.PrefixTuningConfig(N, 3, 2, 8), params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"expected \(layers, batch, n, kv_heads, head_dim\) = \(2, 2, n, 2, 8\).*"
                       r"num_layers=2, num_kv_heads=2, head_dim=8"):  # fmt: skip
        MODEL.apply({"params": params}, IDS, prefix=jaxpeft.prefix_kv(wrong, 2))
    prefix = jaxpeft.prefix_kv(jaxpeft.init(CONFIGS["prefix"], params, key=jax.random.key(0)), 2)
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(2, 10\); expected \(batch, seq\) = \(2, 7\)"):
        MODEL.apply({"params": params}, IDS, jnp.ones((2, 10)), prefix=prefix)
    with pytest.raises(ValueError, match=r"`prefix` with `cache`: write the prefix into the cache's first n slots"):
        MODEL.apply({"params": params}, IDS, prefix=prefix, cache=llama.init_cache(CFG, 2, 16), cache_index=0)
    with pytest.raises(ValueError, match=r"`prefix` is a dict holding 0 PrefixWeights nodes"):
        jaxpeft.prefix_kv(prompt, 2)


LAYOUT = jaxpeft.Layout(kind="embed")
PREFIX_NODE = jaxpeft.PrefixWeights(jnp.zeros((N, 64)), num_layers=2, num_kv_heads=2, head_dim=8, layout=LAYOUT)
PROMPT_NODE = jaxpeft.PromptWeights(jnp.zeros((N, 32)), LAYOUT)
EMBEDS = jnp.zeros((2, 7, 32))
SHAPE_ARGS = {  # the hooks' arguments that fix an array shape: static Python ints
    "batch_size": (lambda v: jaxpeft.prefix_kv(PREFIX_NODE, v), "positive"),
    "num_virtual_tokens": (lambda v: jaxpeft.extend_attention_mask(MASK, v), "non-negative"),
}


@pytest.mark.parametrize("arg", sorted(SHAPE_ARGS))
@pytest.mark.parametrize(
    ("value", "fault"),
    [(-2, r"=-2 is negative"), (2.0, r"=2.0 is a float"), (True, r"=True is a bool"), ("jit", r" is a jax.Array")],
    ids=["negative", "float", "bool", "traced"],
)
def test_shape_arguments_must_be_static_ints(arg, value, fault):
    call, kind = SHAPE_ARGS[arg]
    run = (lambda: jax.jit(call)(2)) if value == "jit" else (lambda: call(value))
    with pytest.raises(ValueError, match=rf"`{arg}`{fault}.*; expected a {kind} static Python int \(.*e\.g\. "):
        run()


def test_shape_arguments_edges():
    with pytest.raises(ValueError, match=r"`batch_size`=0 is zero; expected a positive static Python int"):
        jaxpeft.prefix_kv(PREFIX_NODE, 0)
    np.testing.assert_array_equal(jaxpeft.extend_attention_mask(MASK, 0), MASK)  # no virtual tokens: the mask
    assert jaxpeft.prefix_kv(PREFIX_NODE, np.int64(3))[0].shape == (2, 3, N, 2, 8)  # NumPy ints are static too


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: jaxpeft.extend_attention_mask([[1, 1]], 2), r"`attention_mask` is a list; expected an array \(batch"),
        (lambda: jaxpeft.extend_attention_mask(MASK.astype(jnp.complex64), 2),
         r"`attention_mask` has dtype complex64; expected bool, integer or floating .*mask.astype\(jnp.int32\)"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS, MASK.astype(jnp.complex64), PROMPT_NODE),
         r"`attention_mask` has dtype complex64"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS, MASK[None], PROMPT_NODE),
         r"`attention_mask` has shape \(1, 2, 7\); expected \(batch, seq\)"),
        (lambda: jaxpeft.prefix_kv(PREFIX_NODE, 2, jnp.int32), r"`dtype`=int32 is not floating; expected the model's"),
        (lambda: jaxpeft.prefix_kv(PREFIX_NODE, 2, "floaty"), r"`dtype`='floaty' is not a dtype; expected a floating"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS.astype(jnp.int32), None, PROMPT_NODE),
         r"`embeds` has dtype int32; expected the floating input embeddings .*not token ids"),
        (lambda: jaxpeft.prepend_prompt(list(EMBEDS), None, PROMPT_NODE), r"`embeds` is a list; expected an array"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS, None, jnp.zeros((N, 32), jnp.int32)),
         r"the prompt has dtype int32; expected floating virtual token embeddings .*embedded first"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS, None, "a prompt"), r"`prompt` is a str; expected an array"),
        (lambda: jaxpeft.prefix_kv(dataclasses.replace(PREFIX_NODE, num_layers=3), 2),
         r"`prefix` \(PrefixWeights\) has arrays \{'embeddings': \(3, 64\)\}; its num_layers=3, num_kv_heads=2, "
         r"head_dim=8 \(.* = 96 wide\) expect \{'embeddings': \(3, 96\)\}"),
    ],
    ids=["mask_list", "mask_complex", "prompt_mask_complex", "prompt_mask_rank", "dtype_int", "dtype_name",
         "embeds_int", "embeds_list", "prompt_int", "prompt_str", "prefix_node_statics"],
)  # fmt: skip
def test_hook_argument_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _stacked(tree: Any, n: int = 2) -> Any:
    return jax.tree.map(lambda x: jnp.stack([x] * n), tree)


def test_banked_or_foreign_adapters_are_refused_by_name(params):
    prompt = jaxpeft.init(CONFIGS["prompt"], params, key=jax.random.key(0))
    prefix = jaxpeft.init(CONFIGS["prefix_proj"], params, key=jax.random.key(0))
    lora = jaxpeft.init(jaxpeft.LoraConfig(rank=2, targets=r"lm_head/kernel$"), params, key=jax.random.key(0))
    node = _node(prompt)
    banked = jaxpeft.AdapterBank(_stacked(node), ("fr", "de"), layout=node.layout)
    bank = {"model": {"embed_tokens": {"embedding": banked}}}
    one = r"prompt tuning takes one prompt: select one with"
    cases = [
        (lambda: jaxpeft.prepend_prompt(EMBEDS, None, _stacked(prompt)),
         rf"`prompt` holds a bank of 2 prompts \(leading axis: embeddings \(2, 3, 32\)\); {one} jax.tree.map"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS, None, _stacked(node.embeddings, 4)), r"holds a bank of 4 prompts"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS, None, bank),
         rf"`prompt` holds a bank of 2 prompts \['fr', 'de'\] .*; {one} jaxpeft.select_adapter\(prompt, 'fr'\)"),
        (lambda: jaxpeft.prefix_kv(_stacked(prefix, 3), 2),
         r"`prefix` holds a bank of 3 prefixes \(leading axis: .*prefix tuning takes one prefix: select one"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS, None, prefix),
         r"holding 0 PromptWeights nodes among \[\('model/embed_tokens/embedding', 'PrefixWeights \(for "
         r"jaxpeft.prefix_kv\)'\)\]; expected a PromptWeights or .* PromptTuningConfig"),
        (lambda: jaxpeft.prefix_kv({"a": prefix, "b": _node(prefix)}, 2),
         r"`prefix` is a dict holding 2 PrefixWeights nodes among \[\('a/model/embed_tokens/embedding', 'PrefixWe"),
        (lambda: jaxpeft.prefix_kv(lora, 2), r"holding 0 PrefixWeights nodes among \[\('lm_head/kernel', 'LoraWeig"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS, None, {"a": prompt, "b": prompt}),
         r"holding 2 PromptWeights nodes among \[\('a/model/embed_tokens/embedding'"),
        (lambda: jaxpeft.prepend_prompt(EMBEDS, None, {"a": 1}),
         r"holding 0 PromptWeights nodes \(adapter tree entry 'a' is a int, not an adapter node"),
    ]  # fmt: skip
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()
    picked = jaxpeft.select_adapter(bank, "fr")  # the fix the bank message names works
    assert jaxpeft.prepend_prompt(EMBEDS, None, picked)[0].shape == (2, N + 7, 32)


def test_prompt_with_a_cache_generates_like_the_full_forward(params):
    """Prefill with the prompt (slots 0..n+T-1), then decode one token: same logits as the uncached forward."""
    adapters = jaxpeft.init(CONFIGS["prompt_vocab"], params, key=jax.random.key(0))
    cache = llama.init_cache(CFG, 2, N + 8)
    logits, cache = MODEL.apply({"params": params}, IDS, cache=cache, cache_index=0, prompt=adapters)
    np.testing.assert_allclose(logits, _logits(params, adapters, CONFIGS["prompt"], mask=None), atol=1e-5)
    nxt = jnp.argmax(logits[:, -1:], -1)
    step, _ = MODEL.apply({"params": params}, nxt, cache=cache, cache_index=N + 7)
    full = _logits(params, adapters, CONFIGS["prompt"], ids=jnp.concatenate([IDS, nxt], 1), mask=None)
    np.testing.assert_allclose(step[:, 0], full[:, -1], atol=1e-5)


# ------------------------------------------------------------------------------------------------ HF PEFT


def test_hf_export_refusals(params):
    adapters = jaxpeft.init(CONFIGS["prompt"], params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"\['target_modules'\] do not apply to PromptTuningConfig adapters"):
        hf.to_state_dict(adapters, CONFIGS["prompt"], params, None, target_modules=["q_proj"])  # type: ignore[arg-type]
    other = jaxpeft.init(CONFIGS["prefix"], params, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"a PromptTuningConfig makes one PromptWeights at 'model/embed_tokens/emb"):
        hf.to_state_dict(other, CONFIGS["prompt"], params, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"b1: adapters \(24,\), config nothing; .*embeddings: adapters \(3, 16\), "
                       r"config \(3, 64\);"):  # fmt: skip
        hf.to_state_dict(jaxpeft.init(CONFIGS["prefix_proj"], params, key=jax.random.key(0)), CONFIGS["prefix"],
                         params, None)  # type: ignore[arg-type]  # fmt: skip


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (jaxpeft.PrefixTuningConfig(N, 2, 8, 2), r"num_kv_heads: adapters 2, config 8; head_dim: adapters 8, config 2"),
        (jaxpeft.PrefixTuningConfig(N, 1, 2, 16), r"num_layers: adapters 2, config 1; head_dim: adapters 8, config 16"),
        (jaxpeft.PrefixTuningConfig(4, 2, 2, 8),
         r"embeddings: adapters \(3, 64\), config \(4, 64\) \(embeddings are \(num_virtual_tokens, num_layers"),
    ],
    ids=["heads_and_head_dim_swapped", "num_layers", "num_virtual_tokens"],
)  # fmt: skip
def test_hf_export_checks_the_config_against_the_adapters(params, cfg, match, tmp_path):
    """Swapped heads and head_dim give a flat prefix of the same shape: the export refuses it, as a checkpoint
    restore does, rather than writing num_attention_heads=8."""
    adapters = jaxpeft.init(CONFIGS["prefix"], params, key=jax.random.key(0))
    refusal = r"the adapters at 'model/embed_tokens/embedding' are not what this PrefixTuningConfig makes on these "
    with pytest.raises(ValueError, match=rf"{refusal}params: {match}.*Nothing was written: pass the config"):
        hf.export_adapters(tmp_path, adapters, cfg, params, None)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_hf_import_refusals(params):
    config, tensors = hf.to_state_dict(
        jaxpeft.init(CONFIGS["prefix"], params, key=jax.random.key(0)),
        CONFIGS["prefix"],
        params,
        None,  # type: ignore[arg-type]
    )
    cases = [
        ({**config, "num_transformer_submodules": 2}, tensors, r"`num_transformer_submodules`=2; .* decoder-only"),
        (
            {**config, "new_field": 3},
            tensors,
            r"sets `new_field`=3, which PEFT 0.21.2's PrefixTuningConfig does not have",
        ),
        (
            {**config, "num_layers": 3},
            tensors,
            r"'prompt_embeddings' has shape \(3, 64\); the adapter_config.json says",
        ),
        ({**config, "num_attention_heads": 3}, tensors, r"`token_dim`=16 and `num_attention_heads`=3"),
        (config, {**tensors, "x": tensors["prompt_embeddings"]}, r"PEFT saves exactly one, 'prompt_embeddings'"),
        ({**config, "num_virtual_tokens": 0}, tensors, r"`num_virtual_tokens`=0; expected a positive integer"),
    ]
    for cfg_dict, tens, match in cases:
        with pytest.raises(ValueError, match=match):
            hf.from_state_dict(cfg_dict, tens, params, None)  # type: ignore[arg-type]
    prompt_config = {**config, "peft_type": "PROMPT_TUNING", "token_dim": 16, "num_layers": None}
    prompt_config = {k: v for k, v in prompt_config.items() if k not in ("encoder_hidden_size", "prefix_projection")}
    with pytest.raises(ValueError, match=r"`token_dim`=16 but the embedding table .* is 32 wide"):
        hf.from_state_dict(prompt_config, {"prompt_embeddings": np.zeros((3, 16), np.float32)}, params, None)  # type: ignore[arg-type]


def _torch_pair(directory: Any) -> tuple[Any, Any]:
    torch_model, _, params = tiny_llama_pair(directory)
    return torch_model, params


@pytest.fixture(scope="module")
def torch_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    pytest.importorskip("peft")
    return _torch_pair(tmp_path_factory.mktemp("llama"))


def _peft_logits(peft_model: Any, ids: jax.Array, mask: jax.Array) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = peft_model(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)))
    return out.logits.numpy()


@pytest.mark.parametrize("kind", ["prefix_proj"])  # the other kinds: tests/test_hf_codecs.py
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_hf_peft_adapter_imports_with_equal_logits(torch_pair, kind, tmp_path):
    import peft
    import torch

    torch_model, params = torch_pair
    torch.manual_seed(1)
    if kind == "prompt":
        pc = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    else:
        pc = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=kind != "prefix")
    model = peft.get_peft_model(torch_model, pc)
    theirs = _peft_logits(model.eval(), IDS, MASK)
    model.save_pretrained(tmp_path)
    cfg, adapters = hf.import_adapters(tmp_path, params, None)  # type: ignore[arg-type]
    assert type(cfg) is (jaxpeft.PromptTuningConfig if kind == "prompt" else jaxpeft.PrefixTuningConfig)
    assert jaxpeft.plan(cfg, params).n_params == sum(x.size for x in jax.tree.leaves(adapters))
    n = N if kind == "prompt" else 0
    ours = np.asarray(_logits(params, adapters, cfg))
    assert np.max(np.abs(ours - theirs[:, n:])) < 1e-4


# ------------------------------------------------------------------------------------------------ example


def test_example_trains_and_the_loss_drops():
    """``--method prefix`` (the prompt path differs in one line, checked by the gradient and semantics tests)."""
    from examples import prompt_tuning

    out = prompt_tuning.main(["--method", "prefix", "--steps", "30", "--lr", "5e-2"])
    assert out["last"] < out["first"] - 0.3


def test_nnx_hook():
    """The hook in an NNX model: init on its pure state, train the prompt with jax.grad, the base unchanged."""
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed_tokens = nnx.Embed(16, 8, rngs=rngs)
            self.head = nnx.Linear(8, 16, rngs=rngs)

        def __call__(self, ids: jax.Array, prompt: Any = None) -> jax.Array:
            x = self.embed_tokens(ids)
            n = 0
            if prompt is not None:
                x, _ = jaxpeft.prepend_prompt(x, None, prompt)
                n = x.shape[1] - ids.shape[1]
            x = jnp.cumsum(x, axis=1)  # a causal mixer, so the prompt reaches every position
            return self.head(x)[:, n:]

    model = Tiny(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    cfg = jaxpeft.PromptTuningConfig(2, init="text", init_token_ids=(3, 4))
    adapters = jaxpeft.init(cfg, params, key=jax.random.key(0))
    ids = jnp.asarray([[1, 2, 5]])
    np.testing.assert_allclose(model(ids, adapters), model(jnp.asarray([[3, 4, 1, 2, 5]]))[:, 2:], atol=1e-6)
    grads = jax.grad(lambda a: jnp.sum(model(ids, a) ** 2))(adapters)
    assert float(jnp.max(jnp.abs(grads["embed_tokens"]["embedding"].embeddings))) > 0


def test_default_targets_name_the_usual_tables():
    import re

    for path in ("model/embed_tokens/embedding", "embeddings/word_embeddings/embedding", "transformer/wte/embedding"):
        assert re.search(INPUT_EMBEDDINGS, path)
    assert not re.search(INPUT_EMBEDDINGS, "embeddings/position_embeddings/embedding")


def test_example_refuses_projection_without_prefix(capsys):
    from examples import prompt_tuning

    with pytest.raises(SystemExit):
        prompt_tuning.main(["--method", "prompt", "--projection"])
    assert "`--projection` reparameterises prefix tuning only" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["prompt_vocab", "prompt_text"])
def test_hf_export_of_a_value_reading_init_works_on_shape_only_params(params, name, tmp_path):
    """An init that reads the table's values (sample_vocab, text) is not re-run for the export's shape check, so
    shape-only params (a jax.eval_shape of the base) export like concrete ones."""
    cfg = CONFIGS[name]
    adapters = jaxpeft.init(cfg, params, key=jax.random.key(0))
    shapes = jax.eval_shape(lambda: params)
    config, tensors = hf.to_state_dict(adapters, cfg, shapes, None)  # type: ignore[arg-type]
    same_config, same_tensors = hf.to_state_dict(adapters, cfg, params, None)  # type: ignore[arg-type]
    assert config == same_config
    np.testing.assert_array_equal(tensors["prompt_embeddings"], same_tensors["prompt_embeddings"])
