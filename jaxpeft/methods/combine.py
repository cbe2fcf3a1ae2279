"""Weighted combination of LoRA adapters into a new one, as HF PEFT's ``add_weighted_adapter`` (linear, cat, svd)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft._paths import set_path
from jaxpeft.methods._factors import factors_delta
from jaxpeft.methods.lora import LoraConfig, LoraWeights
from jaxpeft.protocol import adapter_items

__all__ = ["COMBINATIONS", "add_weighted_adapter"]

COMBINATIONS = ("linear", "cat", "svd")


def _check(named: Mapping[str, Any], weights: Any) -> tuple[list[str], list[float], dict[str, dict[str, LoraWeights]]]:
    if not isinstance(named, Mapping) or not named:
        raise ValueError("`named` must be a non-empty mapping {name: LoRA adapter tree}.")
    names = list(named)
    if isinstance(weights, Mapping):
        missing = sorted(set(names) - set(weights))
        if missing or set(weights) - set(names):
            raise ValueError(
                f"`weights` has keys {sorted(weights)}; expected one weight per adapter {names} (missing {missing})."
            )
        weights = [weights[n] for n in names]
    weights = list(weights)
    if len(weights) != len(names) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
    ):
        raise ValueError(f"`weights`={weights!r}; expected {len(names)} finite numbers, one per adapter {names}.")
    tables: dict[str, dict[str, LoraWeights]] = {}
    for name in names:
        table = dict(adapter_items(named[name]))
        for path, node in table.items():
            if not isinstance(node, LoraWeights):
                raise ValueError(
                    f"adapter {name!r} at {path!r} is {type(node).__name__}; add_weighted_adapter combines LoRA "
                    "adapters (jaxpeft.LoraConfig) only, as HF PEFT does. For a bank, unstack it first."
                )
        tables[name] = table  # type: ignore[assignment]
    first = set(tables[names[0]])
    for name in names[1:]:
        if set(tables[name]) != first:
            diff = sorted(set(tables[name]) ^ first)
            raise ValueError(f"adapters {names[0]!r} and {name!r} adapt different paths (e.g. {diff[:3]}).")
    return names, [float(w) for w in weights], tables


def _pad_rank(a: jax.Array, b: jax.Array, rank: int, stack: int) -> tuple[jax.Array, jax.Array]:
    pad = rank - a.shape[-1]
    if pad <= 0:
        return a, b
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    b = jnp.pad(b, [(0, 0)] * stack + [(0, pad)] + [(0, 0)] * (b.ndim - stack - 1))
    return a, b


def _svd_factors(delta: jax.Array, node: LoraWeights, rank: int, clamp: float | None) -> tuple[jax.Array, jax.Array]:
    """The top-``rank`` SVD of ``delta`` (kernel-shaped) as ``A = U``, ``B = S·Vᵀ`` in our factor layouts."""
    stack, fan_in, fan_out = node.layout.split(delta.shape)
    m = jnp.reshape(delta, (math.prod(stack), math.prod(fan_in), math.prod(fan_out)))
    u, s, vh = jnp.linalg.svd(m, full_matrices=False)
    k = min(rank, s.shape[-1])
    a, b = u[..., :k], s[..., :k, None] * vh[..., :k, :]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([a.ravel(), b.ravel()]), clamp)
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
    a = jnp.reshape(a, (*stack, *fan_in, k))
    b = jnp.reshape(b, (*stack, k, *fan_out))
    return _pad_rank(a, b, rank, len(stack))


def add_weighted_adapter(
    named: Mapping[str, Any],
    weights: Mapping[str, float] | Sequence[float],
    *,
    combination: str = "svd",
    rank: int | None = None,
    clamp: float | None = None,
    cfg: LoraConfig | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """A new LoRA adapter from weighted LoRA adapters, as HF PEFT's ``add_weighted_adapter`` defines it.

    With ``sᵢ`` each adapter's scale and ``wᵢ`` its weight (negative weights subtract):

    - ``"cat"`` (exact): A and B concatenated along the rank, ``Aᵢ`` scaled by ``wᵢ·sᵢ``; ``ΔW = Σ wᵢ·ΔWᵢ``, rank
      ``Σ rᵢ``.
    - ``"svd"`` (exact up to truncation): the top-``rank`` SVD of ``Σ wᵢ·ΔWᵢ`` (default rank: the largest rᵢ),
      ``A = U``, ``B = S·Vᵀ``; ``clamp`` (a quantile in (0, 1]) clips the factors' entries to that quantile, like
      HF's ``svd_clamp``.
    - ``"linear"`` (HF's cheap approximation, all ranks equal): ``A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ``,
      ``B = Σ √|wᵢsᵢ|·Bᵢ``; the product carries cross terms ``AᵢBⱼ``, so it is **not** ``Σ wᵢ·ΔWᵢ``.

    As in HF the result has scale 1: its config is ``cfg`` (default ``LoraConfig()`` over the same targets, with
    the first adapter's dropout and dtype) with ``rank = alpha =`` the new rank, ``use_rslora=False`` and no
    per-path patterns; ranks smaller than that (cat of a path with smaller adapters, svd beyond a layer's size) are
    zero-padded. The new nodes carry that config's scale (1), dropout and dtype, so the returned pair is exactly
    what the config makes (``jaxpeft.checkpoint`` saves it, ``jaxpeft.hf.export_adapters`` writes it), whatever
    the inputs' ranks, alphas or ``use_rslora``.

    Args:
      named: ``{name: LoRA adapter tree}`` over the same paths.
      weights: one number per adapter (a mapping by name, or a sequence in ``named``'s order).
      combination: ``"linear"``, ``"cat"`` or ``"svd"``.
      rank: the new rank for ``svd``.
      clamp: ``svd`` only: the quantile to clip the new factors at.
      cfg: the config to derive the returned one from (its targets, dropout, dtype, init); its rank, alpha,
        ``use_rslora`` and patterns are replaced.

    Returns:
      ``(adapters, config)``.

    Raises:
      ValueError: a non-LoRA adapter (names it and the path), different paths, unequal ranks for ``linear``, a bad
        weight list, ``combination``, ``rank`` or ``clamp``.
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"`combination`={combination!r}; expected one of {COMBINATIONS} (HF's combination_type).")
    names, ws, tables = _check(named, weights)
    ranks = {n: max(node.rank for node in tables[n].values()) for n in names}
    if combination == "linear" and len({node.rank for t in tables.values() for node in t.values()}) != 1:
        raise ValueError(
            f"combination='linear' needs adapters of one rank; got ranks {ranks}. Use 'cat' or 'svd' (both exact)."
        )
    if rank is not None and (combination != "svd" or not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"`rank`={rank!r} applies to combination='svd' only and must be a positive integer.")
    if clamp is not None and (combination != "svd" or not 0.0 < clamp <= 1.0):
        raise ValueError(f"`clamp`={clamp!r} applies to combination='svd' only and must be a quantile in (0, 1].")
    new_rank = {"linear": ranks[names[0]], "cat": sum(ranks.values()), "svd": rank or max(ranks.values())}[combination]
    new_cfg = _combined_config(cfg, tables[names[0]], new_rank)
    out: dict[str, Any] = {}
    for path in sorted(tables[names[0]]):
        nodes = [tables[n][path] for n in names]
        a, b = _combined_factors(combination, nodes, ws, new_rank, clamp)
        scale = new_cfg.scale_for(path)  # 1.0: the factors above carry every adapter's own scale
        node = dataclasses.replace(
            nodes[0],
            a=jnp.asarray(a, new_cfg.dtype),
            b=jnp.asarray(b, new_cfg.dtype),
            scale=scale,
            dropout=new_cfg.dropout,
        )
        out = set_path(out, path, node)
    return out, new_cfg


def _combined_config(cfg: LoraConfig | None, table: Mapping[str, LoraWeights], new_rank: int) -> LoraConfig:
    """The returned config: scale exactly 1 at every path (``alpha = rank``, no rsLoRA, no patterns)."""
    first = table[min(table)]
    if cfg is None:
        exact = "^(" + "|".join(re.escape(p) for p in sorted(table)) + ")$"
        cfg = LoraConfig(targets=exact, dropout=first.dropout, dtype=jnp.dtype(first.a.dtype).name)
    if not isinstance(cfg, LoraConfig):
        raise ValueError(f"`cfg` is a {type(cfg).__name__}; expected a jaxpeft.LoraConfig.")
    return dataclasses.replace(
        cfg, rank=new_rank, alpha=float(new_rank), use_rslora=False, rank_pattern=(), alpha_pattern=()
    )


def _combined_factors(
    combination: str, nodes: list[LoraWeights], ws: list[float], new_rank: int, clamp: float | None
) -> tuple[jax.Array, jax.Array]:
    """The new ``(A, B)`` at one path, with each adapter's scale folded in (so the new scale is 1)."""
    first = nodes[0]
    stack = first.layout.stack
    if combination == "cat":
        a = jnp.concatenate([nd.a * (w * nd.scale) for nd, w in zip(nodes, ws, strict=True)], axis=-1)
        b = jnp.concatenate([nd.b for nd in nodes], axis=stack)
        return _pad_rank(a, b, new_rank, stack)
    if combination == "linear":
        signs = [math.copysign(1.0, w * nd.scale) for nd, w in zip(nodes, ws, strict=True)]
        roots = [math.sqrt(abs(w * nd.scale)) for nd, w in zip(nodes, ws, strict=True)]
        a = sum(s * r * nd.a for s, r, nd in zip(signs, roots, nodes, strict=True))
        b = sum(r * nd.b for r, nd in zip(roots, nodes, strict=True))
        return a, b
    shape = (*first.a.shape[:-1], *first.b.shape[stack + 1 :])
    delta = jnp.sum(
        jnp.stack([w * factors_delta(nd.a, nd.b, nd.scale, nd.layout, shape) for nd, w in zip(nodes, ws, strict=True)]),
        axis=0,
    )
    return _svd_factors(delta, first, new_rank, clamp)
