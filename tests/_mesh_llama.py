"""The example Llama the 8-device workers train (imported after they set ``jax_num_cpu_devices``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

import jaxpeft.linen
from examples.models import llama


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
