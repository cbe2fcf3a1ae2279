"""Autoregressive generation with a KV cache for the Llama example model: one prefill call, then a jitted loop.

The model call is a pluggable ``apply_fn``, so generation runs through jaxpeft adapters without merging them:

    apply_fn = lambda pa, *a, **kw: jaxpeft.linen.apply(model, {"params": pa[0]}, pa[1], *a, **kw)
    new_tokens = generate(apply_fn, (params, adapters), prompt_ids, 32, config=config, eos_id=tok.eos_id)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from examples.models.llama import LlamaConfig, init_cache

ApplyFn = Callable[..., tuple[jax.Array, Any]]
"""``apply_fn(params, input_ids, *, attention_mask, position_ids, cache, cache_index) -> (logits, new_cache)``,
e.g. ``lambda p, *a, **kw: model.apply({"params": p}, *a, **kw)`` for a ``LlamaForCausalLM``."""


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
    *,
    max_new_tokens: int,
    config: LlamaConfig,
    eos_id: int | None,
    temperature: float,
    top_k: int | None,
    pad_id: int,
) -> jax.Array:
    batch, prompt_len = prompt_ids.shape
    attention_mask = attention_mask.astype(jnp.int32)
    slots_mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
    lengths = jnp.sum(attention_mask, axis=1)
    cache = init_cache(config, batch, prompt_len + max_new_tokens)
    logits, cache = apply_fn(
        params, prompt_ids, attention_mask=slots_mask, position_ids=positions, cache=cache, cache_index=0
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
            cache_index=prompt_len + step,
        )
        return step + 1, logits[:, -1], cache, tokens, done

    return jax.lax.while_loop(cond, body, state)[3]


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

    Returns:
        The new tokens ``[batch, max_new_tokens]`` (int32), without the prompt.

    Raises:
        ValueError: On invalid settings, a mask that is not left padding, or a row with no real token.
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
    return _generate(
        apply_fn,
        params,
        prompt_ids,
        jnp.asarray(attention_mask, jnp.int32),
        key if temperature > 0 else None,
        max_new_tokens=max_new_tokens,
        config=config,
        eos_id=eos_id,
        temperature=float(temperature),
        top_k=top_k,
        pad_id=pad_id,
    )


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
