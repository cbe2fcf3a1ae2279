"""Where a LoRA step's time over the frozen floor goes: an ablation on the projections of a scanned decoder block.

The block has the seven Llama projections (q, k, v, o, gate, up, down) at the ``tiny`` preset's sizes, their
outputs combined by cheap element-wise stand-ins for attention and the SwiGLU, scanned over the layers like the
example Llama, with ``jax.grad`` of a scalar loss. Every variant computes the same forward; they differ in which parts
of LoRA's backward pass run:

- ``floor``: no adapters, the gradient flows to the input only (no weight gradient anywhere);
- ``lora``: ``jaxpeft.ops.dense_lowrank`` on every projection (what ``jaxpeft.linen.apply`` runs);
- ``lora-dx``: LoRA's forward and its input gradient, but no factor gradients (zeros for A and B);
- ``lora-db``: as ``lora-dx`` plus B's gradient (needs only the rank-r residual ``h``);
- ``lora-keep-x``: as ``lora-db`` plus keeping each projection's input ``x`` for the backward pass, used trivially;
- ``lora-siblings``: full LoRA with one down-projection ``x·[A_q|A_k|A_v]`` (and ``[A_gate|A_up]``) shared by
  projections that read the same input.

The step between ``lora-db`` and ``lora-keep-x`` is what keeping ``x`` costs (in a scan every kept activation is
copied into a per-layer stack), the step from there to ``lora`` is A's gradient product itself. Repetitions are
interleaved; ratios are over ``floor`` in the same run.

    .venv/bin/python examples/benchmarks/lora_overhead.py --reps 20
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft import ops

PROJ = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


def _ablated(keep: str) -> Callable[..., jax.Array]:
    """``s·(x·A)·B`` with a backward pass that computes only the parts ``keep`` names (``dx``, ``db``, ``x``)."""

    parts = set(keep.split())

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def branch(x: jax.Array, a: jax.Array, b: jax.Array, s: float) -> jax.Array:
        return fwd(x, a, b, s)[0]

    def fwd(x: jax.Array, a: jax.Array, b: jax.Array, s: float) -> tuple[jax.Array, tuple[Any, ...]]:
        h = (x @ a) * s
        return h @ b, (x if "x" in parts else None, a, b, h)

    def bwd(s: float, res: tuple[Any, ...], g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x, a, b, h = res
        gh = (g @ b.T) * s
        db = h.T @ g if "db" in parts else jnp.zeros_like(b)
        da = jnp.zeros_like(a) + (jnp.mean(x) * jnp.mean(gh) if x is not None else 0.0)
        return gh @ a.T, da, db

    branch.defvjp(fwd, bwd)
    return branch


@jax.custom_vjp
def _down(x: jax.Array, a: jax.Array) -> jax.Array:
    """``x·A`` whose backward pass contracts the tokens with the rank-r operand first (as ``ops.lowrank_chain``)."""
    return x @ a


def _down_fwd(x: jax.Array, a: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x @ a, (x, a)


def _down_bwd(res: tuple[jax.Array, jax.Array], gh: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, a = res
    return gh @ a.T, (gh.T @ x).T


_down.defvjp(_down_fwd, _down_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _up(h: jax.Array, b: jax.Array, s: float) -> jax.Array:
    """``s·h·B`` for the rank-r ``h``."""
    return (h * s) @ b


def _up_fwd(h: jax.Array, b: jax.Array, s: float) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return (h * s) @ b, (h, b)


def _up_bwd(s: float, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    h, b = res
    return (g @ b.T) * s, (h.T @ g) * s


_up.defvjp(_up_fwd, _up_bwd)


def _projections(variant: str) -> Callable[..., list[jax.Array]]:
    def run(group: tuple[str, ...], x: jax.Array, w: Any, ad: Any) -> list[jax.Array]:
        base = [x @ w[n] for n in group]
        if variant == "floor":
            return base
        if variant == "lora":
            return [y + ops.dense_lowrank(x, ad[n][0], ad[n][1], 2.0) for y, n in zip(base, group, strict=True)]
        if variant == "lora-siblings":
            r = ad[group[0]][0].shape[-1]
            h = _down(x, jnp.concatenate([ad[n][0] for n in group], axis=-1))
            return [
                y + _up(h[:, i * r : (i + 1) * r], ad[n][1], 2.0)
                for i, (y, n) in enumerate(zip(base, group, strict=True))
            ]
        keep = {"lora-dx": "dx", "lora-db": "dx db", "lora-keep-x": "dx db x"}[variant]
        branch = _ablated(keep)
        return [y + branch(x, ad[n][0], ad[n][1], 2.0) for y, n in zip(base, group, strict=True)]

    return run


def _block(x: jax.Array, w: Any, ad: Any, proj: Callable[..., list[jax.Array]]) -> jax.Array:
    q, k, v = proj(GROUPS[0], x, w, ad)
    o = proj(GROUPS[1], jnp.tanh(q) * k + v, w, ad)[0] + x
    g, u = proj(GROUPS[2], o, w, ad)
    return proj(GROUPS[3], jax.nn.silu(g) * u, w, ad)[0] + o


VARIANTS = ("floor", "lora", "lora-dx", "lora-db", "lora-keep-x", "lora-siblings")


def build(variant: str, tokens: int, width: int, ffn: int, layers: int, rank: int) -> Callable[[], Any]:
    """The jitted gradient of ``variant`` and its arguments, as a zero-argument callable that waits for it."""
    shapes = {n: (width, width) for n in ("q", "k", "v", "o")} | {"gate": (width, ffn), "up": (width, ffn)}
    shapes["down"] = (ffn, width)
    keys = iter(jax.random.split(jax.random.key(0), 3 * len(PROJ) + 1))
    w = {n: 0.02 * jax.random.normal(next(keys), (layers, *s)) for n, s in shapes.items()}
    ad = {
        n: (
            0.02 * jax.random.normal(next(keys), (layers, s[0], rank)),
            0.02 * jax.random.normal(next(keys), (layers, rank, s[1])),
        )
        for n, s in shapes.items()
    }
    x0 = jax.random.normal(next(keys), (tokens, width))
    proj = _projections(variant)

    def loss(ad: Any, x: jax.Array) -> jax.Array:
        y, _ = jax.lax.scan(lambda x, wa: (_block(x, wa[0], wa[1], proj), None), x, (w, ad))
        return jnp.mean(y**2)

    f = jax.jit(jax.grad(loss, argnums=1 if variant == "floor" else (0, 1)))
    return lambda: jax.block_until_ready(f(ad, x0))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Time every variant, interleaved; returns each variant's median over the floor's."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args(argv)
    runs = {v: build(v, args.tokens, args.width, args.ffn, args.layers, args.rank) for v in VARIANTS}
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.reps):
        for v, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[v].append(time.perf_counter() - t0)
    floor = statistics.median(times["floor"])
    ratios = {v: statistics.median(t) / floor for v, t in times.items()}
    for v, t in times.items():
        print(f"{v:14s} {1e3 * statistics.median(t):8.1f} ms  /floor {ratios[v]:.3f}")
    return ratios


if __name__ == "__main__":
    main()
