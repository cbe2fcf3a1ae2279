"""The tiny torch Llama the interop tests share, and our Flax Llama loaded from its safetensors (same weights)."""

from __future__ import annotations

from typing import Any

import pytest

from examples.models import llama


def tiny_llama_pair(directory: Any, *, tied: bool = False) -> tuple[Any, Any, Any]:
    """``(torch LlamaForCausalLM, our LlamaForCausalLM, its params)``: 2 layers, width 32, GQA 4/2, vocab 64.

    Skips the calling test when torch or transformers is missing. The torch model is saved to ``directory`` and
    read back through ``llama.load_hf_checkpoint``, so the loader is part of every comparison.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    torch_model = transformers.LlamaForCausalLM(config).eval()
    torch_model.save_pretrained(directory)
    flax_config, params = llama.load_hf_checkpoint(directory)
    return torch_model, llama.LlamaForCausalLM(flax_config), params
