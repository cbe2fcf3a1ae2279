"""IA3: learned vectors that rescale a layer's output (keys, values) or its input (feed-forward layers)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft._select import Layout, TargetSpec, matcher
from jaxpeft.methods.base import STATIC, Adapter, LayerCall, MethodConfig, NotMergeableError, _freeze_spec, check_ndim
from jaxpeft.methods.lora import check_dtype

__all__ = ["IA3Config", "IA3Weights"]

_KINDS = ("dense", "dense_general", "einsum", "conv")


def vector_shape(shape: Sequence[int], layout: Layout, feedforward: bool) -> tuple[int, ...]:
    """The IA3 vector of a weight: ``(*stack, *fan_out)``, or ``(*stack, *fan_in)`` for a feed-forward layer
    (``(*stack, in_channels)`` for a feed-forward convolution)."""
    stack, fan_in, fan_out = layout.split(shape)
    if not feedforward:
        return (*stack, *fan_out)
    return (*stack, fan_in[-1]) if layout.kind == "conv" else (*stack, *fan_in)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class IA3Weights(Adapter):
    """One IA3 adapter: a vector that multiplies the layer's output, or (``feedforward``) its input.

    Output scaling multiplies the bias too, as in HF PEFT: ``y = base(x) ⊙ l``; input scaling is
    ``y = base(x ⊙ l)``. Both merge exactly into the weight (``W ⊙ l`` along fan-out or fan-in).
    """

    vector: Any
    feedforward: bool = dataclasses.field(default=False, metadata=STATIC)
    layout: Layout = dataclasses.field(default=Layout(), metadata=STATIC)

    def describe(self) -> str:
        return "input scale" if self.feedforward else "output scale"

    def weight_axes(self) -> dict[str, tuple[int | None, ...]]:
        stack, fan_in, fan_out = self.layout.axes()
        if not self.feedforward:
            return {"vector": (*stack, *fan_out)}
        return {"vector": (*stack, *(fan_in[-1:] if self.layout.kind == "conv" else fan_in))}

    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        if problem := check_ndim(self.layout, weight_shape):
            return problem
        want = vector_shape(weight_shape, self.layout, self.feedforward)
        if tuple(self.vector.shape) != want:
            return f"expected vector {want}"
        return None

    def _weight_shaped(self, weight: jax.Array) -> jax.Array:
        stack, fan_in, fan_out = self.layout.split(weight.shape)
        v = self.vector.astype(jnp.float32)
        if not self.feedforward:
            return jnp.reshape(v, (*stack, *([1] * len(fan_in)), *fan_out))
        if self.layout.kind == "conv":
            return jnp.reshape(v, (*stack, *([1] * (len(fan_in) - 1)), fan_in[-1], *([1] * len(fan_out))))
        return jnp.reshape(v, (*stack, *fan_in, *([1] * len(fan_out))))

    def fold(self, weight: jax.Array, bias: jax.Array | None, sign: int) -> tuple[jax.Array, jax.Array | None]:
        v = self._weight_shaped(weight)
        w = weight.astype(jnp.float32)
        w = w * v if sign > 0 else w / v
        if self.feedforward or bias is None:
            return w.astype(weight.dtype), None
        if tuple(bias.shape) != tuple(self.vector.shape):
            raise NotMergeableError(
                f"its bias of shape {tuple(bias.shape)} is not laid out like the output vector "
                f"{tuple(self.vector.shape)}"
            )
        vb = self.vector.astype(jnp.float32)
        b = bias.astype(jnp.float32)
        return w.astype(weight.dtype), (b * vb if sign > 0 else b / vb).astype(bias.dtype)

    def forward(self, call: LayerCall) -> jax.Array:
        if call.kind not in _KINDS:
            raise ValueError(f"IA3 cannot adapt a `{call.kind}` call; it adapts {_KINDS} layers.")
        if self.feedforward:
            return call.base(call.x * call.input_vector(self.vector.astype(call.x.dtype)))
        y = call.base(call.x)
        return y * call.output_vector(self.vector.astype(y.dtype), y.ndim)


@dataclasses.dataclass(frozen=True)
class IA3Config(MethodConfig):
    """IA3 hyper-parameters; frozen, hashable and JSON round-trippable.

    The defaults are HF PEFT's for Llama-style models: keys, values and the FFN's down projection, the latter
    scaled on its input. For BERT-style names use ``targets=["key", "value", "output/dense"]``,
    ``feedforward=["output/dense"]``.

    Args:
      targets: which weights get a vector (the forms of :class:`jaxpeft.LoraConfig`; ``"all-linear"`` too).
      exclude: removed from the selection.
      feedforward: which of the targets scale their *input* (HF's ``feedforward_modules``); the rest scale their
        output. Same forms as ``targets``; every entry must select at least one target.
      dtype: dtype of the vectors.
      init_ones: start every vector at 1, the identity (HF's ``init_ia3_weights=True``); with False they are
        drawn as ``1 + 0.1·N(0, 1)`` from the key (for tests of the forward and merge).

    References:
      Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", 2022.
    """

    method: ClassVar[str] = "ia3"
    reads_weight_values: ClassVar[bool] = False
    restore_free: ClassVar[tuple[str, ...]] = ("init_ones",)

    targets: TargetSpec = ("k_proj", "v_proj", "down_proj")
    exclude: TargetSpec = ()
    feedforward: TargetSpec = ("down_proj",)
    dtype: str = "float32"
    init_ones: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "feedforward", _freeze_spec(self.feedforward, "feedforward"))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        if not isinstance(self.init_ones, bool):
            raise ValueError(f"`init_ones`={self.init_ones!r}; expected True or False (not a string).")
        matcher(self.feedforward, "feedforward")  # validates the entries now, not at the first init

    def is_feedforward(self, path: str, weight: Any, layout: Layout) -> bool:
        """Whether the target at ``path`` scales its input (it matches ``feedforward``)."""
        spec = self.feedforward
        if not callable(spec) and not isinstance(spec, str) and not spec:
            return False
        return matcher(spec, "feedforward")(path, weight, layout)

    def check_targets(self, rows: Sequence[tuple[str, Any, Layout]]) -> None:
        for path, _, layout in rows:
            if layout.kind not in _KINDS:
                raise ValueError(
                    f"IA3 cannot adapt {path!r} (a {layout.kind} weight); it adapts {_KINDS} layers. "
                    "Add it to `exclude`."
                )
        spec = self.feedforward
        entries: tuple[TargetSpec, ...] = (
            (spec,) if callable(spec) or isinstance(spec, str) else tuple((e,) for e in spec)
        )
        for entry in entries:
            if not any(matcher(entry, "feedforward")(p, w, lay) for p, w, lay in rows):
                name = entry if callable(entry) or isinstance(entry, str) else entry[0]
                raise ValueError(
                    f"`feedforward` entry {name!r} selects none of the {len(rows)} targets (e.g. {rows[0][0]!r}); "
                    "feed-forward modules must also be targets (as in HF PEFT's feedforward_modules)."
                )

    def init_target(self, path: str, weight: Any, layout: Layout, key: jax.Array) -> IA3Weights:
        feedforward = self.is_feedforward(path, weight, layout)
        shape = vector_shape(weight.shape, layout, feedforward)
        if self.init_ones:
            vector = jnp.ones(shape, self.dtype)
        else:
            vector = 1.0 + 0.1 * jax.random.normal(key, shape, self.dtype)
        return IA3Weights(vector, feedforward, layout)
