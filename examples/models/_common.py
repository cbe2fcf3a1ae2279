"""Shared helpers for the example models: dtypes, attention math and Hugging Face checkpoint I/O."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

LAYER_PLACEHOLDER = "{layer}"
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+|\{layer\})(?:\.|$)")
"""Marks, in a Hugging Face module-name template, where the index of a scanned layer goes."""

LEAF_TO_HF: Mapping[str, str] = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
"""Flax parameter leaf name -> Hugging Face (PyTorch) parameter leaf name."""

_MAX_LISTED_KEYS = 10


def resolve_dtype(name: str, field: str) -> jnp.dtype:
    """Turns a dtype name such as ``"bfloat16"`` into a JAX dtype.

    Args:
        name: The dtype name.
        field: The config field the name came from, used in the error message.

    Returns:
        The dtype.

    Raises:
        ValueError: If ``name`` is not a floating point dtype name.
    """
    try:
        dtype = jnp.dtype(name)
    except TypeError as err:
        raise ValueError(f"{field}={name!r} is not a dtype name; use e.g. 'float32', 'bfloat16' or 'float16'.") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{field}={name!r} must be a floating point dtype such as 'float32' or 'bfloat16'.")
    return dtype


def config_json_path(path: str | os.PathLike[str]) -> str:
    """Returns ``path`` itself, or ``path/config.json`` when ``path`` is a directory."""
    path = os.fspath(path)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def read_config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a Hugging Face ``config.json`` (given the file or the checkpoint directory).

    Raises:
        ValueError: If the file does not exist or does not hold a JSON object.
    """
    file = config_json_path(path)
    if not os.path.isfile(file):
        raise ValueError(
            f"No config file at {file!r}; expected the config.json that save_pretrained() writes next to "
            "the *.safetensors files."
        )
    with open(file, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{file!r} must hold a JSON object, got {type(data).__name__}.")
    return data


def read_safetensors_dir(directory: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Loads every ``*.safetensors`` file of a directory into one flat ``{name: array}`` dict.

    Raises:
        ValueError: If the directory holds no safetensors file, or two shards hold the same tensor.
    """
    directory = os.fspath(directory)
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(
            f"No *.safetensors file in {directory!r}; save the model with "
            "save_pretrained(directory, safe_serialization=True) or convert its *.bin weights first."
        )
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        for name, array in load_file(os.path.join(directory, file)).items():
            if name in tensors:
                raise ValueError(f"Tensor {name!r} appears in more than one shard of {directory!r} ({file}).")
            tensors[name] = array
    return tensors


def _list_keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" (and {more} more)" if more > 0 else "")


def _hf_param_name(module_name: Callable[[str], str], path: tuple[str, ...]) -> str:
    leaf = path[-1]
    if leaf not in LEAF_TO_HF:
        raise ValueError(
            f"Parameter {'/'.join(path)!r} has leaf name {leaf!r}; only {sorted(LEAF_TO_HF)} map to "
            "Hugging Face weights."
        )
    return f"{module_name('/'.join(path[:-1]))}.{LEAF_TO_HF[leaf]}"


def checkpoint_to_params(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[tuple[str, ...], jax.ShapeDtypeStruct],
    module_name: Callable[[str], str],
    *,
    num_layers: int,
    ignore: Callable[[str], bool],
    strict: bool,
    source: str,
    model_name: str,
) -> dict[str, Any]:
    """Converts Hugging Face tensors into a nested Flax ``params`` dict of the expected structure.

    Linear weights are transposed from ``[out, in]`` to ``[in, out]``; tensors of scanned layers (whose
    module-name template holds ``{layer}``) are stacked along a new leading axis; every array is cast to the
    dtype of its expected leaf.

    Args:
        tensors: Checkpoint tensors by Hugging Face name.
        expected: Shapes and dtypes of the Flax params, keyed by path tuple (e.g. from ``jax.eval_shape``).
        module_name: Maps a slash-separated Flax module path to a Hugging Face module-name template.
        num_layers: Number of scanned layers (length of the stacked axis).
        ignore: Returns True for checkpoint tensors that are not parameters of the model (buffers, tied
            duplicates) and are dropped silently.
        strict: If False, unexpected checkpoint tensors are dropped instead of raising.
        source: Where the tensors came from, for error messages.
        model_name: Name of the model class, for error messages.

    Returns:
        The nested params dict (plain dicts of ``jax.Array``).

    Raises:
        ValueError: If tensors are missing, unexpected (with ``strict``), or have the wrong shape.
    """
    plan: dict[tuple[str, ...], list[str]] = {}
    for path in expected:
        name = _hf_param_name(module_name, path)
        if LAYER_PLACEHOLDER in name:
            plan[path] = [name.replace(LAYER_PLACEHOLDER, str(i)) for i in range(num_layers)]
        else:
            plan[path] = [name]
    wanted = {name for names in plan.values() for name in names}
    missing = wanted - set(tensors)
    unexpected = {name for name in tensors if name not in wanted and not ignore(name)}
    if missing or (unexpected and strict):
        problems = []
        if missing:
            problems.append(f"missing keys: {_list_keys(missing)}")
        if unexpected and strict:
            problems.append(f"unexpected keys: {_list_keys(unexpected)}")
        raise ValueError(
            f"Checkpoint {source!r} does not match the {model_name} config; "
            + "; ".join(problems)
            + ". Fix: make sure config.json belongs to these weights (layer count, tied embeddings, "
            "pooler), or pass strict=False to drop extra heads."
        )

    flat: dict[tuple[str, ...], jax.Array] = {}
    for path, names in plan.items():
        target = expected[path]
        scanned = LAYER_PLACEHOLDER in _hf_param_name(module_name, path)
        per_layer = tuple(target.shape[1:]) if scanned else tuple(target.shape)
        arrays = []
        for name in names:
            array = np.asarray(tensors[name])
            if path[-1] == "kernel":
                array = array.T
            if array.shape != per_layer:
                hf_shape = per_layer[::-1] if path[-1] == "kernel" else per_layer
                raise ValueError(
                    f"Checkpoint {source!r}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but "
                    f"{model_name} parameter {'/'.join(path)!r} (shape {tuple(target.shape)}) needs "
                    f"{hf_shape}. Fix: check hidden_size, intermediate_size, head counts and vocab_size "
                    "in config.json."
                )
            arrays.append(array)
        value = np.stack(arrays) if scanned else arrays[0]
        flat[path] = jnp.asarray(value.astype(target.dtype, copy=False))
    return traverse_util.unflatten_dict(flat)


def params_to_checkpoint(params: Mapping[str, Any], module_name: Callable[[str], str]) -> dict[str, np.ndarray]:
    """Inverse of :func:`checkpoint_to_params`: Flax params to ``{hf_name: numpy array}``.

    Args:
        params: Nested params dict (the ``"params"`` collection, not the whole variables dict).
        module_name: Maps a slash-separated Flax module path to a Hugging Face module-name template.

    Returns:
        Contiguous numpy arrays in PyTorch layout (Linear weights ``[out, in]``, one entry per layer).
    """
    if "params" in params and len(params) == 1:
        raise ValueError("Pass variables['params'], not the whole variables dict, to to_hf_state_dict().")
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        value = np.asarray(jax.device_get(value))
        name = _hf_param_name(module_name, path)
        if LAYER_PLACEHOLDER in name:
            layers = [(name.replace(LAYER_PLACEHOLDER, str(i)), value[i]) for i in range(value.shape[0])]
        else:
            layers = [(name, value)]
        for key, array in layers:
            if path[-1] == "kernel":
                array = array.T
            out[key] = np.array(array, order="C")  # a writable copy (device_get may return read-only views)
    return out


def attention_probs(query: jax.Array, key: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention weights with grouped-query support, computed in float32.

    Args:
        query: ``[batch, q_len, heads, head_dim]``.
        key: ``[batch, kv_len, kv_heads, head_dim]``; ``heads`` must be a multiple of ``kv_heads``. Query
            head ``h`` attends with key head ``h // (heads // kv_heads)``, as Hugging Face's ``repeat_kv``.
        mask: Boolean, broadcastable to ``[batch, 1, q_len, kv_len]``; True where attending is allowed.

    Returns:
        Weights ``[batch, kv_heads, groups, q_len, kv_len]`` in the query's dtype.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    query = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", query, key, preferred_element_type=jnp.float32)
    scores = scores.astype(jnp.float32) / np.sqrt(head_dim).astype(np.float32)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1).astype(query.dtype)


def attend(probs: jax.Array, value: jax.Array) -> jax.Array:
    """Applies weights from :func:`attention_probs` to ``value`` ``[batch, kv_len, kv_heads, head_dim]``.

    Returns:
        ``[batch, q_len, heads * head_dim]``.
    """
    out = jnp.einsum("bkgts,bskd->btkgd", probs, value)
    batch, q_len = out.shape[:2]
    return out.reshape(batch, q_len, -1)


def decoder_module_name(path: str, model: str, example: str) -> str:
    """A decoder's Flax module path as its HF module-name template: ``model/layers/x`` -> ``model.layers.{layer}.x``.

    Raises:
        ValueError: the path does not start with ``model`` or ``lm_head`` (names ``model``, the class, and shows
            ``example``).
    """
    parts = path.strip("/").split("/")
    if parts[0] not in ("model", "lm_head") or "" in parts:
        raise ValueError(
            f"Module path {path!r} is not a {model} path; expected it to start with 'model/' or be 'lm_head', e.g. "
            f"{example!r}."
        )
    if parts[:2] == ["model", "layers"]:
        parts = ["model", "layers", LAYER_PLACEHOLDER, *parts[2:]]
    return ".".join(parts)


def decoder_module_path(hf_name: str, model: str, example: str) -> tuple[str, int | None]:
    """Inverse of :func:`decoder_module_name`: ``(Flax module path, layer index or None)``.

    Raises:
        ValueError: the name does not start with ``model``/``lm_head``, or names ``model.layers`` without an index.
    """
    parts = hf_name.strip(".").split(".")
    if parts[0] not in ("model", "lm_head") or "" in parts:
        raise ValueError(f"{hf_name!r} is not a {model} module name; expected e.g. {example!r}.")
    if parts[:2] != ["model", "layers"]:
        return "/".join(parts), None
    if _LAYER_NAME.match(hf_name) is None:
        raise ValueError(f"{hf_name!r} names model.layers without a layer index; expected 'model.layers.N...'.")
    layer = None if parts[2] == LAYER_PLACEHOLDER else int(parts[2])
    return "/".join(["model", "layers", *parts[3:]]), layer
