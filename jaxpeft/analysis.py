"""Why PEFT: parameter, gradient, optimizer-state and checkpoint accounting, and weight-update spectra."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import quant
from jaxpeft._paths import leaves_with_paths

__all__ = ["Summary", "summary", "update_spectrum"]


def _count(tree: Any) -> tuple[int, int]:
    """``(parameters, bytes)``: a quantised weight counts its logical elements and its stored bytes."""
    leaves = [x for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized) if hasattr(x, "shape")]
    count = sum(int(np.prod(x.shape)) for x in leaves)
    nbytes = sum(
        x.nbytes if quant.is_quantized(x) else int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves
    )
    return count, nbytes


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class Summary:
    """Counts and bytes for PEFT against full fine-tuning of the same model (printable as a table)."""

    base_params: int
    base_bytes: int
    trainable_params: int
    trainable_bytes: int
    optimizer_bytes_peft: int
    optimizer_bytes_full: int

    @property
    def total_params(self) -> int:
        return self.base_params + self.trainable_params

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        rows = [
            ("", "PEFT", "full fine-tune"),
            ("trainable params", f"{self.trainable_params:,}", f"{self.base_params:,}"),
            ("gradient bytes", _human(self.trainable_bytes), _human(self.base_bytes)),
            ("optimizer-state bytes", _human(self.optimizer_bytes_peft), _human(self.optimizer_bytes_full)),
            ("checkpoint bytes", _human(self.trainable_bytes), _human(self.base_bytes)),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0].ljust(widths[0])}  {r[1].rjust(widths[1])}  {r[2].rjust(widths[2])}" for r in rows]
        lines.append(
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )
        return "\n".join(lines)


def summary(params: Any, adapters: Any, tx: Any = None) -> Summary:
    """Trainable vs total parameters, and the memory PEFT saves against full fine-tuning.

    Optimizer-state bytes are measured, not estimated: ``tx.init`` is traced abstractly (``jax.eval_shape``)
    over the adapters and over the full params. Nothing is allocated.

    Args:
      params: the base parameters (arrays or ``jax.ShapeDtypeStruct``).
      adapters: the trainable tree (adapters, or any trainable half from ``partition``); frozen fields of adapter
        nodes (``jaxpeft.FROZEN``) count with the base: stored, neither trained nor in the optimizer state.
      tx: the optax optimizer to account for (default ``optax.adam``: two float32-or-param-dtype moments).

    Example:
      >>> import jax, jax.numpy as jnp, jaxpeft
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> adapters = jaxpeft.init(jaxpeft.LoraConfig(rank=2, targets=["dense"]), params, key=jax.random.key(0))
      >>> s = jaxpeft.summary(params, adapters)  # print(s) shows the table
      >>> s.trainable_params, s.base_params  # A (4×2) + B (2×3); kernel + bias
      (14, 15)
    """
    if tx is None:
        import optax

        tx = optax.adam(1e-3)
    from jaxpeft._partition import partition

    trainable, frozen = partition(adapters, True)  # frozen fields of nodes (LoRA-FA's A) are carried, not trained
    base_n, base_b = _count(params)
    train_n, train_b = _count(trainable)
    base_n += _count(frozen)[0]
    base_b += _count(frozen)[1]
    opt_peft = _count(jax.eval_shape(tx.init, trainable))[1]
    full = jax.eval_shape(quant.dequantize, params)  # full fine-tuning trains float weights, not codes
    opt_full = _count(jax.eval_shape(tx.init, full))[1]
    return Summary(base_n, base_b, train_n, train_b, opt_peft, opt_full)


def update_spectrum(before: Any, after: Any, rank: int = 8, *, min_dims: int = 2) -> dict[str, float]:
    """Fraction of each weight update's energy (squared Frobenius norm) in its top-``rank`` singular directions.

    LoRA's premise is that fine-tuning updates ``ΔW = after - before`` are nearly low-rank; a value near 1.0
    says a rank-``rank`` adapter can express this update, a low value says the shift is too large for it.
    Stacked kernels are flattened to ``(prod(all but last), last)``.

    Args:
      before: parameters before fine-tuning.
      after: parameters after (full) fine-tuning, same structure.
      rank: the number of top singular values whose energy is reported.
      min_dims: leaves with fewer dims are skipped.

    Returns:
      ``{path: energy fraction in [0, 1]}`` for each changed leaf.
    """
    out: dict[str, float] = {}
    after_leaves = dict(leaves_with_paths(after))
    for path, w0 in leaves_with_paths(before):
        if getattr(w0, "ndim", 0) < min_dims:
            continue
        if path not in after_leaves:
            raise ValueError(f"`after` has no leaf {path!r}; pass two trees of the same structure.")
        d = np.asarray(after_leaves[path], np.float64) - np.asarray(w0, np.float64)
        d = d.reshape(-1, d.shape[-1])
        s = np.linalg.svd(d, compute_uv=False) ** 2
        total = float(s.sum())
        if total > 0.0:
            out[path] = float(s[:rank].sum() / total)
    return out
