"""HF PEFT prompt tuning (``PROMPT_TUNING``) and prefix tuning (``PREFIX_TUNING``): one tensor, ``prompt_embeddings``.

PEFT saves prompt-learning adapters as a single tensor ``prompt_embeddings`` (no ``base_model.model.`` prefix):

- prompt tuning: the virtual token embeddings ``(num_virtual_tokens, token_dim)``, ``token_dim`` the model width;
- prefix tuning: the flat prefix ``(num_virtual_tokens, num_layers·2·token_dim)`` with ``token_dim =
  num_kv_heads·head_dim`` and ``num_attention_heads = num_kv_heads`` in the config (PEFT's grouped-query rule),
  read as ``(layer, key|value, head, head_dim)`` per token. With ``prefix_projection`` PEFT saves the *projected*
  prefix (the MLP's output), not the MLP, and loads it for inference only.

So an export of a projected :class:`jaxpeft.PrefixTuningConfig` writes the MLP's output with
``prefix_projection: false`` (it holds the prefix itself, which PEFT then loads for inference and for further
training alike), and an import always gives an unprojected config. Encoder-decoder files
(``num_transformer_submodules`` 2) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft.hf._common import adapter_dtype, check_tensors
from jaxpeft.hf._config import CONFIG_NAME
from jaxpeft.methods.base import Adapter, adapter_items
from jaxpeft.methods.prompt import (
    INPUT_EMBEDDINGS,
    PrefixTuningConfig,
    PrefixWeights,
    PromptTuningConfig,
    PromptWeights,
)

__all__ = ["PEFT_TYPES", "from_hf", "to_hf"]

#: The HF ``peft_type`` of each config.
PEFT_TYPES = {PromptTuningConfig: "PROMPT_TUNING", PrefixTuningConfig: "PREFIX_TUNING"}
KEY = "prompt_embeddings"
_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "RANDOM"}
#: Fields of PEFT 0.21.2's PromptTuningConfig / PrefixTuningConfig; others, when set, are refused.
_COMMON = (
    "auto_mapping",
    "base_model_name_or_path",
    "inference_mode",
    "modules_to_save",
    "num_attention_heads",
    "num_layers",
    "num_transformer_submodules",
    "num_virtual_tokens",
    "peft_type",
    "peft_version",
    "revision",
    "task_type",
    "token_dim",
)
_KNOWN = {
    "PROMPT_TUNING": {*_COMMON, "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_kwargs",
                      "tokenizer_name_or_path"},
    "PREFIX_TUNING": {*_COMMON, "encoder_hidden_size", "init_weights", "prefix_projection"},
}  # fmt: skip


def _the_node(adapters: Any, cfg: PromptTuningConfig | PrefixTuningConfig, params: Any) -> Adapter:
    """The one node of ``adapters``, checked against what ``cfg`` makes on ``params``."""
    ((path, table, _),) = cfg.select(params, None)  # check_targets: exactly one
    found = list(adapter_items(adapters))
    cls = PromptWeights if isinstance(cfg, PromptTuningConfig) else PrefixWeights
    if len(found) != 1 or found[0][0] != path or not isinstance(found[0][1], cls):
        shown = [(p, type(n).__name__) for p, n in found][:3]
        raise ValueError(
            f"`adapters` hold {shown}; a {type(cfg).__name__} makes one {cls.__name__} at {path!r} on these params. "
            "Pass the adapters made with this config."
        )
    node = found[0][1]
    planned = jax.eval_shape(lambda: cfg.init_target(path, table, node.layout, jax.random.key(0)))
    want = {p: tuple(x.shape) for p, x in leaves_with_paths(planned)}
    have = {p: tuple(x.shape) for p, x in leaves_with_paths(node)}
    if want != have:
        raise ValueError(
            f"the adapter at {path!r} has arrays {have}; this {type(cfg).__name__} makes {want}. Pass the "
            "config the adapters were made with."
        )
    return node


def to_hf(
    adapters: Any,
    cfg: PromptTuningConfig | PrefixTuningConfig,
    params: Any,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    **unused: Any,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The ``adapter_config.json`` contents and ``{"prompt_embeddings": array}`` of a prompt or prefix adapter.

    Guarantees: ``PeftModel.from_pretrained`` on the result runs the same model as ``jaxpeft`` with the hook of
    ``jaxpeft.methods.prompt`` (logits equal to 1e-4 in the interop tests; PEFT's prompt-tuning logits have ``n``
    extra leading rows). ``num_layers`` and ``num_attention_heads`` are left to PEFT for prompt tuning (it fills them
    from the model); the init is written as ``RANDOM`` for ``"text"`` (PEFT would need the text and tokenizer, and
    never re-runs the init of a loaded adapter).

    Args:
      adapters: the adapter tree (``jaxpeft.init`` with ``cfg``, trained or restored).
      cfg: the ``PromptTuningConfig`` or ``PrefixTuningConfig``.
      params: the base params (arrays or ``jax.ShapeDtypeStruct``).
      task_type: HF ``task_type`` (e.g. ``"CAUSAL_LM"``).
      base_model_name_or_path: recorded as HF does.
      **unused: options of ``jaxpeft.hf.to_state_dict`` for module adapters; each must be None.

    Raises:
      ValueError: the adapters are not what ``cfg`` makes on ``params``; an option of ``unused`` is set.
      TypeError: ``task_type`` or ``base_model_name_or_path`` is not a string.
    """
    given = sorted(name for name, value in unused.items() if value is not None)
    if given:
        raise ValueError(
            f"{given} do not apply to {type(cfg).__name__} adapters (one `prompt_embeddings` tensor, no modules); "
            "leave them None."
        )
    for name, value in (("task_type", task_type), ("base_model_name_or_path", base_model_name_or_path)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"`{name}`={value!r}; expected a string or None.")
    node = _the_node(adapters, cfg, params)
    common = {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "peft_type": PEFT_TYPES[type(cfg)],
        "revision": None,
        "task_type": task_type,
    }
    if isinstance(cfg, PromptTuningConfig):
        assert isinstance(node, PromptWeights)
        tensor = node.embeddings
        config = {
            **common,
            "num_attention_heads": None,
            "num_layers": None,
            "prompt_tuning_init": _INITS[cfg.init],
            "prompt_tuning_init_text": None,
            "token_dim": int(tensor.shape[1]),
            "tokenizer_kwargs": None,
            "tokenizer_name_or_path": None,
        }
    else:
        assert isinstance(node, PrefixWeights)
        tensor = node.flat()
        config = {
            **common,
            "encoder_hidden_size": cfg.token_dim,
            "init_weights": None,
            "num_attention_heads": cfg.num_kv_heads,
            "num_layers": cfg.num_layers,
            "prefix_projection": False,
            "token_dim": cfg.token_dim,
        }
    return dict(sorted(config.items())), {KEY: np.asarray(jax.device_get(tensor))}


def _int_field(config: Mapping[str, Any], field: str) -> int:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{CONFIG_NAME} has `{field}`={value!r:.80}; expected a positive integer.")
    return value


def _check_fields(config: Mapping[str, Any], peft_type: str) -> None:
    unknown = sorted(k for k in config if k not in _KNOWN[peft_type] and config[k] not in (None, False, [], {}, ""))
    if unknown:
        raise ValueError(
            f"{CONFIG_NAME} sets {unknown[:3]}, which PEFT 0.21.2's {peft_type} config does not have; jaxpeft cannot "
            "tell whether it changes the adapter's output, so it refuses the file."
        )
    submodules = config.get("num_transformer_submodules")
    if submodules not in (None, 1):
        raise ValueError(
            f"{CONFIG_NAME} has `num_transformer_submodules`={submodules!r}; jaxpeft imports prompt-learning adapters "
            "of decoder-only models (1): an encoder-decoder's prefix is shared by two stacks."
        )
    if config.get("modules_to_save"):
        raise ValueError(
            f"{CONFIG_NAME} has `modules_to_save`={config['modules_to_save']!r:.80}; jaxpeft imports prompt-learning "
            "adapters without saved modules."
        )


def from_hf(
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    params: Any,
    *,
    targets: Any = INPUT_EMBEDDINGS,
    dtype: Any = None,
) -> tuple[PromptTuningConfig | PrefixTuningConfig, dict[str, Any]]:
    """A config and adapter tree from a HF PEFT ``PROMPT_TUNING`` or ``PREFIX_TUNING`` adapter.

    Args:
      config: the parsed ``adapter_config.json``.
      tensors: ``{"prompt_embeddings": array}``.
      params: the base params; ``targets`` must select their input embedding table.
      targets: the config's ``targets`` (the input embedding table), for tables under other names.
      dtype: adapter dtype; by default the file's.

    Returns:
      ``(cfg, adapters)``: a ``PromptTuningConfig`` (init ``"random"``) or an unprojected ``PrefixTuningConfig``
      (a projected file holds the projected prefix) and its one-node tree.

    Raises:
      ValueError: a field PEFT does not have, an encoder-decoder file, saved modules, other tensors than
        ``prompt_embeddings``, a shape that disagrees with the config, a prompt whose width is not the embedding
        table's, a ``token_dim`` that ``num_attention_heads`` does not divide.
    """
    peft_type = config.get("peft_type")
    _check_fields(config, str(peft_type))
    arrays = check_tensors(tensors)
    if set(arrays) != {KEY}:
        raise ValueError(f"the {peft_type} adapter tensors are {sorted(arrays)[:4]}; PEFT saves exactly one, {KEY!r}.")
    tensor = arrays[KEY]
    n, token_dim = _int_field(config, "num_virtual_tokens"), _int_field(config, "token_dim")
    cfg: PromptTuningConfig | PrefixTuningConfig
    if peft_type == "PROMPT_TUNING":
        cfg = PromptTuningConfig(n, targets=targets, dtype=adapter_dtype([tensor], dtype))
        want: tuple[int, ...] = (n, token_dim)
    else:
        layers, heads = _int_field(config, "num_layers"), _int_field(config, "num_attention_heads")
        if token_dim % heads:
            raise ValueError(
                f"{CONFIG_NAME} has `token_dim`={token_dim} and `num_attention_heads`={heads}, which does not divide "
                "it; a prefix's token_dim is num_key_value_heads·head_dim."
            )
        cfg = PrefixTuningConfig(
            n, layers, heads, token_dim // heads, targets=targets, dtype=adapter_dtype([tensor], dtype)
        )
        want = (n, cfg.flat_dim)
    if tuple(tensor.shape) != want:
        raise ValueError(
            f"adapter tensor {KEY!r} has shape {tuple(tensor.shape)}; the {CONFIG_NAME} says {want}. The files do "
            "not belong together."
        )
    ((path, table, layout),) = cfg.select(params, None)
    if isinstance(cfg, PromptTuningConfig) and tuple(table.shape)[1] != token_dim:
        raise ValueError(
            f"{CONFIG_NAME} has `token_dim`={token_dim} but the embedding table {path!r} is {table.shape[1]} wide; "
            "the adapter was trained for another model."
        )
    value = jax.numpy.asarray(tensor, cfg.dtype)
    node: Adapter = (
        PromptWeights(value, layout)
        if isinstance(cfg, PromptTuningConfig)
        else PrefixWeights(value, None, None, None, None, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, layout)
    )
    return cfg, set_path({}, path, node)
