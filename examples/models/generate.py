"""Autoregressive generation with a KV cache for the Llama example model: one prefill call, then a jitted loop.

The model call is a pluggable ``apply_fn``, so generation runs through jaxpeft adapters without merging them:

    apply_fn = lambda pa, *a, **kw: jaxpeft.linen.apply(model, {"params": pa[0]}, pa[1], *a, **kw)
    new_tokens = generate(apply_fn, (params, adapters), prompt_ids, 32, config=config, eos_id=tok.eos_id)

Serving several adapters in one batch (every row, i.e. every request, with its own adapter):

- layer-call methods (LoRA, DoRA, IA3, ...): ``bank = jaxpeft.stack_adapters(named)`` passed through ``params``
  and ``adapter_ids=jaxpeft.adapter_ids(bank, row_names)``, forwarded to every ``apply_fn`` call;
- prompt tuning: ``prompt=stack_prompts(named, config)[ids]`` (each row's virtual tokens ``[batch, n, hidden]``);
- prefix tuning: ``prefix=pick_rows(stack_prefixes(named, config), ids)`` (each row's keys and values).

One adapter for every row is the same call with a single adapter tree (``prompt=adapters``, ``prefix=adapters``).
The virtual tokens and the prefix occupy the first ``n`` cache slots, so every decode step attends to them.
:func:`replace_adapter` swaps one adapter of a live bank without changing any shape: the decode program is reused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

import jaxpeft
from examples.models.llama import LlamaConfig, init_cache

ApplyFn = Callable[..., tuple[jax.Array, Any]]
"""``apply_fn(params, input_ids, *, attention_mask, position_ids, cache, cache_index) -> (logits, new_cache)``,
e.g. ``lambda p, *a, **kw: model.apply({"params": p}, *a, **kw)`` for a ``LlamaForCausalLM``. It also receives
``adapter_ids=`` when :func:`generate` is given ``adapter_ids``, and ``prompt=`` (with a cache, no
``attention_mask``/``position_ids``) when it is given a prompt-tuning ``prompt``: pass keyword arguments through."""


class Tokenizer(Protocol):
    """What :func:`generate_text` needs of a tokenizer (``gguf.GGUFTokenizer`` has it)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


def _pick(logits: jax.Array, key: jax.Array | None, temperature: float, top_k: int | None) -> jax.Array:
    """Next token ``[batch]`` from last-position logits ``[batch, vocab]``: argmax, or a temperature/top-k sample."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("apply_fn", "max_new_tokens", "config", "eos_id", "temperature", "top_k", "pad_id"),
)
def _generate(
    apply_fn: ApplyFn,
    params: Any,
    prompt_ids: jax.Array,
    attention_mask: jax.Array,
    key: jax.Array | None,
    adapter_ids: jax.Array | None,
    prompt: jax.Array | None,
    prefix: tuple[jax.Array, jax.Array] | None,
    *,
    max_new_tokens: int,
    config: LlamaConfig,
    eos_id: int | None,
    temperature: float,
    top_k: int | None,
    pad_id: int,
) -> jax.Array:
    batch, prompt_len = prompt_ids.shape
    ids_kw = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
    virtual = _virtual_slots(apply_fn, params, adapter_ids, prompt, prefix, config)
    n_virtual = 0 if virtual is None else virtual[0].shape[2]
    attention_mask = attention_mask.astype(jnp.int32)
    slots_mask = jnp.concatenate(
        [jnp.ones((batch, n_virtual), jnp.int32), attention_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1
    )
    positions = n_virtual + jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    lengths = n_virtual + jnp.sum(attention_mask, axis=1)
    cache = init_cache(config, batch, n_virtual + prompt_len + max_new_tokens)
    if virtual is not None:  # slots 0..n-1: the virtual tokens' keys and values (or the prefix), then the prompt
        cache = {
            n: cache[n].at[:, :, :n_virtual].set(kv.astype(cache[n].dtype)) for n, kv in zip("kv", virtual, strict=True)
        }
    logits, cache = apply_fn(
        params,
        prompt_ids,
        attention_mask=slots_mask,
        position_ids=positions,
        cache=cache,
        cache_index=n_virtual,
        **ids_kw,
    )
    state = (
        jnp.int32(0),
        logits[:, -1],
        cache,
        jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        jnp.zeros((batch,), bool),
    )

    def cond(state: tuple[Any, ...]) -> jax.Array:
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        step, last, cache, tokens, done = state
        step_key = None if key is None else jax.random.fold_in(key, step)
        token = jnp.where(done, pad_id, _pick(last, step_key, temperature, top_k))
        tokens = tokens.at[:, step].set(token)
        if eos_id is not None:
            done = done | (token == eos_id)
        logits, cache = apply_fn(
            params,
            token[:, None],
            attention_mask=slots_mask,
            position_ids=(lengths + step)[:, None],
            cache=cache,
            cache_index=n_virtual + prompt_len + step,
            **ids_kw,
        )
        return step + 1, logits[:, -1], cache, tokens, done

    return jax.lax.while_loop(cond, body, state)[3]


def _virtual_slots(
    apply_fn: ApplyFn,
    params: Any,
    adapter_ids: jax.Array | None,
    prompt: jax.Array | None,
    prefix: tuple[jax.Array, jax.Array] | None,
    config: LlamaConfig,
) -> tuple[jax.Array, jax.Array] | None:
    """The keys and values ``[layers, batch, n, kv_heads, head_dim]`` of the cache's first ``n`` slots, or None.

    A prefix is those keys and values already. Prompt tuning's virtual tokens are run through the model, each row's
    own (``prompt`` ``[batch, n, hidden]``, under ``jax.vmap`` since the model's ``prompt=`` hook takes one prompt
    per call) with that row's adapter id, in a cache of ``n + 1`` slots behind one placeholder token: causal attention
    makes slots ``0..n-1`` independent of it, and they hold exactly what a full forward with ``prompt=`` computes
    for positions ``0..n-1``.
    """
    if prefix is not None:
        return prefix
    if prompt is None:
        return None
    n = prompt.shape[1]
    row_ids = adapter_ids is not None and adapter_ids.ndim == 1

    def one(row_prompt: jax.Array, row_id: Any) -> tuple[jax.Array, jax.Array]:
        ids_kw = {} if adapter_ids is None else {"adapter_ids": row_id[None] if row_ids else adapter_ids}
        _, cache = apply_fn(
            params,
            jnp.zeros((1, 1), jnp.int32),
            cache=init_cache(config, 1, n + 1),
            cache_index=0,
            prompt=row_prompt,
            **ids_kw,
        )
        return cache["k"][:, 0, :n], cache["v"][:, 0, :n]

    keys, values = jax.vmap(one, in_axes=(0, 0 if row_ids else None))(prompt, adapter_ids if row_ids else None)
    return jnp.swapaxes(keys, 0, 1), jnp.swapaxes(values, 0, 1)  # [batch, layers, ...] -> [layers, batch, ...]


def generate(
    apply_fn: ApplyFn,
    params: Any,
    prompt_ids: jax.Array | np.ndarray,
    max_new_tokens: int,
    *,
    config: LlamaConfig,
    attention_mask: jax.Array | np.ndarray | None = None,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    pad_id: int = 0,
    adapter_ids: jax.Array | np.ndarray | int | None = None,
    prompt: Any = None,
    prefix: Any = None,
) -> jax.Array:
    """Generates ``max_new_tokens`` tokens after each prompt, with a KV cache.

    The prompts are run in one prefill call that fills the cache; then a ``jax.lax.while_loop`` feeds one token per
    step. Each row stops at its first ``eos_id`` (which is kept); the loop ends early once every row has stopped.
    Greedy when ``temperature`` is 0 (same tokens as an argmax loop over full-sequence forwards without cache);
    otherwise it samples from ``softmax(logits / temperature)`` (restricted to the ``top_k`` largest logits if
    given) with ``jax.random.fold_in(key, step)``, so the same key gives the same tokens.

    Batches of different prompt lengths must be **left-padded**: ``attention_mask`` ``[batch, prompt_len]`` is 1
    on real tokens and 0 on the leading padding; positions then count real tokens only, so a padded row gives the
    same tokens as that prompt alone. Without a mask every prompt token is real.

    The whole function is one ``jax.jit`` with ``apply_fn`` (and the settings) static: keep one ``apply_fn`` object
    (not a fresh lambda per call) so repeated calls reuse the compiled program. Pass adapters through ``params``
    rather than closing over them, e.g. ``params=(base, adapters)`` with
    ``apply_fn = lambda pa, *a, **kw: jaxpeft.linen.apply(model, {"params": pa[0]}, pa[1], *a, **kw)``.

    **Several adapters, one per row** (serving): ``adapter_ids`` is forwarded to every ``apply_fn`` call, so a bank
    (``jaxpeft.stack_adapters``) in ``params`` runs row ``i`` with adapter ``adapter_ids[i]``. ``prompt`` (prompt
    tuning) and ``prefix`` (prefix tuning) take one adapter for every row or one per row (:func:`stack_prompts`,
    :func:`stack_prefixes`, :func:`pick_rows`). Either way they fill the first ``n`` cache slots before the prefill:
    a prefix is written there as it is, and the virtual tokens are run through the model (with the row's adapter id)
    at positions ``0..n-1``; the prompt then takes positions ``n..`` (counting real tokens only) and every decode
    step attends to those slots. Each row gets exactly the tokens it gets alone with its adapter (greedy), the same
    as an argmax loop over full forwards with ``prompt=`` / ``prefix=`` (the Llama's hooks, HF PEFT's positions).
    Adapters, ids, prompts and prefixes are traced data: new values of the same shapes never recompile.

    Args:
        apply_fn: ``apply_fn(params, input_ids, *, attention_mask, position_ids, cache, cache_index)`` returning
            ``(logits, new_cache)`` (``LlamaForCausalLM``'s cache contract, see :func:`llama.init_cache`).
        params: Whatever ``apply_fn`` takes first (a pytree).
        prompt_ids: ``[batch, prompt_len]`` int token ids, left-padded.
        max_new_tokens: Number of tokens to generate.
        config: The model config (cache shapes).
        attention_mask: Optional ``[batch, prompt_len]`` mask of real tokens (left padding only).
        eos_id: Token that ends a row; None generates ``max_new_tokens`` for every row.
        temperature: 0 for greedy decoding, > 0 to sample.
        top_k: Sample only among the ``top_k`` most likely tokens (needs ``temperature`` > 0).
        key: PRNG key, required when sampling.
        pad_id: Fills a row's slots after its ``eos_id``.
        adapter_ids: Which adapter of a bank runs: shape ``()`` for every row, ``(batch,)`` one per row
            (``jaxpeft.adapter_ids(bank, names)``); passed to ``apply_fn`` as ``adapter_ids=``, and picks each row's
            adapter in the prompt-tuning pass over the virtual tokens.
        prompt: Prompt tuning: a ``jaxpeft.PromptTuningConfig`` adapter tree (or its ``PromptWeights``, or an array
            ``[n, hidden]``) for every row, or ``[batch, n, hidden]``, row ``i``'s virtual tokens in row ``i``
            (``stack_prompts(named, config)[ids]``).
        prefix: Prefix tuning: a ``jaxpeft.PrefixTuningConfig`` adapter tree (or its ``PrefixWeights``) for every row,
            or ``(keys, values)``, each ``[layers, batch, n, kv_heads, head_dim]`` (``jaxpeft.prefix_kv``, or
            ``pick_rows(stack_prefixes(named, config), ids)`` for one prefix per row).

    Returns:
        The new tokens ``[batch, max_new_tokens]`` (int32), without the prompt.

    Raises:
        ValueError: On invalid settings, a mask that is not left padding, a row with no real token, both ``prompt``
            and ``prefix``, ``adapter_ids`` that are not integers of shape ``()`` or ``(batch,)``, or a prompt or
            prefix whose shape does not fit the batch and model (from ``jaxpeft.prepend_prompt`` /
            ``jaxpeft.prefix_kv`` for adapter trees).
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"`prompt_ids` has shape {tuple(prompt_ids.shape)}; expected [batch, prompt_len >= 1].")
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens`={max_new_tokens}; expected at least 1.")
    if temperature < 0:
        raise ValueError(f"`temperature`={temperature}; expected 0 (greedy) or a positive value.")
    if temperature > 0 and key is None:
        raise ValueError("`temperature` > 0 samples and needs `key`, e.g. key=jax.random.key(0).")
    if top_k is not None and (temperature == 0 or not 1 <= top_k <= config.vocab_size):
        raise ValueError(f"`top_k`={top_k} needs temperature > 0 and 1 <= top_k <= vocab_size={config.vocab_size}.")
    if attention_mask is None:
        attention_mask = jnp.ones(prompt_ids.shape, jnp.int32)
    else:
        _check_left_padded(attention_mask, prompt_ids.shape)
    batch = prompt_ids.shape[0]
    if prompt is not None and prefix is not None:
        raise ValueError(
            "`prompt` and `prefix` were both given; a request runs prompt tuning or prefix tuning, not both: pass one."
        )
    return _generate(
        apply_fn,
        params,
        prompt_ids,
        jnp.asarray(attention_mask, jnp.int32),
        key if temperature > 0 else None,
        None if adapter_ids is None else _checked_ids(adapter_ids, batch),
        None if prompt is None else _prompt_rows(prompt, batch, config),
        None if prefix is None else _prefix_rows(prefix, batch, config),
        max_new_tokens=max_new_tokens,
        config=config,
        eos_id=eos_id,
        temperature=float(temperature),
        top_k=top_k,
        pad_id=pad_id,
    )


def _checked_ids(adapter_ids: Any, batch: int) -> jax.Array:
    """``adapter_ids`` as int32 of shape ``()`` or ``(batch,)`` (range checks: the bank's, in ``apply_fn``)."""
    ids = jnp.asarray(adapter_ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.shape not in ((), (batch,)):
        raise ValueError(
            f"`adapter_ids` has dtype {ids.dtype} and shape {tuple(ids.shape)}; expected integers of shape () (one "
            f"adapter for every row) or (batch,) = ({batch},) (one per row), e.g. jaxpeft.adapter_ids(bank, names)."
        )
    return ids.astype(jnp.int32)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _prompt_rows(prompt: Any, batch: int, config: LlamaConfig) -> jax.Array:
    """Each row's virtual tokens ``[batch, n, hidden]``: one prompt (tree, node, ``[n, hidden]``) broadcast, or rows."""
    if _is_array(prompt) and prompt.ndim == 3:
        shape = tuple(prompt.shape)
        if shape[0] != batch or shape[2] != config.hidden_size or not jnp.issubdtype(prompt.dtype, jnp.floating):
            raise ValueError(
                f"`prompt` has shape {shape} and dtype {prompt.dtype}; one prompt per row is a floating "
                f"[batch, n, hidden] = [{batch}, n, {config.hidden_size}] array. To pick rows from stacked prompts "
                "[adapters, n, hidden] index them: stack_prompts(named, config)[ids]."
            )
        return jnp.asarray(prompt)
    table = _prompt_table(prompt, config)
    return jnp.broadcast_to(table[None], (batch, *table.shape))


def _prompt_table(prompt: Any, config: LlamaConfig) -> jax.Array:
    """One prompt's virtual tokens ``[n, hidden]`` (float32), read and checked by the public hook."""
    empty = jnp.zeros((1, 0, config.hidden_size), jnp.float32)
    table, _ = jaxpeft.prepend_prompt(empty, None, prompt)  # checks the width, refuses banks and other trees
    return table[0]


def _prefix_rows(prefix: Any, batch: int, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """Each row's prefix ``(keys, values)`` ``[layers, batch, n, kv_heads, head_dim]``, in the cache dtype."""
    dtype = jnp.dtype(config.dtype)
    if not isinstance(prefix, tuple):
        keys, values = jaxpeft.prefix_kv(prefix, batch, dtype)
    elif len(prefix) == 2:
        keys, values = jnp.asarray(prefix[0]), jnp.asarray(prefix[1])
    else:
        keys = values = jnp.zeros(())  # reported below as shapes () and ()
    expected = (config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim)
    shapes = [tuple(getattr(x, "shape", ())) for x in (keys, values)]
    if len(shapes[0]) != 5 or (shapes[0][:2], shapes[0][3:]) != (expected[:2], expected[2:]) or shapes[1] != shapes[0]:
        raise ValueError(
            f"`prefix` keys and values have shapes {shapes[0]} and {shapes[1]}; expected (layers, batch, n, kv_heads, "
            f"head_dim) = ({expected[0]}, {batch}, n, {expected[2]}, {expected[3]}) for both: a PrefixTuningConfig "
            "adapter tree for every row, jaxpeft.prefix_kv(adapters, batch), or pick_rows(stack_prefixes(named, "
            "config), ids) for one prefix per row."
        )
    return keys.astype(dtype), values.astype(dtype)


def stack_prompts(named: Mapping[str, Any], config: LlamaConfig) -> jax.Array:
    """The virtual tokens of several prompt-tuning adapters, stacked: ``[len(named), n, hidden]`` (float32).

    Row ``i`` of a batch runs adapter ``ids[i]`` (its position in ``named``) with
    ``generate(..., prompt=stack_prompts(named, config)[ids])``. Replacing one adapter is
    ``stacked.at[k].set(...)``: same shape, no recompilation.

    Args:
        named: ``{name: prompt-tuning adapter tree}`` (or ``PromptWeights``, or ``[n, hidden]`` arrays).
        config: The model config (the embedding width the prompts must have).

    Raises:
        ValueError: An empty mapping, a prompt that is not this model's width (``jaxpeft.prepend_prompt``'s
            error), or prompts of different lengths (names both).
    """
    tables = _named_tables(named, lambda tree: _prompt_table(tree, config), "prompts")
    return jnp.stack(list(tables.values()))


def stack_prefixes(named: Mapping[str, Any], config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """The keys and values of several prefix-tuning adapters, stacked on the batch axis:
    ``[layers, len(named), n, kv_heads, head_dim]`` each, in ``config.dtype``; :func:`pick_rows` picks one per row.

    Raises:
        ValueError: An empty mapping, a tree without one prefix (``jaxpeft.prefix_kv``'s error), prefixes of
            different lengths (names both), or a prefix made for another model's attention shape.
    """
    kvs = _named_tables(named, lambda tree: _prefix_rows(tree, 1, config), "prefixes")
    keys, values = zip(*kvs.values(), strict=True)
    return jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)


def _named_tables(named: Mapping[str, Any], read: Callable[[Any], Any], what: str) -> dict[str, Any]:
    if not isinstance(named, Mapping) or not named:
        raise ValueError(f"`named` must be a non-empty mapping {{name: adapter tree}} of {what}; got {named!r:.60}.")
    tables = {name: read(tree) for name, tree in named.items()}
    shapes = {name: tuple(jax.tree.leaves(t)[0].shape) for name, t in tables.items()}
    first = next(iter(shapes))
    odd = next((n for n, shape in shapes.items() if shape != shapes[first]), None)
    if odd is not None:
        raise ValueError(
            f"{what} {first!r} and {odd!r} have shapes {shapes[first]} and {shapes[odd]}; stacked {what} need one "
            "num_virtual_tokens (and width). Make them with one config, or serve them in separate batches."
        )
    return tables


def pick_rows(stacked: tuple[jax.Array, jax.Array], ids: Any) -> tuple[jax.Array, jax.Array]:
    """Each row's prefix from :func:`stack_prefixes`: ``(keys[:, ids], values[:, ids])``."""
    ids = jnp.asarray(ids, jnp.int32)
    return stacked[0][:, ids], stacked[1][:, ids]


def replace_adapter(bank: Any, name: str, adapters: Any) -> dict[str, Any]:
    """The bank tree ``bank`` (``jaxpeft.stack_adapters``) with adapter ``name`` replaced by ``adapters``.

    Guarantees: the result has the bank's tree structure and shapes (checked), so a jitted function that took
    ``bank`` (such as :func:`generate`) runs it without recompiling; the other adapters are unchanged (a LoRA
    adapter of another rank or scale is padded / folded as ``jaxpeft.stack_adapters`` does, which is exact).

    Raises:
        ValueError: ``name`` is not in the bank (lists its names); the replacement would change the bank's
            structure or shapes (names the changed arrays), e.g. a larger LoRA rank than the bank holds, another
            method or another LoRA scale in a bank of one scale.
    """
    named = jaxpeft.unstack_adapters(bank)
    if name not in named:
        raise ValueError(f"`name`={name!r} is not in the bank; it holds {list(named)}.")
    new = jaxpeft.stack_adapters({**named, name: adapters})
    old_shapes, new_shapes = _leaf_shapes(bank), _leaf_shapes(new)
    if old_shapes != new_shapes or str(jax.tree.structure(new)) != str(jax.tree.structure(bank)):
        changed = sorted(set(old_shapes.items()) ^ set(new_shapes.items()))[:2]
        what = f"array shapes ({changed})" if changed else "static parts (e.g. a LoRA scale, dropout, the method)"
        raise ValueError(
            f"replacing {name!r} changes the bank's {what}, so everything jitted over it would recompile. Give an "
            "adapter made with the bank's config (same method and hyper-parameters, a LoRA rank no larger), or "
            "restack on purpose with jaxpeft.stack_adapters."
        )
    return new


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(k): tuple(x.shape) for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_left_padded(attention_mask: Any, shape: tuple[int, ...]) -> None:
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected {tuple(shape)}.")
    try:
        mask = np.asarray(attention_mask).astype(bool)
    except jax.errors.TracerArrayConversionError:  # called under jit: the mask is not known yet
        return
    if not mask[:, -1].all() or (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError(
            "`attention_mask` must be left padding: zeros then ones in every row, with the last token real. "
            "Fix: pad prompts on the left (see left_pad)."
        )


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a batch: ``(ids [batch, longest], attention_mask [batch, longest])`` (int32)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("`sequences` must be a non-empty list of non-empty token lists.")
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, np.int32)
    mask = np.zeros((len(sequences), longest), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, longest - len(seq) :] = seq
        mask[row, longest - len(seq) :] = 1
    return ids, mask


def generate_text(
    apply_fn: ApplyFn,
    params: Any,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    config: LlamaConfig,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    key: jax.Array | None = None,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Tokenizes ``prompts``, left-pads them into one batch, runs :func:`generate` and decodes the new tokens.

    Each completion is cut after its ``eos_id`` (the eos itself is dropped when ``skip_special_tokens``).

    Returns:
        One completion string per prompt (without the prompt).
    """
    ids, mask = left_pad([tokenizer.encode(p) for p in prompts], pad_id=0)
    tokens = np.asarray(
        generate(
            apply_fn,
            params,
            ids,
            max_new_tokens,
            config=config,
            attention_mask=mask,
            eos_id=eos_id,
            temperature=temperature,
            top_k=top_k,
            key=key,
        )
    )
    texts = []
    for row in tokens.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        texts.append(tokenizer.decode(row, skip_special_tokens=skip_special_tokens))
    return texts
