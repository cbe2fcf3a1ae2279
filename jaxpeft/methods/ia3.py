"""IA3: learned vectors that rescale a layer's output (keys, values) or its input (feed-forward layers); and its PEFT
``IA3`` codec.

HF tensors: ``<module>.ia3_l`` (no ``.weight``): ``[out, 1]`` for a Linear that scales its output, ``[1, in]`` for a
feed-forward Linear (``feedforward_modules``, which scales its input), ``[1, channels, 1, ...]`` for a Conv (output
channels, or input channels when feed-forward). Kernels with several fan-in or fan-out axes are flattened.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft._select import Layout, TargetSpec, matcher
from jaxpeft.hf import codec as hfc
from jaxpeft.methods._factors import check_dtype, check_flag
from jaxpeft.protocol import STATIC, LayerAdapter, LayerCall, MethodConfig, NotMergeableError, check_ndim, freeze_spec

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
class IA3Weights(LayerAdapter):
    """One IA3 adapter: a vector that multiplies the layer's output, or (``feedforward``) its input.

    Output scaling multiplies the bias too, as in HF PEFT: ``y = base(x) ⊙ l``; input scaling is
    ``y = base(x ⊙ l)``. Both merge exactly into the weight (``W ⊙ l`` along fan-out or fan-in).
    """

    vector: Any
    feedforward: bool = dataclasses.field(default=False, metadata=STATIC)
    layout: Layout = dataclasses.field(metadata=STATIC, kw_only=True)

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
        object.__setattr__(self, "feedforward", freeze_spec(self.feedforward, "feedforward"))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))
        check_flag("init_ones", self.init_ones)
        matcher(self.feedforward, "feedforward")  # validates the entries now, not at the first init

    @property
    def identity_at_init(self) -> bool:
        """True with ``init_ones`` (every vector 1); the random draw for tests is not the identity."""
        return self.init_ones

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
        return IA3Weights(vector, feedforward, layout=layout)


# ----------------------------------------------------------------------------------------------- PEFT codec

_FIELDS = hfc.FieldTable(
    ("peft_type", "target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights"),
    {**hfc.HARMLESS_COMMON, **hfc.FAN_IN_FAN_OUT},
    hfc.REFUSED_SAVED,
)


def hf_feedforward(feedforward_modules: str | Sequence[str], name: str) -> bool:
    """PEFT IA3's ``feedforward_modules`` rule: a regex string full-matches; a list entry matches by bare
    ``endswith`` (no dot, so ``"proj"`` also marks ``q_proj``)."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(f) for f in feedforward_modules)


def _vector_tensor(target: hfc.Target, layer: int | None) -> dict[str, np.ndarray]:
    """HF's ``ia3_l`` of one layer of an IA3 adapter."""
    v = np.reshape(target.array("vector", layer), (-1,))
    if target.kind == "conv":
        return {".ia3_l": hfc.conv_vector(v, target.layout)}
    return {".ia3_l": v[None, :] if target.node.feedforward else v[:, None]}


def _feedforward_modules(
    feedforward: Mapping[str, bool], targets: str | list[str], override: str | Sequence[str] | None
) -> tuple[str | list[str], str | list[str]]:
    """``(target_modules, feedforward_modules)`` with which PEFT marks exactly the feed-forward modules.

    PEFT tests a list by bare ``name.endswith(entry)`` and requires it to be a subset of a ``target_modules``
    list. Short names first, then full names (with full ``target_modules`` if ours were short), else a regex.
    """
    names = sorted(n for n, ff in feedforward.items() if ff)
    if not names:
        return targets, []
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    for candidate in (short, names):
        if not all(hf_feedforward(candidate, n) == ff for n, ff in feedforward.items()):
            continue
        if isinstance(targets, str) or set(candidate) <= set(targets):
            return targets, candidate
        if override is None and candidate is names:
            return sorted(feedforward), candidate
    return targets, "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _check_target(target: hfc.Target) -> bool:
    if target.kind == "embed":
        raise ValueError(f"IA3 adapter {target.path!r} is on an embedding, which HF PEFT's IA3 does not support.")
    return bool(target.node.feedforward)


def _to_hf(req: hfc.Export) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config and tensors of IA3 adapters."""
    tensors, feedforward = hfc.write_modules(req, IA3Weights, _vector_tensor, _check_target)
    targets, ff_modules = _feedforward_modules(feedforward, hfc.target_modules(req, feedforward), req.target_modules)
    config = {
        "auto_mapping": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "feedforward_modules": ff_modules,
        "inference_mode": True,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "peft_type": "IA3",
        "revision": None,
        "target_modules": targets,
    }
    return config, tensors


def _vector(name: str, tensor: Any, kind: str, layout: Layout, group: hfc.Group, ff: bool) -> np.ndarray:
    """One module's ``ia3_l`` as our per-layer vector ``(*fan_out)``, or ``(*fan_in)`` when feed-forward."""
    _, fan_in, fan_out = layout.split(group.shape)
    ours = ((fan_in[-1],) if kind == "conv" else fan_in) if ff else fan_out
    if kind == "conv":
        want: tuple[int, ...] = (1, math.prod(ours), *([1] * (layout.fan_in - 1)))
    else:
        want = (1, math.prod(ours)) if ff else (math.prod(ours), 1)
    tensor = np.asarray(tensor)
    if tensor.shape != want:
        raise ValueError(
            f"HF module {name!r} has ia3_l of shape {tensor.shape}, but as a {'' if ff else 'non-'}feed-forward "
            f"module (by `feedforward_modules`) of {group.path!r} of shape {group.shape} it needs {want} per layer; "
            "do the config and tensors belong together, and to this base model?"
        )
    return np.reshape(tensor, ours)


def _read_feedforward(config: Mapping[str, Any]) -> str | tuple[str, ...]:
    """The checked ``feedforward_modules`` of a ``peft_type: "IA3"`` config (a subset of a list of targets)."""
    spec = config.get("feedforward_modules")
    if spec is None:
        raise hfc.fail(
            "feedforward_modules",
            None,
            "the feed-forward module names",
            "PEFT then takes them from its defaults for the model type, which jaxpeft does not know. Write the "
            'list into the file (e.g. ["down_proj"] for Llama).',
        )
    feedforward = hfc.names_value("feedforward_modules", spec)
    targets = config.get("target_modules")
    if isinstance(feedforward, tuple) and isinstance(targets, list) and not set(feedforward) <= set(targets):
        raise ValueError(
            f"{hfc.CONFIG_NAME} has `feedforward_modules`={hfc.show(list(feedforward))} that are not all in "
            f"`target_modules`={hfc.show(list(targets))}; PEFT's IA3Config refuses that. Add them to target_modules."
        )
    return feedforward


def _from_hf(req: hfc.Import) -> tuple[IA3Config, dict[str, Any]]:
    """An ``IA3Config`` and adapter tree from a PEFT ``IA3`` adapter."""
    selection = hfc.read_selection(req.config, layers=False)
    ff_spec = _read_feedforward(req.config)
    init = req.config.get("init_ia3_weights", True)
    if not isinstance(init, bool):
        raise hfc.fail("init_ia3_weights", init, "true or false")
    groups = hfc.read_groups(req, selection, {".ia3_l": "l"}, "IA3 vectors (ia3_l)", init, "init_ia3_weights")
    layouts = dict(req.layouts or {})
    arrays, used_layouts, feedforward = {}, {}, {}
    for group in groups:
        ffs = {hf_feedforward(ff_spec, name) for name, _ in group.modules}
        kinds = {"linear" if np.ndim(entry["l"]) == 2 else "conv" for _, entry in group.modules}
        if len(ffs) > 1 or len(kinds) > 1:
            raise ValueError(
                f"the HF modules stacked into {group.path!r} (e.g. {group.first!r}) are not all alike: some are "
                "feed-forward (or Conv) and some not; a stacked adapter is one kind of module."
            )
        ff, kind = ffs.pop(), kinds.pop()
        layout = hfc.import_layout(group, kind, layouts.get(group.path))
        vectors = [_vector(name, entry["l"], kind, layout, group, ff) for name, entry in group.modules]
        arrays[group.path] = {"vector": group.stack(vectors)}
        used_layouts[group.path], feedforward[group.path] = layout, ff
    ff_paths = [p for p, ff in feedforward.items() if ff]
    cfg = IA3Config(
        targets=hfc.exact_paths(arrays),
        feedforward=hfc.exact_paths(ff_paths) if ff_paths else (),
        dtype=hfc.adapter_dtype((f["vector"] for f in arrays.values()), req.dtype),
    )
    return cfg, hfc.build_adapters(cfg, req.params, used_layouts, arrays)


IA3Config.codec = hfc.PeftCodec("IA3", "IA3Config", _FIELDS, _to_hf, _from_hf, tensor_parts=frozenset(("ia3_l",)))
