"""A Mixtral-style mixture-of-experts decoder in Flax Linen with Hugging Face ``MixtralForCausalLM`` parameter paths.

Attention, RMSNorm and RoPE are the Llama example's (``examples/models/llama.py``); each MLP is a sparse MoE block:
a router ``nn.Dense`` to ``num_local_experts`` logits (``mlp/gate``), a softmax, the top ``num_experts_per_tok``
experts per token with their weights renormalised to sum to one (HF ``MixtralTopKRouter``), and SwiGLU experts whose
weights are stacked ``(experts, in, out)`` kernels of two ``nn.Einsum`` layers (``mlp/experts/gate_up_proj``:
``'ecd,edf->ecf'``, ``mlp/experts/down_proj``: ``'ecf,efd->ecd'``). The expert axis ``e`` is in the input, the kernel
and the output, so jaxpeft treats it as a stack axis: LoRA on an expert kernel is one adapter per expert, A
``(E, in, r)`` and B ``(E, r, out)`` (HF PEFT's ``target_parameters`` semantics), and an ``expert`` mesh axis can
shard the kernels and their adapters alike.

Tokens reach their experts by a capacity-based dispatch: every expert has ``capacity`` slots; the assignments
``(token, k)`` fill them in token order and any beyond ``capacity`` are dropped (that expert adds nothing to that
token; its other experts and the residual still do). With ``MoeConfig.capacity_factor=None`` (the default) the
capacity is the number of tokens, which no expert can exceed (a token picks ``k`` distinct experts): no token is ever
dropped and the logits equal transformers' exactly (up to float rounding). A factor ``f`` gives
``ceil(f * tokens * k / experts)`` slots: less compute, but a dropped assignment changes the output, which HF's
dropless Mixtral never does.
"""

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

from examples.models._common import (
    checkpoint_to_params,
    decoder_module_name,
    decoder_module_path,
    params_to_checkpoint,
    read_config_json,
    read_safetensors_dir,
    resolve_dtype,
)
from examples.models.llama import LlamaAttention, LlamaConfig, RMSNorm, rope_cos_sin

#: The HF parameter names of an experts module, in the order ``MixtralExperts`` registers them. HF PEFT nests one
#: ``ParamWrapper`` per targeted parameter in this order, so it decides which file keys hold which parameter's
#: factors (``jaxpeft.hf.export_adapters(..., parameter_order=PARAMETER_ORDER)``).
PARAMETER_ORDER = ("gate_up_proj", "down_proj")
#: Our kernel paths (below ``model/layers/mlp``) of the stacked expert weights.
EXPERT_KERNELS = ("experts/gate_up_proj/kernel", "experts/down_proj/kernel")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Hyper-parameters of a Mixtral decoder (field names follow Hugging Face ``MixtralConfig``).

    Attributes:
        vocab_size: Vocabulary size.
        hidden_size: Model width.
        intermediate_size: Width of each expert's SwiGLU MLP.
        num_hidden_layers: Number of decoder layers.
        num_attention_heads: Number of query heads.
        num_key_value_heads: Number of key/value heads; defaults to ``num_attention_heads``.
        head_dim: Width of one head; defaults to ``hidden_size // num_attention_heads``.
        num_local_experts: Experts per MoE block.
        num_experts_per_tok: Experts each token is routed to (top-k).
        rms_norm_eps: Epsilon of the RMS norms.
        rope_theta: RoPE base frequency.
        tie_word_embeddings: Whether the output projection reuses the token embedding.
        max_position_embeddings: Longest sequence the model was trained for (informational).
        attention_dropout: Dropout rate on attention weights (used only when ``deterministic=False``).
        initializer_range: Standard deviation of the normal initializer of kernels and embeddings.
        router_aux_loss_coef: HF's load-balancing loss weight (informational: :func:`load_balancing_loss` computes
            the loss, the caller weights it).
        capacity_factor: Expert slots per expert as a multiple of the even share ``tokens * k / experts``; None: as
            many slots as tokens (no token is ever dropped; exact, and ``experts / k`` times the expert FLOPs of a
            perfectly balanced dispatch).
        dtype: Computation dtype name.
        param_dtype: Parameter dtype name.
        remat: Whether to rematerialize (``nn.remat``) each decoder layer in the backward pass.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096 * 32
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    router_aux_loss_coef: float = 0.001
    capacity_factor: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"`num_experts_per_tok`={self.num_experts_per_tok} must be between 1 and "
                f"`num_local_experts`={self.num_local_experts}."
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(
                f"`capacity_factor`={self.capacity_factor!r} must be positive, or None for as many slots as tokens "
                "(no token dropped)."
            )
        # the attention checks (head counts, dtypes) are the Llama config's
        attention = self.attention_config()
        object.__setattr__(self, "num_key_value_heads", attention.num_key_value_heads)
        object.__setattr__(self, "head_dim", attention.head_dim)

    def attention_config(self) -> LlamaConfig:
        """The Llama config whose attention, norms and RoPE this model shares."""
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            attention_dropout=self.attention_dropout,
            initializer_range=self.initializer_range,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def capacity(self, tokens: int) -> int:
        """Slots per expert for a batch of ``tokens`` tokens (see ``capacity_factor``)."""
        if self.capacity_factor is None:
            return tokens
        even = tokens * self.num_experts_per_tok / self.num_local_experts
        return max(1, min(tokens, math.ceil(self.capacity_factor * even)))

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> MoeConfig:
        """Builds a config from the contents of a Hugging Face Mixtral ``config.json``.

        Args:
            d: The parsed ``config.json`` (transformers 4 ``rope_theta`` or 5 ``rope_parameters``).
            **overrides: Fields to set regardless of ``d``, e.g. ``capacity_factor=1.25``.

        Raises:
            ValueError: If ``d`` describes something this model cannot reproduce (another model type or
                activation, sliding-window attention, RoPE scaling).
        """
        model_type = d.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ValueError(f"config.json has model_type={model_type!r}; MoeConfig expects 'mixtral'.")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json has hidden_act={d['hidden_act']!r}; this Mixtral supports 'silu'.")
        if d.get("sliding_window") is not None:
            raise ValueError(
                f"config.json has sliding_window={d['sliding_window']!r}; this Mixtral implements full causal "
                "attention only (Mixtral-8x7B ships sliding_window=null)."
            )
        rope: dict[str, Any] = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"config.json has RoPE scaling {rope!r}; this Mixtral supports the default RoPE only.")
        kwargs: dict[str, Any] = {"rope_theta": float(rope.get("rope_theta", d.get("rope_theta", 1e6)))}
        for field in dataclasses.fields(cls):
            if field.name in ("rope_theta", "capacity_factor", "dtype", "param_dtype", "remat"):
                continue
            if d.get(field.name) is not None:
                kwargs[field.name] = d[field.name]
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **overrides: Any) -> MoeConfig:
        """Reads a Hugging Face ``config.json`` (the file or its directory); see :meth:`from_hf_dict`."""
        return cls.from_hf_dict(read_config_json(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """Returns a Hugging Face Mixtral ``config.json`` dict (read back by :meth:`from_hf_dict`).

        ``capacity_factor``, ``dtype``, ``param_dtype`` and ``remat`` are JAX-side settings and are not written.
        """
        skip = ("capacity_factor", "dtype", "param_dtype", "remat", "rope_theta")
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_act": "silu",
            "sliding_window": None,
            "router_jitter_noise": 0.0,
            **fields,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        }


def _dtypes(config: MoeConfig) -> tuple[Any, Any]:
    return resolve_dtype(config.dtype, "dtype"), resolve_dtype(config.param_dtype, "param_dtype")


def route(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """HF Mixtral's router: softmax over experts in float32, the top ``k``, renormalised to sum to one.

    Args:
        logits: Router logits ``[tokens, experts]``.
        k: Experts per token.

    Returns:
        ``(weights, experts)``: float32 ``[tokens, k]`` and int32 ``[tokens, k]`` (highest probability first).
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, experts = jax.lax.top_k(probs, k)
    return top / jnp.sum(top, axis=-1, keepdims=True), experts.astype(jnp.int32)


def dispatch_slots(experts: jax.Array, num_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Where each ``(token, k)`` assignment goes: its slot ``expert * capacity + position`` and whether it was kept.

    Assignments fill an expert's slots in token order (``k`` order within a token); those past ``capacity`` are
    dropped (``kept`` False, slot clipped to a valid index).

    Args:
        experts: ``[tokens, k]`` expert indices.
        num_experts: Number of experts.
        capacity: Slots per expert.

    Returns:
        ``(slot, kept)``: int32 and bool, each ``[tokens * k]``.
    """
    flat = experts.reshape(-1)
    onehot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    position = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)
    kept = position < capacity
    slot = jnp.where(kept, flat * capacity + position, 0)
    return slot.astype(jnp.int32), kept


class MoeExperts(nn.Module):
    """SwiGLU experts over their slots: ``down_proj(silu(gate) * up)`` with ``gate, up = split(gate_up_proj(x))``.

    Kernels ``gate_up_proj`` ``(experts, hidden, 2 * intermediate)`` (gate half first, as HF's fused
    ``gate_up_proj``) and ``down_proj`` ``(experts, intermediate, hidden)``, each an ``nn.Einsum`` whose expert axis
    is a stack axis for jaxpeft.
    """

    config: MoeConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies each expert to its slots ``x`` ``[experts, capacity, hidden]``."""
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        experts, inter, hidden = cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size
        init = nn.initializers.normal(cfg.initializer_range)
        gate_up = nn.Einsum(
            (experts, hidden, 2 * inter),
            "ecd,edf->ecf",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=init,
            name="gate_up_proj",
        )(x)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        return nn.Einsum(
            (experts, inter, hidden),
            "ecf,efd->ecd",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=init,
            name="down_proj",
        )(nn.silu(gate) * up)


class MoeBlock(nn.Module):
    """The sparse MoE block (HF ``MixtralSparseMoeBlock``): router ``gate`` and ``experts``.

    Returns ``(output, router_logits)``; the logits ``[tokens, experts]`` feed :func:`load_balancing_loss`.
    """

    config: MoeConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Routes ``x`` ``[batch, seq, hidden]`` to its top-k experts and sums their weighted outputs."""
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        batch, seq, hidden = x.shape
        tokens = x.reshape(batch * seq, hidden)
        n, k, e = batch * seq, cfg.num_experts_per_tok, cfg.num_local_experts
        logits = nn.Dense(
            e,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nn.initializers.normal(cfg.initializer_range),
            name="gate",
        )(tokens)
        weights, experts = route(logits, k)
        capacity = cfg.capacity(n)
        slot, kept = dispatch_slots(experts, e, capacity)
        owner = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
        # each slot's token (n: an empty slot, which reads the zero row appended below)
        slot_token = (
            jnp.full((e * capacity,), n, jnp.int32).at[jnp.where(kept, slot, e * capacity)].set(owner, mode="drop")
        )
        padded = jnp.concatenate([tokens, jnp.zeros((1, hidden), tokens.dtype)])
        out = MoeExperts(cfg, name="experts")(padded[slot_token].reshape(e, capacity, hidden))
        picked = out.reshape(e * capacity, hidden)[slot]  # [n * k, hidden]
        scale = jnp.where(kept, weights.reshape(-1), 0.0)[:, None]
        combined = jnp.sum((picked.astype(jnp.float32) * scale).reshape(n, k, hidden), axis=1)
        return combined.astype(x.dtype).reshape(batch, seq, hidden), logits


def load_balancing_loss(router_logits: jax.Array, num_experts: int, k: int) -> jax.Array:
    """HF Mixtral's auxiliary load-balancing loss (``load_balancing_loss_func`` without an attention mask).

    Args:
        router_logits: ``[..., tokens, experts]`` logits of every layer (the leading axes are concatenated).
        num_experts: Experts per block.
        k: Experts per token.

    Returns:
        The scalar ``num_experts * sum_e(fraction of assignments to e * mean router probability of e)``.
    """
    logits = router_logits.reshape(-1, num_experts).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    _, chosen = jax.lax.top_k(probs, k)
    mask = jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32)  # [tokens, k, experts]
    tokens_per_expert = jnp.mean(mask, axis=0)
    router_prob = jnp.mean(probs, axis=0)
    return jnp.sum(tokens_per_expert * router_prob[None]) * num_experts


class MoeDecoderLayer(nn.Module):
    """One pre-norm decoder layer, written as an ``nn.scan`` body: returns ``(hidden, router_logits)``."""

    config: MoeConfig

    @nn.compact
    def __call__(
        self, hidden: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, jax.Array]:
        """Runs the attention and MoE residual blocks on ``hidden`` ``[batch, seq, hidden]``."""
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        h = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="input_layernorm")(hidden)
        hidden = hidden + LlamaAttention(cfg.attention_config(), name="self_attn")(h, cos, sin, mask, deterministic)
        h = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="post_attention_layernorm")(hidden)
        out, logits = MoeBlock(cfg, name="mlp")(h)
        return hidden + out, logits


class MoeModel(nn.Module):
    """Embedding, scanned decoder layers and final norm (HF ``MixtralModel``)."""

    config: MoeConfig

    def setup(self) -> None:
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            dtype=dtype,
            param_dtype=param_dtype,
        )
        layer_cls: Any = MoeDecoderLayer
        if cfg.remat:
            layer_cls = nn.remat(layer_cls, prevent_cse=False, static_argnums=(5,))
        self.layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
        )(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Returns ``(hidden, router_logits)``: normalized hidden states ``[batch, seq, hidden]`` and the router
        logits ``[layers, batch * seq, experts]``.

        Args:
            input_ids: Token ids ``[batch, seq]``.
            attention_mask: Optional ``[batch, seq]`` key mask, 1 for real tokens. Padded tokens are still routed
                (they take expert slots, as in HF); with a ``capacity_factor`` they can displace real tokens.
            deterministic: Disables dropout when True.
        """
        batch, seq = input_ids.shape
        hidden = self.embed_tokens(input_ids)
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        mask = (jnp.arange(seq)[None, :] <= jnp.arange(seq)[:, None])[None, None]
        if attention_mask is not None:
            if attention_mask.shape != (batch, seq):
                raise ValueError(
                    f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected (batch, seq) = {(batch, seq)}."
                )
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        cos, sin = rope_cos_sin(positions, self.config.attention_config())
        hidden, logits = self.layers(hidden, cos, sin, mask, deterministic)
        return self.norm(hidden), logits


class MoeForCausalLM(nn.Module):
    """Mixtral decoder with a language-model head (HF ``MixtralForCausalLM``)."""

    config: MoeConfig

    def setup(self) -> None:
        cfg = self.config
        dtype, param_dtype = _dtypes(cfg)
        self.model = MoeModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_init=nn.initializers.normal(cfg.initializer_range),
            )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        return_router_logits: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Float32 logits ``[batch, seq, vocab]`` (and the router logits with ``return_router_logits``)."""
        hidden, router_logits = self.model(input_ids, attention_mask, deterministic)
        head = self.model.embed_tokens.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        logits = head.astype(jnp.float32)
        return (logits, router_logits) if return_router_logits else logits


# ------------------------------------------------------------------------------------------------ names and files


def hf_module_name(path: str) -> str:
    """Maps a Flax module path to its Hugging Face name template.

    An expert kernel's module path maps to the HF *parameter* it is (``model/layers/mlp/experts/gate_up_proj`` ->
    ``"model.layers.{layer}.mlp.experts.gate_up_proj"``), which is what HF PEFT's ``target_parameters`` names;
    every other path maps to its module, e.g. ``"model/layers/self_attn/q_proj"`` ->
    ``"model.layers.{layer}.self_attn.q_proj"``.

    Raises:
        ValueError: If the path does not start with ``model`` or ``lm_head``.
    """
    return decoder_module_name(path, "MoeForCausalLM", "model/layers/mlp/experts/gate_up_proj")


def our_module_path(hf_name: str) -> tuple[str, int | None]:
    """Inverse of :func:`hf_module_name`: ``(path, layer index or None)``.

    Raises:
        ValueError: If the name does not belong to a Mixtral model.
    """
    return decoder_module_path(hf_name, "MixtralForCausalLM", "model.layers.0.mlp.gate")


def abstract_params(config: MoeConfig) -> dict[str, Any]:
    """Shapes and dtypes of ``MoeForCausalLM(config)`` params (no allocation)."""
    variables = jax.eval_shape(MoeForCausalLM(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return variables["params"]


def _expert_path(name: str) -> tuple[str, ...]:
    return ("model", "layers", "mlp", "experts", name, "kernel")


def _legacy_to_fused(tensors: dict[str, np.ndarray], config: MoeConfig) -> dict[str, np.ndarray]:
    """Mixtral's on-disk layout (``block_sparse_moe.experts.N.w1/w2/w3``, what ``save_pretrained`` writes) as the
    fused in-memory one (``mlp.experts.gate_up_proj`` ``(E, 2I, H)``, ``mlp.experts.down_proj`` ``(E, H, I)``)."""
    out = {k.replace(".block_sparse_moe.gate.", ".mlp.gate."): v for k, v in tensors.items()}
    for i in range(config.num_hidden_layers):
        stem = f"model.layers.{i}.block_sparse_moe.experts"
        if f"{stem}.0.w1.weight" not in out:
            continue
        experts = range(config.num_local_experts)
        w = {n: [out.pop(f"{stem}.{e}.{n}.weight") for e in experts] for n in ("w1", "w2", "w3")}
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.concatenate([np.stack(w["w1"]), np.stack(w["w3"])], 1)
        out[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack(w["w2"])
    return out


def load_hf_checkpoint(
    directory: str | os.PathLike[str], *, strict: bool = True, **config_overrides: Any
) -> tuple[MoeConfig, dict[str, Any]]:
    """Loads a Hugging Face Mixtral checkpoint directory (``config.json`` + ``*.safetensors``).

    Both layouts transformers 5 reads are understood: the fused 3-D expert parameters of ``MixtralExperts``
    (``model.layers.N.mlp.experts.gate_up_proj`` ``(E, 2I, H)`` and ``.down_proj`` ``(E, H, I)``) and the per-expert
    Linear weights ``save_pretrained`` writes (``block_sparse_moe.experts.M.w1/w3`` gate/up, ``w2`` down,
    ``block_sparse_moe.gate``).

    Args:
        directory: The checkpoint directory.
        strict: If False, checkpoint tensors the model does not use are dropped instead of raising.
        **config_overrides: Passed to :meth:`MoeConfig.from_hf_dict`, e.g. ``capacity_factor=1.25``.

    Returns:
        ``(config, params)``; apply with ``MoeForCausalLM(config).apply({"params": params}, input_ids)``.

    Raises:
        ValueError: On missing or unexpected tensors, or tensors whose shapes disagree with the config.
    """
    directory = os.fspath(directory)
    config = MoeConfig.from_json_file(directory, **config_overrides)
    tensors = _legacy_to_fused(read_safetensors_dir(directory), config)
    expected = traverse_util.flatten_dict(abstract_params(config))
    flat: dict[tuple[str, ...], Any] = {}
    for name in PARAMETER_ORDER:
        path = _expert_path(name)
        target = expected.pop(path)
        keys = [f"model.layers.{i}.mlp.experts.{name}" for i in range(config.num_hidden_layers)]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(
                f"Checkpoint {directory!r} does not match the MoeForCausalLM config; missing keys: {missing[:3]}. "
                "Fix: make sure config.json (num_hidden_layers) belongs to these weights."
            )
        stacked = np.stack([np.swapaxes(np.asarray(tensors.pop(k)), -1, -2) for k in keys])
        if stacked.shape != tuple(target.shape):
            raise ValueError(
                f"Checkpoint {directory!r}: tensors {keys[0]!r}... stack to {stacked.shape[:1]} + HF "
                f"{np.swapaxes(stacked, -1, -2).shape[1:]}, but {'/'.join(path)!r} needs {tuple(target.shape)} "
                "(ours: experts, in, out). Fix: check num_local_experts, hidden_size and intermediate_size."
            )
        flat[path] = jnp.asarray(stacked.astype(target.dtype))
    rest = checkpoint_to_params(
        tensors,
        expected,
        hf_module_name,
        num_layers=config.num_hidden_layers,
        ignore=lambda n: n.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and n == "lm_head.weight"),
        strict=strict,
        source=directory,
        model_name="MoeForCausalLM",
    )
    flat.update(traverse_util.flatten_dict(rest))
    return config, traverse_util.unflatten_dict(flat)


def to_hf_state_dict(params: Mapping[str, Any], *, per_expert: bool = False) -> dict[str, np.ndarray]:
    """Converts ``MoeForCausalLM`` params to a HF Mixtral state dict.

    Args:
        params: The params.
        per_expert: False: transformers 5's in-memory names (``mlp.experts.gate_up_proj`` ``(E, 2I, H)``,
            ``mlp.experts.down_proj`` ``(E, H, I)``: ``model.load_state_dict`` takes them). True: the layout
            ``save_pretrained`` writes (``block_sparse_moe.experts.M.w1/w2/w3.weight``, ``block_sparse_moe.gate``).
    """
    flat = traverse_util.flatten_dict(dict(params))
    experts = {name: np.asarray(jax.device_get(flat.pop(_expert_path(name)))) for name in PARAMETER_ORDER}
    out = params_to_checkpoint(traverse_util.unflatten_dict(flat), hf_module_name)
    inter = experts["down_proj"].shape[-2]
    for i in range(experts["gate_up_proj"].shape[0]):
        gate_up = np.swapaxes(experts["gate_up_proj"][i], -1, -2)  # (E, 2I, H)
        down = np.swapaxes(experts["down_proj"][i], -1, -2)  # (E, H, I)
        if not per_expert:
            out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.ascontiguousarray(gate_up)
            out[f"model.layers.{i}.mlp.experts.down_proj"] = np.ascontiguousarray(down)
            continue
        out[f"model.layers.{i}.block_sparse_moe.gate.weight"] = out.pop(f"model.layers.{i}.mlp.gate.weight")
        for e in range(gate_up.shape[0]):
            stem = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            out[f"{stem}.w1.weight"] = np.ascontiguousarray(gate_up[e, :inter])
            out[f"{stem}.w3.weight"] = np.ascontiguousarray(gate_up[e, inter:])
            out[f"{stem}.w2.weight"] = np.ascontiguousarray(down[e])
    return out
