"""HRA (Householder reflection adaptation), a method this package does not ship, with its HF PEFT codec.

Written only against the public protocol (``jaxpeft.LayerAdapter``, ``jaxpeft.MethodConfig``) and the public codec
building blocks (``jaxpeft.hf.codec``): no library file names it. The tests run it through Linen, NNX, merge,
checkpoints, and PEFT's own ``HRAConfig`` files both ways.

PEFT's HRA (no Gram-Schmidt) turns a Linear weight ``W`` (torch ``(out, in)``) into ``W·H``, ``H = ∏ᵢ (I - 2·uᵢuᵢᵀ)``
over the normalised columns of ``hra_u`` ``(in, r)``; in a Flax kernel ``K = Wᵀ`` that is ``Hᵀ·K``, so the layer
computes ``base(x·Hᵀ)``. With an even ``r`` the columns start in equal pairs, so ``H = I`` at init.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

import jaxpeft
from jaxpeft.hf import codec as hfc

STATIC = jaxpeft.STATIC


def reflections(u: jax.Array) -> jax.Array:
    """``H = ∏ᵢ (I - 2·uᵢuᵢᵀ)`` ``(in, in)`` of the columns of ``u`` ``(in, r)``, normalised, in float32."""
    u = u.astype(jnp.float32)
    u = u / jnp.linalg.norm(u, axis=0)
    h = jnp.eye(u.shape[0], dtype=jnp.float32)
    for i in range(u.shape[1]):
        h = h - 2.0 * (h @ u[:, i : i + 1]) @ u[:, i : i + 1].T
    return h


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HRAWeights(jaxpeft.LayerAdapter):
    u: Any  # (*stack, in, r)
    layout: jaxpeft.Layout = dataclasses.field(metadata=STATIC, kw_only=True)

    def weight_axes(self):
        stack, fan_in, _ = self.layout.axes()
        return {"u": (*stack, *fan_in, None)}

    def forward(self, call):
        x = call.x.astype(jnp.float32) @ reflections(self.u).T
        return call.base(x.astype(call.x.dtype))

    def fold(self, weight, bias, sign):
        h = jax.vmap(reflections)(self.u) if self.layout.stack else reflections(self.u)
        h = h if sign < 0 else jnp.swapaxes(h, -1, -2)  # K' = Hᵀ·K; H is orthogonal, so K = H·K'
        return (h @ weight.astype(jnp.float32)).astype(weight.dtype), None


@dataclasses.dataclass(frozen=True)
class HRAConfig(jaxpeft.MethodConfig):
    method: ClassVar[str] = "hra"
    rank: int = 8
    targets: Any = ("q_proj", "v_proj")
    exclude: Any = ()

    def check_targets(self, rows):
        for path, _, layout in rows:
            if layout.kind != "dense":
                raise ValueError(f"HRA adapts Dense kernels; {path!r} is a {layout.kind} weight.")

    def init_target(self, path, weight, layout, key):
        stack, fan_in, _ = layout.split(weight.shape)
        bound = 1.0 / math.sqrt(self.rank // 2)  # PEFT: kaiming_uniform_(a=√5) of an (in, r/2) tensor
        half = jax.random.uniform(key, (*stack, *fan_in, self.rank // 2), jnp.float32, -bound, bound)
        return HRAWeights(jnp.repeat(half, 2, axis=-1), layout=layout)  # columns u0, u0, u1, u1, ...


# ----------------------------------------------------------------------------------------------- the codec


def _to_hf(req: hfc.Export):
    tensors, names = hfc.write_modules(req, HRAWeights, lambda target, layer: {".hra_u": target.array("u", layer)})
    config = {
        "peft_type": "HRA",
        "r": req.cfg.rank,
        "apply_GS": False,
        "init_weights": True,
        "bias": "none",
        "target_modules": hfc.target_modules(req, names),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    return config, tensors


def _from_hf(req: hfc.Import):
    hfc.check_bias_none(req.config, "HRA vectors")
    if hfc.bool_field(req.config, "apply_GS", False):
        raise hfc.fail("apply_GS", True, "false", "This HRA does not orthogonalise with Gram-Schmidt.")
    rank = hfc.rank_value("r", req.config.get("r", 8))
    selection = hfc.read_selection(req.config, layers=True)
    init = hfc.bool_field(req.config, "init_weights", True)
    groups = hfc.read_groups(req, selection, {".hra_u": "u"}, "HRA vectors (hra_u)", init, "init_weights")
    arrays, layouts = {}, {}
    for group in groups:
        layouts[group.path] = hfc.import_layout(group, "linear", (req.layouts or {}).get(group.path))
        arrays[group.path] = {"u": group.stack([np.asarray(entry["u"]) for _, entry in group.modules])}
    cfg = HRAConfig(rank=rank, targets=hfc.exact_paths(arrays))
    return cfg, hfc.build_adapters(cfg, req.params, layouts, arrays)


HRAConfig.codec = hfc.PeftCodec(
    "HRA",
    "HRAConfig",
    hfc.FieldTable(
        ("peft_type", "r", "apply_GS", "init_weights", "bias", "target_modules", "exclude_modules",
         "layers_to_transform", "layers_pattern"),
        hfc.HARMLESS_COMMON,
        hfc.REFUSED_SAVED,
    ),
    _to_hf,
    _from_hf,
    tensor_parts=frozenset({"hra_u"}),
)  # fmt: skip
