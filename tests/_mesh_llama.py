"""The example Llama the 8-device workers train (imported after they set ``jax_num_cpu_devices``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import jaxpeft.linen
from examples.models import llama

#: What both workers train: all-linear LoRA under AdamW.
CFG = jaxpeft.LoraConfig(rank=4, alpha=8, targets="all-linear")
TX = optax.adamw(1e-2)


class MeshLlama(NamedTuple):
    config: llama.LlamaConfig
    model: llama.LlamaForCausalLM
    ids: np.ndarray  # (8, 12) token ids
    params: Any  # host float32 params, N(0, std)
    layouts: Any


def mesh_llama(hidden: int, mlp: int, std: float) -> MeshLlama:
    """A 2-layer Llama (vocab 64, 4 heads, 2 KV heads) with host params drawn from a fixed seed."""
    config = llama.LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = llama.LlamaForCausalLM(config)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (8, 12)).astype(np.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * std).astype(np.float32), shapes)
    return MeshLlama(config, model, ids, params, jaxpeft.linen.infer_layouts(model, ids))


def make_step(model: llama.LlamaForCausalLM) -> Any:
    """The AdamW step ``(adapters, opt, params, ids) -> (adapters, opt, loss)`` of next-token cross-entropy."""

    def loss_fn(adapters: Any, params: Any, ids: Any) -> Any:
        logits = jaxpeft.linen.apply(model, {"params": params}, adapters, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    def step(adapters: Any, opt: Any, params: Any, ids: Any) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(adapters, params, ids)
        updates, opt = TX.update(grads, opt, adapters)
        return optax.apply_updates(adapters, updates), opt, loss

    return step


def nonzero(adapters: Any) -> Any:
    """Adapters moved off their zero init, so that every factor gets a gradient."""
    return jax.tree.map(lambda x: x + 0.05, adapters)
