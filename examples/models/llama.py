"""Llama-style decoder in Flax Linen whose parameter paths mirror Hugging Face ``LlamaForCausalLM``."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import jaxpeft
from examples.models._common import (
    attend,
    attention_probs,
    checkpoint_to_params,
    decoder_module_name,
    decoder_module_path,
    params_to_checkpoint,
    read_config_json,
    read_safetensors_dir,
    resolve_dtype,
)

_ROPE_TYPES = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder (field names follow Hugging Face ``LlamaConfig``).

    Attributes:
        vocab_size: Vocabulary size.
        hidden_size: Model width.
        intermediate_size: Width of the SwiGLU MLP.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads (grouped-query attention); defaults to
            ``num_attention_heads``.
        head_dim: Width of one head; defaults to ``hidden_size // num_attention_heads``.
        rms_norm_eps: Epsilon of the RMS norms.
        rope_theta: RoPE base frequency.
        rope_type: ``"default"`` or ``"llama3"`` (frequency scaling of Llama 3.1+).
        rope_factor: ``llama3`` scaling factor.
        rope_low_freq_factor: ``llama3`` low frequency factor.
        rope_high_freq_factor: ``llama3`` high frequency factor.
        rope_original_max_position_embeddings: ``llama3`` original context length.
        tie_word_embeddings: Whether the output projection reuses the token embedding.
        max_position_embeddings: Longest sequence the model was trained for (informational).
        attention_bias: Whether q/k/v/o projections have biases.
        mlp_bias: Whether the MLP projections have biases.
        attention_dropout: Dropout rate on attention weights (used only when ``deterministic=False``).
        initializer_range: Standard deviation of the normal initializer of kernels and embeddings.
        dtype: Computation dtype name.
        param_dtype: Parameter dtype name.
        remat: Whether to rematerialize (``nn.remat``) each decoder layer in the backward pass.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}."
            )
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; use one of {_ROPE_TYPES}.")
        resolve_dtype(self.dtype, "dtype")
        resolve_dtype(self.param_dtype, "param_dtype")

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """Builds a config from the contents of a Hugging Face Llama ``config.json``.

        Both the transformers 4 layout (``rope_theta`` + ``rope_scaling``) and the transformers 5 layout
        (``rope_parameters``) are understood.

        Args:
            d: The parsed ``config.json``.
            **overrides: Fields to set regardless of ``d``, e.g. ``dtype="bfloat16"`` or ``remat=True``.

        Returns:
            The config.

        Raises:
            ValueError: If ``d`` describes something this model cannot reproduce.
        """
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json has model_type={model_type!r}; LlamaConfig expects 'llama'.")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json has hidden_act={act!r}; this Llama implementation supports 'silu'.")
        rope: dict[str, Any] = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        kwargs: dict[str, Any] = {
            "rope_theta": float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            "rope_type": rope_type,
        }
        if rope_type == "llama3":
            kwargs.update(
                rope_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rms_norm_eps",
            "tie_word_embeddings",
            "max_position_embeddings",
            "attention_bias",
            "mlp_bias",
            "attention_dropout",
            "initializer_range",
        ):
            if d.get(name) is not None:
                kwargs[name] = d[name]
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **overrides: Any) -> LlamaConfig:
        """Reads a Hugging Face ``config.json`` (the file or its directory); see :meth:`from_hf_dict`."""
        return cls.from_hf_dict(read_config_json(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """Returns a Hugging Face ``config.json`` dict for this model (read back by :meth:`from_hf_dict`).

        RoPE settings are written both as ``rope_parameters`` (transformers 5) and as ``rope_theta`` /
        ``rope_scaling`` (transformers 4). ``dtype``, ``param_dtype`` and ``remat`` are JAX-side settings and
        are not written.
        """
        rope: dict[str, Any] = {"rope_type": self.rope_type}
        if self.rope_type == "llama3":
            rope.update(
                factor=self.rope_factor,
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_type == "default" else dict(rope),
            "rope_parameters": {"rope_theta": self.rope_theta, **rope},
        }


def _dense(config: LlamaConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=resolve_dtype(config.dtype, "dtype"),
        param_dtype=resolve_dtype(config.param_dtype, "param_dtype"),
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies ``[head_dim // 2]`` (float32), including ``llama3`` scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if config.rope_type == "llama3":
        old_len = config.rope_original_max_position_embeddings
        low, high, factor = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_cos_sin(position_ids: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """Cosine and sine tables ``[batch, seq, head_dim]`` (float32, halves repeated as in HF)."""
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` ``[batch, seq, heads, head_dim]`` with HF's ``rotate_half`` layout."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """Root-mean-square layer norm computed in float32, as HF ``LlamaRMSNorm`` (parameter ``scale``)."""

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalizes over the last axis."""
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(x.dtype).astype(self.dtype)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        deterministic: bool,
        cache: Mapping[str, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Attends ``x`` ``[batch, seq, hidden]`` under boolean ``mask`` ``[batch, 1, seq, kv_len]``.

        Without ``cache``, ``x`` attends to itself (``kv_len == seq``) and the output is returned. With a layer
        cache ``{"k", "v"}`` (each ``[batch, max_len, kv_heads, head_dim]``), the new keys and values (after RoPE)
        are written at slots ``cache_index .. cache_index + seq - 1``, ``x`` attends to all ``max_len`` slots
        (``kv_len == max_len``; ``mask`` hides the unwritten ones) and ``(output, new_cache)`` is returned.
        A ``prefix`` (prefix tuning: keys and values ``[batch, n, kv_heads, head_dim]``, used as given, no RoPE) is
        put in front of the keys and values (``kv_len == n + seq``).

        Dropout on the attention weights is applied only when ``deterministic`` is False.
        """
        cfg = self.config
        batch, seq = x.shape[:2]
        heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(cfg, heads * head_dim, cfg.attention_bias, "q_proj")(x).reshape(batch, seq, heads, head_dim)
        k = _dense(cfg, kv_heads * head_dim, cfg.attention_bias, "k_proj")(x)
        v = _dense(cfg, kv_heads * head_dim, cfg.attention_bias, "v_proj")(x)
        k = k.reshape(batch, seq, kv_heads, head_dim)
        v = v.reshape(batch, seq, kv_heads, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            new_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        if prefix is not None:
            k = jnp.concatenate([prefix[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix[1].astype(v.dtype), v], axis=1)
        probs = attention_probs(q, k, mask)
        probs = nn.Dropout(rate=cfg.attention_dropout)(probs, deterministic=deterministic)
        out = _dense(cfg, cfg.hidden_size, cfg.attention_bias, "o_proj")(attend(probs, v))
        return out if new_cache is None else (out, new_cache)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward block (``gate_proj``, ``up_proj``, ``down_proj``)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """One pre-norm decoder layer, written as an ``nn.scan`` body: returns ``(hidden, new_layer_cache)``."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        deterministic: bool,
        cache: Mapping[str, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """Runs attention and MLP residual blocks on ``hidden`` ``[batch, seq, hidden]``.

        ``cache`` is this layer's slice of the KV cache (None without one); the second output is the updated
        slice, or None. ``prefix`` is this layer's slice of a prefix-tuning prefix (see ``LlamaModel``).
        """
        cfg = self.config
        dtype = resolve_dtype(cfg.dtype, "dtype")
        param_dtype = resolve_dtype(cfg.param_dtype, "param_dtype")
        h = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="input_layernorm")(hidden)
        attn = LlamaAttention(cfg, name="self_attn")
        if cache is None:
            out, new_cache = attn(h, cos, sin, mask, deterministic, prefix=prefix), None
        else:
            out, new_cache = attn(h, cos, sin, mask, deterministic, cache, cache_index)
        hidden = hidden + out
        h = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="post_attention_layernorm")(hidden)
        hidden = hidden + LlamaMLP(cfg, name="mlp")(h)
        return hidden, new_cache


class LlamaModel(nn.Module):
    """Embedding, scanned decoder layers and final norm (HF ``LlamaModel``)."""

    config: LlamaConfig

    def setup(self) -> None:
        cfg = self.config
        dtype = resolve_dtype(cfg.dtype, "dtype")
        param_dtype = resolve_dtype(cfg.param_dtype, "param_dtype")
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            dtype=dtype,
            param_dtype=param_dtype,
        )
        layer_cls: Any = LlamaDecoderLayer
        if cfg.remat:
            # Argument numbers count `self` as 0: deterministic is argument 5.
            layer_cls = nn.remat(layer_cls, prevent_cse=False, static_argnums=(5,))
        self.layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            # cos, sin, mask, deterministic, cache and prefix (scanned: one slice per layer), cache_index.
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0),
            length=cfg.num_hidden_layers,
        )(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        position_ids: jax.Array | None = None,
        cache: Mapping[str, jax.Array] | None = None,
        cache_index: jax.Array | int | None = None,
        prompt: Any = None,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Returns the final normalized hidden states ``[batch, seq, hidden]`` in the compute dtype.

        Args:
            input_ids: Token ids ``[batch, seq]``.
            attention_mask: Optional key mask, 1 for real tokens and 0 for padding: ``[batch, seq]`` without a
                cache, ``[batch, max_len]`` (one entry per cache slot) with one.
            deterministic: Disables dropout when True.
            position_ids: Optional ``[batch, seq]`` positions; defaults to ``0..seq-1`` without a cache and to
                ``cache_index .. cache_index + seq - 1`` with one.
            cache: Optional KV cache from :func:`init_cache` (``{"k", "v"}``, each
                ``[layers, batch, max_len, kv_heads, head_dim]``). With it, ``input_ids`` are written at slots
                ``cache_index ..`` and attend causally to every earlier slot; ``(hidden, new_cache)`` is returned.
            cache_index: First cache slot of ``input_ids`` (a scalar, may be traced); required with ``cache``.
                Slots past ``max_len`` are not checked under ``jit`` (``dynamic_update_slice`` clamps).
            prompt: Prompt tuning (HF PEFT semantics): virtual token embeddings put before the input's
                (``jaxpeft.prepend_prompt``: the adapter tree of a ``jaxpeft.PromptTuningConfig`` or an array
                ``[n, hidden]``). They take positions ``0..n-1``, the real tokens ``n..``; ``attention_mask`` stays
                ``[batch, seq]`` (extended here). The output covers the real tokens only. With a ``cache`` the
                virtual tokens fill slots ``cache_index .. cache_index + n - 1`` (prefill at 0, decode from
                ``n + seq``) and ``attention_mask`` covers the cache slots.
            prefix: Prefix tuning (HF PEFT semantics): ``jaxpeft.prefix_kv(adapters, batch)``, keys and values
                ``[layers, batch, n, kv_heads, head_dim]`` put before every layer's own. Every token attends to all
                ``n`` slots, ``attention_mask`` stays ``[batch, seq]`` (extended here) and positions are shifted by
                ``n`` (``position_ids + n``; ``n..n+seq-1`` by default), as in HF where the prefix is a KV cache.
                For generation write the prefix into the first ``n`` cache slots instead and prefill at
                ``cache_index=n``.

        Raises:
            ValueError: On a malformed cache, prefix or mask, a missing ``cache_index``, or a ``prefix`` with a
                ``cache``, ``position_ids`` with a ``prompt``.
        """
        batch = input_ids.shape[0]
        hidden = self.embed_tokens(input_ids)
        n_virtual = 0
        if prompt is not None:
            if position_ids is not None or prefix is not None:
                raise ValueError(
                    "`prompt` takes no `position_ids` or `prefix`: the virtual tokens take positions 0..n-1 and the "
                    "input follows (HF PEFT ignores position_ids with prompt tuning)."
                )
            hidden, extended = jaxpeft.prepend_prompt(hidden, attention_mask if cache is None else None, prompt)
            attention_mask = extended if cache is None else attention_mask
            n_virtual = hidden.shape[1] - input_ids.shape[1]
        seq = hidden.shape[1]
        if cache is None:
            if cache_index is not None:
                raise ValueError("`cache_index` was given without `cache`; pass cache=init_cache(config, ...) too.")
            offset: jax.Array | int = 0
            key_slots = seq
        else:
            key_slots = _check_cache(cache, self.config, batch)
            if cache_index is None:
                raise ValueError("`cache` needs `cache_index`, the cache slot of input_ids[:, 0] (0 for a prefill).")
            offset = jnp.asarray(cache_index, jnp.int32)
        if prefix is not None:
            offset = key_slots = _check_prefix(prefix, self.config, batch, cache is not None)
            key_slots += seq
            if attention_mask is not None:
                if attention_mask.shape != (batch, seq):
                    raise ValueError(
                        f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected (batch, seq) = "
                        f"{(batch, seq)}, the real tokens' mask (the prefix's slots are added here)."
                    )
                attention_mask = jaxpeft.extend_attention_mask(attention_mask, offset)
            if position_ids is not None:
                position_ids = position_ids + offset
        if position_ids is None:
            position_ids = jnp.broadcast_to(offset + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        query_slot = offset + jnp.arange(seq, dtype=jnp.int32)
        mask = (jnp.arange(key_slots, dtype=jnp.int32)[None, :] <= query_slot[:, None])[None, None]
        if attention_mask is not None:
            if attention_mask.shape != (batch, key_slots):
                what = "max_len (one entry per cache slot)" if cache is not None else "seq"
                raise ValueError(
                    f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected (batch, {what}) = "
                    f"{(batch, key_slots)}."
                )
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        cos, sin = rope_cos_sin(position_ids, self.config)
        index = None if cache is None else offset
        hidden, new_cache = self.layers(hidden, cos, sin, mask, deterministic, cache, index, prefix)
        hidden = self.norm(hidden)[:, n_virtual:]
        return hidden if cache is None else (hidden, new_cache)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Projects hidden states onto the token embedding (tied output head)."""
        return self.embed_tokens.attend(hidden)


class LlamaForCausalLM(nn.Module):
    """Llama decoder with a language-model head (HF ``LlamaForCausalLM``)."""

    config: LlamaConfig

    def setup(self) -> None:
        cfg = self.config
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size, False, "lm_head")

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        position_ids: jax.Array | None = None,
        cache: Mapping[str, jax.Array] | None = None,
        cache_index: jax.Array | int | None = None,
        prompt: Any = None,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
        """Returns float32 logits ``[batch, seq, vocab]``; arguments as :meth:`LlamaModel.__call__`.

        With a ``cache`` (from :func:`init_cache`) it returns ``(logits, new_cache)``. ``prompt`` / ``prefix``:
        prompt or prefix tuning (``jaxpeft.PromptTuningConfig`` / ``jaxpeft.PrefixTuningConfig``); the logits cover
        the real tokens only.
        """
        out = self.model(input_ids, attention_mask, deterministic, position_ids, cache, cache_index, prompt, prefix)
        hidden, new_cache = (out, None) if cache is None else out
        logits = self.model.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict[str, jax.Array]:
    """An empty KV cache for ``LlamaForCausalLM(config)``: ``{"k", "v"}`` of zeros.

    Each array is ``[num_hidden_layers, batch, max_len, num_key_value_heads, head_dim]``; the leading axis is the
    scanned layer axis, so the cache is a plain pytree that ``jit``, ``while_loop`` and donation handle directly.
    Keys are stored after RoPE.

    Args:
        config: The model config.
        batch: Batch size.
        max_len: Number of cache slots (prompt plus generated tokens).
        dtype: Storage dtype; defaults to ``config.dtype``.

    Returns:
        The cache.
    """
    dtype = resolve_dtype(config.dtype, "dtype") if dtype is None else jnp.dtype(dtype)
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _check_prefix(prefix: Any, config: LlamaConfig, batch: int, with_cache: bool) -> int:
    """Validates a prefix-tuning prefix from ``jaxpeft.prefix_kv`` against the config and batch; returns its length."""
    if with_cache:
        raise ValueError(
            "`prefix` with `cache`: write the prefix into the cache's first n slots instead, "
            "cache = {'k': cache['k'].at[:, :, :n].set(keys), 'v': cache['v'].at[:, :, :n].set(values)}, and prefill "
            "at cache_index=n (positions then start at n, as in HF)."
        )
    if not isinstance(prefix, tuple) or len(prefix) != 2:
        raise ValueError(f"`prefix` is a {type(prefix).__name__}; expected (keys, values) from jaxpeft.prefix_kv.")
    shape = tuple(prefix[0].shape)
    expected = (config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim)
    if len(shape) != 5 or (shape[0], shape[1], shape[3], shape[4]) != expected or tuple(prefix[1].shape) != shape:
        raise ValueError(
            f"`prefix` keys and values have shapes {shape} and {tuple(prefix[1].shape)}; expected (layers, batch, n, "
            f"kv_heads, head_dim) = ({expected[0]}, {batch}, n, {expected[2]}, {expected[3]}) for both. Make the "
            f"PrefixTuningConfig for this model: num_layers={expected[0]}, num_kv_heads={expected[2]}, "
            f"head_dim={expected[3]}."
        )
    return shape[2]


def _check_cache(cache: Mapping[str, jax.Array], config: LlamaConfig, batch: int) -> int:
    """Validates a cache from :func:`init_cache` against the config and batch; returns ``max_len``."""
    if not isinstance(cache, Mapping) or set(cache) != {"k", "v"}:
        got = sorted(cache) if isinstance(cache, Mapping) else type(cache).__name__
        raise ValueError(f"`cache` must be the {{'k', 'v'}} dict from init_cache(config, batch, max_len); got {got}.")
    shape = tuple(cache["k"].shape)
    expected = (config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim)
    if len(shape) != 5 or (shape[0], shape[1], shape[3], shape[4]) != expected or tuple(cache["v"].shape) != shape:
        raise ValueError(
            f"`cache` arrays have shapes {shape} and {tuple(cache['v'].shape)}; expected (layers, batch, max_len, "
            f"kv_heads, head_dim) = ({expected[0]}, {batch}, max_len, {expected[2]}, {expected[3]}) for both. "
            "Build it with init_cache(config, batch, max_len)."
        )
    return shape[2]


def hf_module_name(path: str) -> str:
    """Maps a Flax module path to its Hugging Face module-name template.

    Args:
        path: Slash-separated module path without the parameter leaf, e.g.
            ``"model/layers/self_attn/q_proj"``.

    Returns:
        The dotted HF name with ``{layer}`` where the scanned layer index goes, e.g.
        ``"model.layers.{layer}.self_attn.q_proj"``.

    Raises:
        ValueError: If the path does not start with ``model`` or ``lm_head``.
    """
    return decoder_module_name(path, "LlamaForCausalLM", "model/layers/self_attn/q_proj")


def our_module_path(hf_name: str) -> tuple[str, int | None]:
    """Inverse of :func:`hf_module_name`.

    Args:
        hf_name: Dotted HF module name, e.g. ``"model.layers.3.self_attn.q_proj"`` (a ``{layer}``
            template is accepted too).

    Returns:
        ``(path, layer)``: the Flax module path and the index into the scanned layer axis (None outside the
        layers or for a template), e.g. ``("model/layers/self_attn/q_proj", 3)``.

    Raises:
        ValueError: If the name does not belong to a Llama model.
    """
    return decoder_module_path(hf_name, "LlamaForCausalLM", "model.layers.0.mlp.up_proj")


def abstract_params(config: LlamaConfig) -> dict[str, Any]:
    """Shapes and dtypes (``jax.ShapeDtypeStruct``) of ``LlamaForCausalLM(config)`` params (no allocation)."""
    model = LlamaForCausalLM(config)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return variables["params"]


def untied(config: LlamaConfig, params: Mapping[str, Any]) -> tuple[LlamaConfig, dict[str, Any]]:
    """A tied-embedding model as an untied one that computes the same logits: ``lm_head`` gets a copy of the table.

    The returned params hold ``lm_head/kernel`` ``[hidden, vocab]``, a copy of ``model/embed_tokens/embedding``
    transposed (a second ``vocab x hidden`` array: 113 MB for SmolLM2-135M in float32), and the config has
    ``tie_word_embeddings=False``. The head is then a leaf of its own that an embedding adapter does not reach:
    that is what Hugging Face PEFT runs on a tied model with its default ``ensure_weight_tying=False`` (the lookup
    adapted, the head on the original table), so import such adapters into these params. Adapters trained here and
    exported for the tied HF model need ``ensure_weight_tying=False`` (``jaxpeft.hf.export_adapters``) for the same
    reason. Params without tied embeddings are returned unchanged (no copy); ``jax.ShapeDtypeStruct`` leaves work.

    Args:
        config: The model config.
        params: Its ``LlamaForCausalLM`` params.

    Returns:
        ``(config, params)`` of the untied model.
    """
    if not config.tie_word_embeddings:
        return config, dict(params)
    table = params["model"]["embed_tokens"]["embedding"]
    if isinstance(table, jax.ShapeDtypeStruct):
        head: Any = jax.ShapeDtypeStruct(table.shape[::-1], table.dtype)
    else:
        head = jnp.transpose(jnp.asarray(table))  # a new array, not a view of the table
    return dataclasses.replace(config, tie_word_embeddings=False), {**params, "lm_head": {"kernel": head}}


def load_hf_checkpoint(
    directory: str | os.PathLike[str],
    *,
    strict: bool = True,
    untie_embeddings: bool = False,
    **config_overrides: Any,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a Hugging Face Llama checkpoint directory (``config.json`` + ``*.safetensors``).

    Args:
        directory: Directory written by ``save_pretrained(..., safe_serialization=True)``.
        strict: If False, checkpoint tensors the model does not use are dropped instead of raising.
        untie_embeddings: For a tied checkpoint (``tie_word_embeddings``), give ``lm_head`` its own copy of the
            embedding table (:func:`untied`): the same logits, and the head a separate leaf. Needed to import a
            HF PEFT adapter of the embedding saved without ``ensure_weight_tying`` (PEFT leaves the tied head
            unadapted). No effect on an untied checkpoint.
        **config_overrides: Passed to :meth:`LlamaConfig.from_hf_dict`, e.g. ``param_dtype="bfloat16"``.

    Returns:
        ``(config, params)``; apply with ``LlamaForCausalLM(config).apply({"params": params}, input_ids)``.

    Raises:
        ValueError: On missing or unexpected tensors, or tensors whose shapes disagree with the config.
    """
    directory = os.fspath(directory)
    config = LlamaConfig.from_json_file(directory, **config_overrides)
    tensors = read_safetensors_dir(directory)

    def ignore(name: str) -> bool:
        # RoPE buffers of old checkpoints, and the duplicate head some tied checkpoints still store.
        return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")

    expected = traverse_util.flatten_dict(abstract_params(config))
    params = checkpoint_to_params(
        tensors,
        expected,
        hf_module_name,
        num_layers=config.num_hidden_layers,
        ignore=ignore,
        strict=strict,
        source=directory,
        model_name="LlamaForCausalLM",
    )
    return untied(config, params) if untie_embeddings else (config, params)


def to_hf_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts ``LlamaForCausalLM`` params to a HF state dict (``[out, in]`` weights, unstacked layers).

    With tied embeddings no ``lm_head.weight`` entry is produced, as in HF safetensors files.
    """
    return params_to_checkpoint(params, hf_module_name)
