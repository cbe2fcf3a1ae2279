"""Prompt tuning and prefix tuning: trained virtual tokens, prepended to the input or to every layer's keys/values.

Unlike the other methods these adapt no layer call: they add inputs. The adapter tree holds one node, hung on the
model's input embedding table (the config's ``targets``; the table fixes the prompt width and serves "text"
initialisation), so ``jaxpeft.init``, ``plan``, ``jaxpeft.checkpoint`` and ``jaxpeft.hf`` handle them like any
method. The model consumes the node through two pure helpers, a ~10-line hook in its own code:

- **prompt tuning** (Lester et al. 2021, HF ``PromptTuningConfig``): ``embeds, mask = prepend_prompt(embeds, mask,
  adapters)`` before the first layer. The virtual tokens take positions ``0..n-1`` and the real tokens follow
  (HF PEFT ignores ``position_ids`` here); drop the first ``n`` output rows.
- **prefix tuning** (Li & Liang 2021, HF ``PrefixTuningConfig``): ``keys, values = prefix_kv(adapters, batch)``,
  each ``(num_layers, batch, n, num_kv_heads, head_dim)``; layer ``l`` attends to ``concat(keys[l], k)`` and
  ``concat(values[l], v)`` (the prefix keys are used as given: no RoPE), every query sees all ``n`` prefix slots,
  the attention mask is ``extend_attention_mask(mask, n)`` and the real tokens' positions are shifted by ``n``
  (``n..n+T-1`` by default), as in HF transformers where the prefix is a KV cache of length ``n``.

The hook, in a Linen model (NNX alike: the same lines in ``__call__``)::

    def __call__(self, ids, mask=None, prompt=None, prefix=None):
        x = self.embed(ids)
        n = 0
        if prompt is not None:                                     # prompt tuning
            x, mask = jaxpeft.prepend_prompt(x, mask, prompt)
            n = x.shape[1] - ids.shape[1]
        offset = 0 if prefix is None else prefix[0].shape[2]       # prefix tuning
        if prefix is not None and mask is not None:
            mask = jaxpeft.extend_attention_mask(mask, offset)
        positions = offset + jnp.arange(x.shape[1])
        for i, layer in enumerate(self.layers):  # attention: k = concat(prefix[0][i], k), v likewise
            x = layer(x, positions, mask, None if prefix is None else (prefix[0][i], prefix[1][i]))
        return self.head(x)[:, n:]

    logits = model.apply({"params": params}, ids, mask, prompt=adapters)                   # or:
    logits = model.apply({"params": params}, ids, mask, prefix=jaxpeft.prefix_kv(adapters, ids.shape[0]))

Neither method merges into the weights, and neither is the identity at init (zero keys and values still take
attention weight); prefix tuning with the "zero" init of the projection's last layer is as close as PEFT gets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._paths import leaves_with_paths, set_path
from jaxpeft._select import Layout, TargetSpec
from jaxpeft.hf import codec as hfc
from jaxpeft.methods._factors import check_dtype
from jaxpeft.methods.bank import AdapterBank
from jaxpeft.protocol import STATIC, Adapter, InputAdapter, MethodConfig, adapter_items

__all__ = [
    "INPUT_EMBEDDINGS",
    "PrefixTuningConfig",
    "PrefixWeights",
    "PromptTuningConfig",
    "PromptWeights",
    "extend_attention_mask",
    "prefix_kv",
    "prepend_prompt",
]

#: Default ``targets`` of both configs: the input embedding table under its usual module names (HF Llama's
#: ``embed_tokens``, BERT's ``word_embeddings``, GPT-2's ``wte``, ...).
INPUT_EMBEDDINGS = r"(^|/)(embed_tokens|word_embeddings|wte|embed_in|tok_embeddings|token_embedding)/embedding$"

_PROMPT_INITS = ("random", "text", "sample_vocab")
_PREFIX_INITS = ("random", "zero")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}`={value!r}; expected a positive integer.")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}`={value!r}; expected one of {choices}.")
    return str(value)


# ------------------------------------------------------------------------------------------------ nodes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptWeights(InputAdapter):
    """Prompt tuning's virtual token embeddings ``(num_virtual_tokens, token_dim)`` (HF ``prompt_embeddings``)."""

    hook: ClassVar[str] = "jaxpeft.prepend_prompt"

    embeddings: Any
    layout: Layout = dataclasses.field(metadata=STATIC)

    def describe(self) -> str:
        return f"{self.embeddings.shape[0]} virtual tokens"

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        if len(weight_shape) != 2 or self.embeddings.shape[-1] != weight_shape[-1]:
            return f"the prompt is {self.embeddings.shape[-1]} wide, the (vocab, width) embedding table {weight_shape}"
        return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefixWeights(InputAdapter):
    """Prefix tuning's trained prefix: ``embeddings`` is the flat per-token key/value prefix
    ``(num_virtual_tokens, num_layers·2·num_kv_heads·head_dim)`` (HF ``prompt_embeddings``, laid out
    ``(layer, key|value, head, head_dim)`` per token), or with the projection (``w1`` set) the token embeddings
    ``(num_virtual_tokens, token_dim)`` that ``tanh(E·w1 + b1)·w2 + b2`` maps to that flat prefix."""

    hook: ClassVar[str] = "jaxpeft.prefix_kv"

    embeddings: Any
    w1: Any = None
    b1: Any = None
    w2: Any = None
    b2: Any = None
    num_layers: int = dataclasses.field(default=1, metadata=STATIC)
    num_kv_heads: int = dataclasses.field(default=1, metadata=STATIC)
    head_dim: int = dataclasses.field(default=1, metadata=STATIC)
    layout: Layout = dataclasses.field(metadata=STATIC, kw_only=True)

    def describe(self) -> str:
        n = self.embeddings.shape[0]
        proj = f", projected through {self.w1.shape[1]} hidden" if self.w1 is not None else ""
        return f"{n} virtual tokens x {self.num_layers} layers{proj}"

    def flat(self) -> jax.Array:
        """The prefix ``(num_virtual_tokens, num_layers·2·num_kv_heads·head_dim)``: HF's saved ``prompt_embeddings``."""
        if self.w1 is None:
            return self.embeddings
        hidden = jnp.tanh(self.embeddings @ self.w1 + self.b1)
        return hidden @ self.w2 + self.b2


# ------------------------------------------------------------------------------------------------ configs


def _check_table(rows: Sequence[tuple[str, Any, Layout]], targets: TargetSpec, what: str) -> None:
    """Raise unless the selection is exactly one ``(vocab, width)`` embedding table."""
    if len(rows) != 1:
        paths = [p for p, _, _ in rows]
        raise ValueError(
            f"`targets`={targets!r} selected {len(rows)} weights {paths[:4]}; {what} hangs its virtual tokens on the "
            "model's one input embedding table: give a pattern that selects only it, e.g. "
            "targets=r'embed_tokens/embedding$'."
        )
    path, leaf, layout = rows[0]
    if layout.kind != "embed" or len(leaf.shape) != 2:
        raise ValueError(
            f"`targets` selected {path!r} of shape {tuple(leaf.shape)} (a {layout.kind} weight); {what} expects the "
            "input embedding table (vocab, width), e.g. targets=r'embed_tokens/embedding$'."
        )


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig(MethodConfig):
    """Prompt tuning: ``num_virtual_tokens`` trained input embeddings prepended to every sequence (HF
    ``PromptTuningConfig``); frozen, hashable, JSON round-trippable.

    Args:
      num_virtual_tokens: how many virtual tokens.
      init: ``"random"``: ``N(0, 1)`` (HF's ``RANDOM``, an ``nn.Embedding``'s default); ``"text"``: the embeddings
        of ``init_token_ids`` (HF's ``TEXT`` with the text already tokenised), repeated or cut to
        ``num_virtual_tokens`` as HF does; ``"sample_vocab"``: the embeddings of token ids drawn uniformly from the
        vocabulary with the key (HF's ``SAMPLE_VOCAB``).
      init_token_ids: the token ids for ``init="text"`` (e.g. ``tokenizer(text)["input_ids"]``); only with it.
      targets: the input embedding table, whose width the prompt takes (one weight; the default knows the usual
        names, see ``INPUT_EMBEDDINGS``).
      exclude: removed from the selection.
      dtype: dtype of the virtual tokens (cast to the activations' dtype when prepended, as HF does).

    References:
      Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning", 2021.
    """

    method: ClassVar[str] = "prompt_tuning"

    num_virtual_tokens: int
    init: str = "random"
    init_token_ids: tuple[int, ...] = ()
    targets: TargetSpec = INPUT_EMBEDDINGS
    exclude: TargetSpec = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("num_virtual_tokens", self.num_virtual_tokens)
        _choice("init", self.init, _PROMPT_INITS)
        ids = self.init_token_ids
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise ValueError(f"`init_token_ids`={ids!r}; expected a sequence of token ids (integers).")
        ids = tuple(ids)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"`init_token_ids`={ids!r:.80}; expected non-negative integer token ids.")
        if (self.init == "text") != bool(ids):
            raise ValueError(
                f'`init_token_ids` (given {len(ids)}) go with init="text" only (init={self.init!r}); for init="text" '
                "pass the tokenised text, e.g. init_token_ids=tokenizer(text)['input_ids']."
            )
        object.__setattr__(self, "init_token_ids", ids)
        object.__setattr__(self, "dtype", check_dtype(self.dtype))

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        _check_table(rows, self.targets, "prompt tuning")

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> PromptWeights:
        n = self.num_virtual_tokens
        vocab, width = weight.shape
        if self.init == "random":
            return PromptWeights(jax.random.normal(key, (n, width), self.dtype), layout=layout)
        if self.init == "text":
            ids = self.init_token_ids * math.ceil(n / len(self.init_token_ids))
            bad = sorted({i for i in self.init_token_ids if i >= vocab})
            if bad:
                raise ValueError(
                    f"`init_token_ids` {bad[:4]} are outside the vocabulary of {path!r} ({vocab} tokens); tokenise "
                    "with the base model's tokenizer."
                )
            index = jnp.asarray(ids[:n], jnp.int32)
        else:
            index = jax.random.randint(key, (n,), 0, vocab)
        rows = jnp.take(jnp.asarray(weight), index, axis=0)
        return PromptWeights(rows.astype(jnp.float32).astype(self.dtype), layout=layout)


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig(MethodConfig):
    """Prefix tuning: trained keys and values for ``num_virtual_tokens`` extra slots in every attention layer (HF
    ``PrefixTuningConfig``); frozen, hashable, JSON round-trippable.

    The attention shape is the model's key/value shape: with grouped-query attention ``num_kv_heads`` is the number
    of key/value heads (HF PEFT does the same: its ``token_dim`` is ``num_kv_heads·head_dim``).

    Args:
      num_virtual_tokens: prefix length.
      num_layers: attention layers of the model.
      num_kv_heads: key/value heads per layer.
      head_dim: width of one head.
      prefix_projection: train token embeddings ``(n, num_kv_heads·head_dim)`` and a 2-layer tanh MLP that maps
        them to the prefix (HF's reparameterisation) instead of the prefix itself.
      encoder_hidden_size: the MLP's hidden width (default ``num_kv_heads·head_dim``, as HF); only with the
        projection.
      init: ``"random"``: ``N(0, 1)`` prefix (or token embeddings) and PyTorch ``Linear`` default
        ``U(±1/√fan_in)`` MLP layers, as HF; ``"zero"``: HF's ``init_weights="zero"`` (a zero prefix, or a zero
        last MLP layer).
      targets: the input embedding table (only its path anchors the adapter; its values are never read).
      exclude: removed from the selection.
      dtype: dtype of the trained arrays.

    References:
      Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", 2021.
    """

    method: ClassVar[str] = "prefix_tuning"
    reads_weight_values: ClassVar[bool] = False

    num_virtual_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init: str = "random"
    targets: TargetSpec = INPUT_EMBEDDINGS
    exclude: TargetSpec = ()
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_virtual_tokens", "num_layers", "num_kv_heads", "head_dim"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"`prefix_projection`={self.prefix_projection!r}; expected True or False.")
        if self.encoder_hidden_size is not None:
            _positive_int("encoder_hidden_size", self.encoder_hidden_size)
            if not self.prefix_projection:
                raise ValueError(
                    f"`encoder_hidden_size`={self.encoder_hidden_size} is the projection MLP's width; set "
                    "prefix_projection=True or leave it None."
                )
        _choice("init", self.init, _PREFIX_INITS)
        object.__setattr__(self, "dtype", check_dtype(self.dtype))

    @property
    def token_dim(self) -> int:
        """``num_kv_heads · head_dim``: one layer's key (or value) width per token (HF's ``token_dim``)."""
        return self.num_kv_heads * self.head_dim

    @property
    def flat_dim(self) -> int:
        """``num_layers · 2 · token_dim``: the width of the flat prefix."""
        return self.num_layers * 2 * self.token_dim

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        _check_table(rows, self.targets, "prefix tuning")

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> PrefixWeights:
        n, dtype = self.num_virtual_tokens, self.dtype
        static = {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
        if not self.prefix_projection:
            shape = (n, self.flat_dim)
            flat = jnp.zeros(shape, dtype) if self.init == "zero" else jax.random.normal(key, shape, dtype)
            return PrefixWeights(flat, layout=layout, **static)
        hidden = self.encoder_hidden_size or self.token_dim
        k_emb, k_w1, k_b1, k_w2, k_b2 = jax.random.split(key, 5)

        def linear(k: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
            bound = 1.0 / math.sqrt(fan_in)
            return jax.random.uniform(k, shape, dtype, -bound, bound)

        w1, b1 = linear(k_w1, (self.token_dim, hidden), self.token_dim), linear(k_b1, (hidden,), self.token_dim)
        if self.init == "zero":
            w2, b2 = jnp.zeros((hidden, self.flat_dim), dtype), jnp.zeros((self.flat_dim,), dtype)
        else:
            w2, b2 = linear(k_w2, (hidden, self.flat_dim), hidden), linear(k_b2, (self.flat_dim,), hidden)
        emb = jax.random.normal(k_emb, (n, self.token_dim), dtype)
        return PrefixWeights(emb, w1, b1, w2, b2, layout=layout, **static)


# ------------------------------------------------------------------------------------------------ the hook


_CONFIG_OF = {"PromptWeights": "PromptTuningConfig", "PrefixWeights": "PrefixTuningConfig"}


def _static_int(name: str, value: Any, least: int, meaning: str) -> int:
    """``value`` as an ``int`` when it is a Python (or NumPy) integer ``>= least``; ``ValueError`` naming ``name``
    otherwise, a ``jax.Array`` included (it would be traced under ``jit``, and it fixes an array shape)."""
    kind = "a positive" if least == 1 else "a non-negative"
    if isinstance(value, jax.Array):
        fault = f"is a jax.Array ({value.dtype}{list(value.shape)}), but it fixes a shape (a traced value cannot)"
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        fault = f"is a {type(value).__name__}"
    elif value < least:
        fault = "is negative" if value < 0 else "is zero"
    else:
        return int(value)
    shown = "" if isinstance(value, jax.Array) else f"={value!r}"
    raise ValueError(f"`{name}`{shown} {fault}; expected {kind} static Python int ({meaning}).")


def _need_array(name: str, value: Any, expected: str) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an array (has ``shape`` and ``dtype``)."""
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise ValueError(f"`{name}` is a {type(value).__name__}; expected an array {expected}, e.g. jnp.asarray(...).")


def _one_of_bank(what: str, shape: tuple[int, ...], names: Sequence[str] = ()) -> ValueError:
    """The error for a bank of prompts/prefixes (a leading adapter axis) where the hook takes one."""
    plural = "prompts" if what == "prompt" else "prefixes"
    named = f" {list(names)}" if names else ""
    pick = f"jaxpeft.select_adapter({what}, {names[0]!r})" if names else f"jax.tree.map(lambda x: x[i], {what})"
    return ValueError(
        f"`{what}` holds a bank of {shape[0]} {plural}{named} (leading axis: embeddings {shape}); {what} tuning "
        f"takes one {what}: select one with {pick}."
    )


def _found(tree: Any, cls: type[Adapter], what: str) -> list[Adapter]:
    """The ``cls`` nodes of an adapter tree; ``ValueError`` naming what it holds instead when there is not one."""
    try:
        items = list(adapter_items(tree))
    except ValueError as err:
        held = f"0 {cls.__name__} nodes ({str(err).split(';')[0]})"
    else:
        found = [node for _, node in items if isinstance(node, cls)]
        if len(found) == 1:
            return found
        banks = [n for _, n in items if isinstance(n, AdapterBank) and isinstance(n.adapters, cls)]
        if banks:
            raise _one_of_bank(what, tuple(banks[0].adapters.embeddings.shape), banks[0].names)
        shown = [(p, type(n).__name__ + (f" (for {n.hook})" if hasattr(n, "hook") else "")) for p, n in items]
        held = f"{len(found)} {cls.__name__} nodes" + (f" among {shown[:4]}" if shown else "")
    raise ValueError(
        f"`{what}` is a {type(tree).__name__} holding {held}; expected a {cls.__name__} or the adapter tree "
        f"jaxpeft.init made with one {_CONFIG_OF[cls.__name__]}: pass those adapters (one model's, unbanked)."
    )


def _node(tree: Any, cls: type[Adapter], what: str) -> Any:
    """``tree`` itself when it is a ``cls`` node, else the one ``cls`` node of an adapter tree; its embeddings are
    checked to be one prompt/prefix ``(num_virtual_tokens, width)``, not a bank of them."""
    node = tree if isinstance(tree, cls) else _found(tree, cls, what)[0]
    shape = tuple(node.embeddings.shape)  # type: ignore[attr-defined]
    if len(shape) == 3:
        raise _one_of_bank(what, shape)
    if len(shape) != 2:
        raise ValueError(
            f"`{what}` ({cls.__name__}) has embeddings of shape {shape}; expected (num_virtual_tokens, width): make "
            f"it with jaxpeft.init and a {_CONFIG_OF[cls.__name__]}."
        )
    return node


def _check_mask(attention_mask: Any) -> None:
    """``ValueError`` unless ``attention_mask`` is a 2-D boolean, integer or floating array."""
    _need_array("attention_mask", attention_mask, "(batch, seq)")
    if attention_mask.ndim != 2:
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected (batch, seq): 1 for real tokens, "
            "0 for padding."
        )
    dtype = jnp.dtype(attention_mask.dtype)
    if not any(jnp.issubdtype(dtype, kind) for kind in (jnp.bool_, jnp.integer, jnp.floating)):
        raise ValueError(
            f"`attention_mask` has dtype {dtype.name}; expected bool, integer or floating (1 for real tokens, 0 "
            "for padding): pass e.g. mask.astype(jnp.int32)."
        )


def extend_attention_mask(attention_mask: jax.Array, num_virtual_tokens: int) -> jax.Array:
    """``attention_mask`` ``(batch, seq)`` with ``num_virtual_tokens`` ones (visible slots) put in front.

    Guarantees: the result is ``(batch, num_virtual_tokens + seq)`` in the mask's dtype, the mask unchanged after
    the ones.

    Raises:
      ValueError: the mask is not a 2-D bool, integer or floating array; ``num_virtual_tokens`` is not a
        non-negative Python int (a ``jax.Array`` included: it fixes the result's shape).
    """
    _check_mask(attention_mask)
    n = _static_int("num_virtual_tokens", num_virtual_tokens, 0, "the prefix length, e.g. keys.shape[2]")
    ones = jnp.ones((attention_mask.shape[0], n), attention_mask.dtype)
    return jnp.concatenate([ones, attention_mask], axis=1)


def _prompt_table(prompt: Any) -> jax.Array:
    """The ``(n, width)`` floating prompt of a node, an adapter tree or an array, checked not to be a bank."""
    if isinstance(prompt, (Adapter, Mapping)):
        table = _node(prompt, PromptWeights, "prompt").embeddings
    else:
        _need_array("prompt", prompt, "(num_virtual_tokens, width), a PromptWeights or an adapter tree")
        if prompt.ndim == 3:
            raise _one_of_bank("prompt", tuple(prompt.shape))
        table = prompt
    if not jnp.issubdtype(table.dtype, jnp.floating):
        raise ValueError(
            f"the prompt has dtype {jnp.dtype(table.dtype).name}; expected floating virtual token embeddings "
            "(num_virtual_tokens, width): token ids must be embedded first, e.g. table[ids]."
        )
    return jnp.asarray(table)


def _check_embeds(embeds: Any) -> None:
    _need_array("embeds", embeds, "(batch, seq, width)")
    if embeds.ndim != 3:
        raise ValueError(f"`embeds` has shape {tuple(embeds.shape)}; expected (batch, seq, width).")
    if not jnp.issubdtype(embeds.dtype, jnp.floating):
        raise ValueError(
            f"`embeds` has dtype {jnp.dtype(embeds.dtype).name}; expected the floating input embeddings "
            "(batch, seq, width), not token ids: embed them first, e.g. model.embed(ids)."
        )


def prepend_prompt(
    embeds: jax.Array, attention_mask: jax.Array | None, prompt: Any
) -> tuple[jax.Array, jax.Array | None]:
    """Prompt tuning's hook: the virtual tokens put in front of the input embeddings (and the mask extended).

    Guarantees: the result is ``concat([prompt] * batch, embeds)`` along the sequence axis with the prompt cast to
    ``embeds.dtype``, and ``extend_attention_mask(attention_mask, n)`` (None stays None), as HF PEFT's
    ``PeftModelForCausalLM`` does; the gradient reaches the prompt only through those ``n`` rows. Every argument is
    checked before anything is computed.

    Args:
      embeds: the input embeddings ``(batch, seq, width)``, floating.
      attention_mask: ``(batch, seq)`` (1 real, 0 padding; bool, integer or floating) or None.
      prompt: a :class:`PromptWeights`, the adapter tree holding one (``jaxpeft.init``), or a floating array
        ``(n, width)``.

    Returns:
      ``(embeds (batch, n + seq, width), mask (batch, n + seq) or None)``.

    Raises:
      ValueError: a prompt of another width than ``embeds`` (made for another model), a bank of prompts (a leading
        adapter axis), a tree without exactly one prompt, non-floating ``embeds`` or prompt, ``embeds`` not 3-D, a
        mask that is not ``(batch, seq)`` or of a non-numeric dtype.
    """
    _check_embeds(embeds)
    table = _prompt_table(prompt)
    batch, seq, width = embeds.shape
    if table.ndim != 2 or table.shape[1] != width:
        raise ValueError(
            f"the prompt has shape {tuple(table.shape)} but `embeds` are {width} wide; expected "
            f"(num_virtual_tokens, {width}). Was the PromptTuningConfig initialised on this model's embedding table?"
        )
    if attention_mask is not None:
        _check_mask(attention_mask)
        if tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected (batch, seq) = {(batch, seq)}, "
                "the mask of the real tokens (the virtual tokens' ones are added here)."
            )
    virtual = jnp.broadcast_to(table.astype(embeds.dtype)[None], (batch, *table.shape))
    out = jnp.concatenate([virtual, embeds], axis=1)
    mask = None if attention_mask is None else extend_attention_mask(attention_mask, table.shape[0])
    return out, mask


def _check_prefix_arrays(node: PrefixWeights) -> None:
    """``ValueError`` unless the node's arrays have the shapes its static parts (and its own widths) imply."""
    n, width = node.embeddings.shape
    flat = node.num_layers * 2 * node.num_kv_heads * node.head_dim
    want: dict[str, tuple[int, ...]] = {"embeddings": (n, flat)}
    if node.w1 is not None and node.w1.ndim == 2:
        hidden = node.w1.shape[1]
        want = {"embeddings": (n, width), "w1": (width, hidden), "b1": (hidden,), "w2": (hidden, flat), "b2": (flat,)}
    have = {p: tuple(x.shape) for p, x in leaves_with_paths(node)}
    if have != want:
        raise ValueError(
            f"`prefix` (PrefixWeights) has arrays {have}; its num_layers={node.num_layers}, "
            f"num_kv_heads={node.num_kv_heads}, head_dim={node.head_dim} (a flat prefix "
            f"num_layers·2·num_kv_heads·head_dim = {flat} wide) expect {want}. Make it with jaxpeft.init and a "
            "PrefixTuningConfig rather than by hand."
        )


def _float_dtype(name: str, value: Any) -> Any:
    """``jnp.dtype(value)`` when it names a floating dtype; ``ValueError`` naming ``name`` otherwise."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise ValueError(f"`{name}`={value!r} is not a dtype; expected a floating dtype, e.g. jnp.bfloat16.") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"`{name}`={dtype.name} is not floating; expected the model's compute dtype, e.g. jnp.bfloat16 "
            "(keys and values are activations)."
        )
    return dtype


def prefix_kv(prefix: Any, batch_size: int, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Prefix tuning's hook: the per-layer key and value prefixes.

    Guarantees: HF PEFT's layout: the flat prefix ``(n, num_layers·2·num_kv_heads·head_dim)`` is read as
    ``(n, layer, key|value, head, head_dim)``, so ``keys[l]`` and ``values[l]`` are what PEFT puts in layer ``l``'s
    cache (there ``(batch, heads, n, head_dim)``, here ``(batch, n, heads, head_dim)``); with the projection it is
    computed from the token embeddings first. Pure and differentiable in the prefix's arrays. Every argument is
    checked before anything is computed.

    Args:
      prefix: a :class:`PrefixWeights`, or the adapter tree holding one (``jaxpeft.init``).
      batch_size: the batch the prefix is broadcast to: a positive Python int (static, e.g. ``ids.shape[0]``).
      dtype: the result dtype (the model's compute dtype, as HF casts to the base model's), floating; default the
        prefix's.

    Returns:
      ``(keys, values)``, each ``(num_layers, batch_size, n, num_kv_heads, head_dim)``.

    Raises:
      ValueError: a tree without exactly one prefix, a bank of prefixes (a leading adapter axis), a node whose
        arrays disagree with its ``num_layers``/``num_kv_heads``/``head_dim``, ``batch_size`` not a positive Python
        int (a ``jax.Array`` included), ``dtype`` not a floating dtype.
    """
    node = _node(prefix, PrefixWeights, "prefix")
    _check_prefix_arrays(node)
    batch = _static_int("batch_size", batch_size, 1, "the batch to broadcast to, e.g. ids.shape[0]")
    dtype = None if dtype is None else _float_dtype("dtype", dtype)
    flat = node.flat()
    n = flat.shape[0]
    kv = flat.reshape(n, node.num_layers, 2, node.num_kv_heads, node.head_dim)
    kv = jnp.transpose(kv, (2, 1, 0, 3, 4))  # (key|value, layer, n, head, head_dim)
    kv = jnp.broadcast_to(kv[:, :, None], (2, node.num_layers, batch, *kv.shape[2:]))
    if dtype is not None:
        kv = kv.astype(dtype)
    return kv[0], kv[1]


# ------------------------------------------------------------------------------------------------ PEFT codecs
#
# PEFT saves prompt-learning adapters as a single tensor ``prompt_embeddings`` (no ``base_model.model.`` prefix):
# prompt tuning's virtual token embeddings ``(num_virtual_tokens, token_dim)``; prefix tuning's flat prefix
# ``(num_virtual_tokens, num_layers·2·token_dim)`` with ``token_dim = num_kv_heads·head_dim`` and
# ``num_attention_heads = num_kv_heads`` in the config (PEFT's grouped-query rule), read as ``(layer, key|value, head,
# head_dim)`` per token. With ``prefix_projection`` PEFT saves the *projected* prefix (the MLP's output), not the MLP,
# and loads it for inference only; so a projected PrefixTuningConfig exports the MLP's output with
# ``prefix_projection: false``, and an import always gives an unprojected config. Encoder-decoder files
# (``num_transformer_submodules`` 2) are refused.

_KEY = "prompt_embeddings"
_PEFT_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "RANDOM"}
_COMMON_SUPPORTED = ("peft_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules")
_MODULES = {"modules_to_save": "saved modules (`modules_to_save`) are not imported with prompt-learning adapters"}
_PROMPT_FIELDS = hfc.FieldTable(
    (*_COMMON_SUPPORTED,),
    {
        **hfc.HARMLESS_COMMON,
        "num_attention_heads": "filled in by PEFT from the model; a prompt does not depend on it",
        "num_layers": "filled in by PEFT from the model; a prompt does not depend on it",
        "prompt_tuning_init": "initialisation only; the saved embeddings replace it",
        "prompt_tuning_init_text": "initialisation only",
        "tokenizer_name_or_path": "initialisation only",
        "tokenizer_kwargs": "initialisation only",
    },
    _MODULES,
)
_PREFIX_FIELDS = hfc.FieldTable(
    (*_COMMON_SUPPORTED, "num_layers", "num_attention_heads"),
    {
        **hfc.HARMLESS_COMMON,
        "prefix_projection": "PEFT saves the projected prefix itself, which is what it runs",
        "encoder_hidden_size": "the projection's width; the saved prefix is already projected",
        "init_weights": "initialisation only; the saved prefix replaces it",
    },
    _MODULES,
)


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
    # shapes and static parts do not depend on the init, which may read the table's values (text, sample_vocab)
    shaped = dataclasses.replace(cfg, init="random", init_token_ids=()) if isinstance(cfg, PromptTuningConfig) else cfg
    planned = jax.eval_shape(lambda: shaped.init_target(path, table, node.layout, jax.random.key(0)))
    _check_made_by(path, node, planned, cfg)
    return node


#: What a node's array shapes stand for, in the export's refusals.
_SHAPES = {
    "PromptWeights": "embeddings are (num_virtual_tokens, token_dim = the embedding table's width)",
    "PrefixWeights": "embeddings are (num_virtual_tokens, num_layers·2·num_kv_heads·head_dim), or with "
    "prefix_projection (num_virtual_tokens, num_kv_heads·head_dim) and the MLP w1, b1, w2, b2",
}


def _check_made_by(path: str, node: Adapter, planned: Adapter, cfg: MethodConfig) -> None:
    """Raise unless ``node`` is what ``cfg`` makes (``planned``): the array shapes (``num_virtual_tokens``, the
    width) and the static parts (``num_layers``, ``num_kv_heads``, ``head_dim``) that a flat prefix's shape alone
    cannot tell apart (``2·8`` heads·head_dim is as wide as ``8·2``).

    The comparison is the checkpoint restore's own (``node_table``/``node_diff``), dtypes aside: an export writes
    the arrays in their own dtype.
    """
    from jaxpeft.checkpoint._tables import listed, node_diff, node_table  # lazily: checkpoint imports the methods

    def table(tree_node: Adapter) -> dict[str, Any]:
        entries = node_table(set_path({}, path, tree_node))
        return {p: {**e, "arrays": {k: v[0] for k, v in e["arrays"].items()}} for p, e in entries.items()}

    shapes, statics = node_diff(table(node), table(planned), (), "adapter", "adapters", "config")
    if shapes or statics:
        lines = [line[len(repr(path)) :].lstrip(" .") for line in shapes or statics]  # the path is named once
        legend = f" ({_SHAPES[type(planned).__name__]})" if shapes else ""
        raise ValueError(
            f"the adapters at {path!r} are not what this {type(cfg).__name__} makes on these params: "
            f"{listed(lines)}{legend}. Nothing was written: pass the config the adapters were made with (a "
            "checkpoint's: jaxpeft.checkpoint.read_config)."
        )


def _common_fields(cfg: PromptTuningConfig | PrefixTuningConfig, peft_type: str) -> dict[str, Any]:
    return {
        "auto_mapping": None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "peft_type": peft_type,
        "revision": None,
    }


def _prompt_to_hf(req: hfc.Export) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """PEFT's config and ``{"prompt_embeddings": (n, width)}`` of a prompt-tuning adapter (init ``"text"`` is
    written as ``RANDOM``: PEFT would need the text and tokenizer, and never re-runs the init of a loaded adapter)."""
    cfg: PromptTuningConfig = req.cfg
    node = _the_node(req.adapters, cfg, req.params)
    tensor = node.embeddings  # type: ignore[attr-defined]
    config = {
        **_common_fields(cfg, "PROMPT_TUNING"),
        "num_attention_heads": None,
        "num_layers": None,
        "prompt_tuning_init": _PEFT_INITS[cfg.init],
        "prompt_tuning_init_text": None,
        "token_dim": int(tensor.shape[1]),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }
    return config, {_KEY: np.asarray(jax.device_get(tensor))}


def _prefix_to_hf(req: hfc.Export) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """PEFT's config and ``{"prompt_embeddings": flat prefix}`` of a prefix-tuning adapter (projected, if it has a
    projection, and written as unprojected)."""
    cfg: PrefixTuningConfig = req.cfg
    node = _the_node(req.adapters, cfg, req.params)
    config = {
        **_common_fields(cfg, "PREFIX_TUNING"),
        "encoder_hidden_size": cfg.token_dim,
        "init_weights": None,
        "num_attention_heads": cfg.num_kv_heads,
        "num_layers": cfg.num_layers,
        "prefix_projection": False,
        "token_dim": cfg.token_dim,
    }
    return config, {_KEY: np.asarray(jax.device_get(node.flat()))}  # type: ignore[attr-defined]


def _int_field(config: Mapping[str, Any], field: str) -> int:
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{hfc.CONFIG_NAME} has `{field}`={value!r:.80}; expected a positive integer.")
    return value


def _read_tensor(req: hfc.Import) -> tuple[np.ndarray, int, int]:
    """The one ``prompt_embeddings`` tensor, ``num_virtual_tokens`` and ``token_dim``, checked."""
    submodules = req.config.get("num_transformer_submodules")
    if submodules not in (None, 1):
        raise ValueError(
            f"{hfc.CONFIG_NAME} has `num_transformer_submodules`={submodules!r}; jaxpeft imports prompt-learning "
            "adapters of decoder-only models (1): an encoder-decoder's prefix is shared by two stacks."
        )
    if set(req.tensors) != {_KEY}:
        raise ValueError(
            f"the {req.config.get('peft_type')} adapter tensors are {sorted(req.tensors)[:4]}; PEFT saves exactly "
            f"one, {_KEY!r}."
        )
    return req.tensors[_KEY], _int_field(req.config, "num_virtual_tokens"), _int_field(req.config, "token_dim")


def _node_from(cfg: PromptTuningConfig | PrefixTuningConfig, tensor: np.ndarray, want: tuple[int, ...], params: Any):
    if tuple(tensor.shape) != want:
        raise ValueError(
            f"adapter tensor {_KEY!r} has shape {tuple(tensor.shape)}; the {hfc.CONFIG_NAME} says {want}. The files do "
            "not belong together."
        )
    ((path, table, layout),) = cfg.select(params, None)
    if isinstance(cfg, PromptTuningConfig) and tuple(table.shape)[1] != want[1]:
        raise ValueError(
            f"{hfc.CONFIG_NAME} has `token_dim`={want[1]} but the embedding table {path!r} is {table.shape[1]} wide; "
            "the adapter was trained for another model."
        )
    value = jnp.asarray(tensor, cfg.dtype)
    if isinstance(cfg, PromptTuningConfig):
        node: Adapter = PromptWeights(value, layout=layout)
    else:
        static = {"num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}
        node = PrefixWeights(value, layout=layout, **static)
    return cfg, set_path({}, path, node)


def _prompt_from_hf(req: hfc.Import) -> tuple[PromptTuningConfig, dict[str, Any]]:
    """A ``PromptTuningConfig`` (init ``"random"``) and its one-node tree from a PEFT ``PROMPT_TUNING`` adapter."""
    tensor, n, token_dim = _read_tensor(req)
    cfg = PromptTuningConfig(n, dtype=hfc.adapter_dtype([tensor], req.dtype))
    return _node_from(cfg, tensor, (n, token_dim), req.params)


def _prefix_from_hf(req: hfc.Import) -> tuple[PrefixTuningConfig, dict[str, Any]]:
    """An unprojected ``PrefixTuningConfig`` and its one-node tree from a PEFT ``PREFIX_TUNING`` adapter."""
    tensor, n, token_dim = _read_tensor(req)
    layers, heads = _int_field(req.config, "num_layers"), _int_field(req.config, "num_attention_heads")
    if token_dim % heads:
        raise ValueError(
            f"{hfc.CONFIG_NAME} has `token_dim`={token_dim} and `num_attention_heads`={heads}, which does not divide "
            "it; a prefix's token_dim is num_key_value_heads·head_dim."
        )
    cfg = PrefixTuningConfig(n, layers, heads, token_dim // heads, dtype=hfc.adapter_dtype([tensor], req.dtype))
    return _node_from(cfg, tensor, (n, cfg.flat_dim), req.params)


PromptTuningConfig.codec = hfc.PeftCodec(
    "PROMPT_TUNING", "PromptTuningConfig", _PROMPT_FIELDS, _prompt_to_hf, _prompt_from_hf, modules=False
)
PrefixTuningConfig.codec = hfc.PeftCodec(
    "PREFIX_TUNING", "PrefixTuningConfig", _PREFIX_FIELDS, _prefix_to_hf, _prefix_from_hf, modules=False
)
