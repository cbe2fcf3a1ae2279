"""BERT encoder in Flax Linen whose parameter paths mirror Hugging Face ``BertModel``."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from examples.models._common import (
    attend,
    attention_probs,
    checkpoint_to_params,
    params_to_checkpoint,
    read_config_json,
    read_safetensors_dir,
    resolve_dtype,
)

_ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
}

_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
"""Non-parameter buffers some BERT checkpoints store; they are skipped when loading."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT encoder (field names follow Hugging Face ``BertConfig``).

    Attributes:
        vocab_size: Vocabulary size.
        hidden_size: Model width.
        num_hidden_layers: Number of encoder layers.
        num_attention_heads: Number of attention heads.
        intermediate_size: Width of the feed-forward block.
        hidden_act: Activation name: ``"gelu"`` (exact, erf), ``"gelu_new"``, ``"gelu_pytorch_tanh"``,
            ``"relu"`` or ``"silu"``.
        hidden_dropout_prob: Dropout rate after embeddings and sub-blocks.
        attention_probs_dropout_prob: Dropout rate on attention weights.
        max_position_embeddings: Number of learned positions.
        type_vocab_size: Number of token types (segments).
        layer_norm_eps: Epsilon of the layer norms.
        initializer_range: Standard deviation of the normal initializer.
        add_pooling_layer: Whether the model has ``pooler/dense`` (tanh on the first token).
        num_labels: Output width of the ``classifier`` of :class:`BertForSequenceClassification`.
        classifier_dropout: Dropout before the classifier; ``None`` uses ``hidden_dropout_prob``.
        dtype: Computation dtype name.
        param_dtype: Parameter dtype name.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    add_pooling_layer: bool = True
    num_labels: int = 2
    classifier_dropout: float | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}.")
        resolve_dtype(self.dtype, "dtype")
        resolve_dtype(self.param_dtype, "param_dtype")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> BertConfig:
        """Builds a config from the contents of a Hugging Face BERT ``config.json``.

        Args:
            d: The parsed ``config.json``.
            **overrides: Fields to set regardless of ``d``, e.g. ``dtype="bfloat16"``.

        Returns:
            The config.

        Raises:
            ValueError: If ``d`` describes something this model cannot reproduce.
        """
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"config.json has model_type={model_type!r}; BertConfig expects 'bert'.")
        position_type = d.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                f"config.json has position_embedding_type={position_type!r}; only 'absolute' is supported."
            )
        kwargs: dict[str, Any] = {}
        skip = ("add_pooling_layer", "num_labels", "dtype", "param_dtype")
        for field in dataclasses.fields(cls):
            if field.name not in skip and d.get(field.name) is not None:
                kwargs[field.name] = d[field.name]
        if d.get("num_labels") is not None:
            kwargs["num_labels"] = int(d["num_labels"])
        elif d.get("id2label"):
            kwargs["num_labels"] = len(d["id2label"])
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **overrides: Any) -> BertConfig:
        """Reads a Hugging Face ``config.json`` (the file or its directory); see :meth:`from_hf_dict`."""
        return cls.from_hf_dict(read_config_json(path), **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """Returns a Hugging Face ``config.json`` dict for this model (read back by :meth:`from_hf_dict`).

        ``add_pooling_layer`` is not part of HF configs (the loader infers it from the weights); ``dtype`` and
        ``param_dtype`` are JAX-side settings. Neither is written.
        """
        skip = ("add_pooling_layer", "num_labels", "dtype", "param_dtype")
        d: dict[str, Any] = {"model_type": "bert", "position_embedding_type": "absolute"}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip})
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return d


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=resolve_dtype(config.dtype, "dtype"),
        param_dtype=resolve_dtype(config.param_dtype, "param_dtype"),
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


def _layer_norm(config: BertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=resolve_dtype(config.dtype, "dtype"),
        param_dtype=resolve_dtype(config.param_dtype, "param_dtype"),
        name="LayerNorm",
    )


def _embed(config: BertConfig, num: int, name: str) -> nn.Embed:
    return nn.Embed(
        num,
        config.hidden_size,
        embedding_init=nn.initializers.normal(config.initializer_range),
        dtype=resolve_dtype(config.dtype, "dtype"),
        param_dtype=resolve_dtype(config.param_dtype, "param_dtype"),
        name=name,
    )


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then ``LayerNorm`` and dropout."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool) -> jax.Array:
        """Embeds ``input_ids`` ``[batch, seq]``."""
        cfg = self.config
        positions = jnp.arange(input_ids.shape[1])[None]
        x = (
            _embed(cfg, cfg.vocab_size, "word_embeddings")(input_ids)
            + _embed(cfg, cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
            + _embed(cfg, cfg.max_position_embeddings, "position_embeddings")(positions)
        )
        x = _layer_norm(cfg)(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention projections ``query``, ``key``, ``value``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        """Attends ``x`` ``[batch, seq, hidden]`` under boolean ``mask`` ``[batch, 1, 1, seq]``."""
        cfg = self.config
        shape = (*x.shape[:2], cfg.num_attention_heads, cfg.head_dim)
        q = _dense(cfg, cfg.hidden_size, "query")(x).reshape(shape)
        k = _dense(cfg, cfg.hidden_size, "key")(x).reshape(shape)
        v = _dense(cfg, cfg.hidden_size, "value")(x).reshape(shape)
        probs = attention_probs(q, k, mask)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        return attend(probs, v)


class BertResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: HF ``BertSelfOutput`` and ``BertOutput``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, residual: jax.Array, deterministic: bool) -> jax.Array:
        """Projects ``x`` to the hidden size and adds it to ``residual``."""
        cfg = self.config
        x = _dense(cfg, cfg.hidden_size, "dense")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return _layer_norm(cfg)(x + residual)


class BertAttention(nn.Module):
    """Self-attention (``self``) followed by its output block (``output``)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        """Runs the attention sub-block on ``x`` ``[batch, seq, hidden]``."""
        h = BertSelfAttention(self.config, name="self")(x, mask, deterministic)
        return BertResidualOutput(self.config, name="output")(h, x, deterministic)


class BertIntermediate(nn.Module):
    """First feed-forward projection (``dense``) and activation."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies ``act(dense(x))``."""
        return _ACTIVATIONS[self.config.hidden_act](_dense(self.config, self.config.intermediate_size, "dense")(x))


class BertLayer(nn.Module):
    """One post-norm encoder layer: ``attention``, ``intermediate``, ``output``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        """Runs the layer on ``x`` ``[batch, seq, hidden]``."""
        x = BertAttention(self.config, name="attention")(x, mask, deterministic)
        h = BertIntermediate(self.config, name="intermediate")(x)
        return BertResidualOutput(self.config, name="output")(h, x, deterministic)


class BertEncoder(nn.Module):
    """Stack of unrolled layers ``layer_0`` … ``layer_{N-1}``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, deterministic: bool) -> jax.Array:
        """Runs every layer in turn."""
        for i in range(self.config.num_hidden_layers):
            x = BertLayer(self.config, name=f"layer_{i}")(x, mask, deterministic)
        return x


class BertPooler(nn.Module):
    """``tanh(dense(hidden[:, 0]))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        """Pools the first token of ``hidden`` ``[batch, seq, hidden]``."""
        return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(hidden[:, 0]))


class BertModel(nn.Module):
    """BERT encoder (HF ``BertModel``): ``embeddings``, ``encoder``, optional ``pooler``."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
        return_pooled: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Encodes a batch.

        Args:
            input_ids: Token ids ``[batch, seq]``.
            attention_mask: Optional ``[batch, seq]`` with 1 for real tokens and 0 for padding.
            token_type_ids: Optional segment ids ``[batch, seq]``; defaults to zeros.
            deterministic: Disables dropout when True.
            return_pooled: Also return the pooler output (requires ``config.add_pooling_layer``).

        Returns:
            The last hidden state ``[batch, seq, hidden]`` (compute dtype), or ``(last_hidden, pooled)``.
        """
        cfg = self.config
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        x = BertEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
        hidden = BertEncoder(cfg, name="encoder")(x, mask, deterministic)
        if not cfg.add_pooling_layer:
            if return_pooled:
                raise ValueError("return_pooled=True needs a pooler; build the model with add_pooling_layer=True.")
            return hidden
        # Always run the pooler so that init creates its params; XLA drops it when unused.
        pooled = BertPooler(cfg, name="pooler")(hidden)
        return (hidden, pooled) if return_pooled else hidden


class BertForSequenceClassification(nn.Module):
    """``bert`` encoder + pooler, dropout, ``classifier`` Dense (HF ``BertForSequenceClassification``)."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Returns float32 logits ``[batch, num_labels]``; arguments as :meth:`BertModel.__call__`."""
        cfg = self.config
        if not cfg.add_pooling_layer:
            raise ValueError("BertForSequenceClassification classifies the pooler output; set add_pooling_layer=True.")
        _, pooled = BertModel(cfg, name="bert")(
            input_ids, attention_mask, token_type_ids, deterministic, return_pooled=True
        )
        rate = cfg.hidden_dropout_prob if cfg.classifier_dropout is None else cfg.classifier_dropout
        pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
        return _dense(cfg, cfg.num_labels, "classifier")(pooled).astype(jnp.float32)


def mean_pool(hidden: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Averages token vectors over real tokens (sentence-transformers mean pooling).

    Args:
        hidden: ``[batch, seq, hidden]``.
        mask: Optional ``[batch, seq]`` with 1 for real tokens; all tokens count when None.

    Returns:
        ``[batch, hidden]`` in float32.
    """
    hidden = hidden.astype(jnp.float32)
    if mask is None:
        return hidden.mean(axis=1)
    weights = mask.astype(jnp.float32)[..., None]
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


_OUR_LAYER = re.compile(r"^layer_(\d+)$")


def hf_module_name(path: str, prefix: str = "") -> str:
    """Maps a Flax module path to its Hugging Face module name.

    Layers are unrolled, so the index is part of the path and the result holds no ``{layer}`` placeholder.

    Args:
        path: Slash-separated module path without the parameter leaf, e.g.
            ``"encoder/layer_3/attention/self/query"`` (or ``"bert/encoder/..."`` / ``"classifier"`` for
            :class:`BertForSequenceClassification`).
        prefix: Prepended to the result, e.g. ``"bert."`` to address a ``BertModel`` inside a task model.

    Returns:
        The dotted HF name, e.g. ``"encoder.layer.3.attention.self.query"``.

    Raises:
        ValueError: If the path is empty or names a malformed encoder layer.
    """
    parts = path.strip("/").split("/")
    if "" in parts:
        raise ValueError(f"Module path {path!r} is empty or has an empty component; expected e.g. 'encoder/layer_0'.")
    out = []
    for i, part in enumerate(parts):
        if i > 0 and parts[i - 1] == "encoder":
            match = _OUR_LAYER.match(part)
            if match is None:
                raise ValueError(f"Module path {path!r}: expected 'layer_N' after 'encoder', got {part!r}.")
            out.extend(["layer", match.group(1)])
        else:
            out.append(part)
    return prefix + ".".join(out)


def our_module_path(hf_name: str, prefix: str = "") -> tuple[str, int | None]:
    """Inverse of :func:`hf_module_name`.

    Args:
        hf_name: Dotted HF module name, e.g. ``"encoder.layer.3.attention.self.query"``.
        prefix: Stripped from ``hf_name`` first (e.g. ``"bert."``); it must be present when given.

    Returns:
        ``(path, None)``, e.g. ``("encoder/layer_3/attention/self/query", None)``. The second item, the index
        into a scanned layer axis, is always None because BERT layers are unrolled.

    Raises:
        ValueError: If the prefix is missing or ``encoder.layer`` is not followed by an index.
    """
    if prefix:
        if not hf_name.startswith(prefix):
            raise ValueError(f"{hf_name!r} does not start with prefix {prefix!r}; pass prefix='' for BertModel names.")
        hf_name = hf_name[len(prefix) :]
    parts = hf_name.strip(".").split(".")
    if "" in parts:
        raise ValueError(f"{hf_name!r} is not a module name; expected e.g. 'encoder.layer.0.output.dense'.")
    out = []
    i = 0
    while i < len(parts):
        if parts[i] == "layer" and i > 0 and parts[i - 1] == "encoder":
            if i + 1 >= len(parts) or not parts[i + 1].isdigit():
                raise ValueError(f"{hf_name!r}: expected 'encoder.layer.N', with N a layer index.")
            out.append(f"layer_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return "/".join(out), None


def abstract_params(config: BertConfig, *, with_classifier: bool = False) -> dict[str, Any]:
    """Shapes and dtypes (``jax.ShapeDtypeStruct``) of the params, without allocating.

    Args:
        config: The model config.
        with_classifier: Describe :class:`BertForSequenceClassification` instead of :class:`BertModel`.
    """
    model = BertForSequenceClassification(config) if with_classifier else BertModel(config)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return variables["params"]


def load_hf_checkpoint(
    directory: str | os.PathLike[str],
    *,
    with_classifier: bool = False,
    prefix: str | None = None,
    strict: bool = True,
    **config_overrides: Any,
) -> tuple[BertConfig, dict[str, Any]]:
    """Loads a Hugging Face BERT checkpoint directory (``config.json`` + ``*.safetensors``).

    Args:
        directory: Directory written by ``save_pretrained(..., safe_serialization=True)``, e.g. a download of
            ``sentence-transformers/all-MiniLM-L6-v2`` (whose keys have no ``bert.`` prefix).
        with_classifier: Load :class:`BertForSequenceClassification` params (``bert/...`` + ``classifier``)
            from a ``BertForSequenceClassification`` checkpoint instead of :class:`BertModel` params.
        prefix: Prefix of the encoder's tensor names for :class:`BertModel` loading; by default ``"bert."``
            if any tensor name starts with it, else ``""``.
        strict: If False, checkpoint tensors the model does not use (e.g. ``cls.*`` or ``classifier.*``
            heads) are dropped instead of raising.
        **config_overrides: Passed to :meth:`BertConfig.from_hf_dict`. ``add_pooling_layer`` defaults to
            whether the checkpoint holds pooler weights.

    Returns:
        ``(config, params)``; apply with ``BertModel(config).apply({"params": params}, input_ids, mask)``.

    Raises:
        ValueError: On missing or unexpected tensors, or tensors whose shapes disagree with the config.
    """
    directory = os.fspath(directory)
    tensors = read_safetensors_dir(directory)
    if with_classifier:
        if prefix not in (None, "bert."):
            raise ValueError(f"with_classifier=True reads 'bert.'-prefixed tensors; got prefix={prefix!r}.")
        prefix = ""
        pooler_key = "bert.pooler.dense.weight"
    else:
        if prefix is None:
            prefix = "bert." if any(name.startswith("bert.") for name in tensors) else ""
        pooler_key = f"{prefix}pooler.dense.weight"
    config_overrides.setdefault("add_pooling_layer", with_classifier or pooler_key in tensors)
    config = BertConfig.from_json_file(directory, **config_overrides)

    def ignore(name: str) -> bool:
        return name.endswith(_BUFFERS)

    expected = traverse_util.flatten_dict(abstract_params(config, with_classifier=with_classifier))
    params = checkpoint_to_params(
        tensors,
        expected,
        lambda path: hf_module_name(path, prefix),
        num_layers=config.num_hidden_layers,
        ignore=ignore,
        strict=strict,
        source=directory,
        model_name="BertForSequenceClassification" if with_classifier else "BertModel",
    )
    return config, params


def to_hf_state_dict(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Converts params to a HF state dict (``[out, in]`` Linear weights).

    Args:
        params: :class:`BertModel` params, or :class:`BertForSequenceClassification` params (whose paths
            already start with ``bert/``; keep ``prefix=""`` for those).
        prefix: Prepended to every name, e.g. ``"bert."``.
    """
    return params_to_checkpoint(params, lambda path: hf_module_name(path, prefix))
