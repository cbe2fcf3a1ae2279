"""Wall time of one train step of the Llama example model: full fine-tuning, the frozen floor, LoRA, DoRA, IA3,
QLoRA (int8 / NF4 base) and merge-on-the-fly, optionally side by side with torch + HF PEFT.

Every mode runs in one process, interleaved: repetition ``i`` runs each mode once before repetition ``i + 1``
starts, so load from elsewhere on the machine hits every mode alike. Compilation (jit, torch.compile) and a
warm-up step happen before timing; each timed JAX step ends in ``block_until_ready``. The trainable state and its
optimizer state are donated to the step (the step returns their replacements); the frozen base is not.

    .venv/bin/python examples/benchmarks/train_step.py --preset tiny            # d 512, 4 layers, 4 x 256 tokens
    .venv/bin/python examples/benchmarks/train_step.py --preset tiny --hf       # + torch floor, HF PEFT LoRA
    .venv/bin/python examples/benchmarks/train_step.py --preset tinyllama --hf  # TinyLlama-1.1B shape, bf16 (a GPU)

``--hf`` needs the interop extra (``.venv/bin/pip install -e ".[interop]"``); the script checks before compiling.
The targets (median of three runs, peak memory per mode) are one command: ``examples/benchmarks/perf_targets.py``.

The frozen floor trains only the RMS norms: the backward pass still runs through every layer, but no weight
gradient is formed. It is a yardstick, not a lower bound (a method that trains no norm can come in slightly under
it). The last lines printed are ``ratio lora/floor X`` and, with
``--hf``, ``ratio hf-lora/floor Y`` (HF PEFT LoRA over a torch floor of the same model) and
``ratio hf-lora-compiled/floor Z``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jaxpeft
import jaxpeft.linen

if __package__ in (None, ""):  # run as `python examples/benchmarks/train_step.py`: put the clone root on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from examples.models.llama import LlamaConfig, LlamaForCausalLM

MODES = (
    "full",
    "floor",
    "lora",
    "dora",
    "ia3",
    "qlora-int8",
    "qlora-nf4",
    "merged",
    "lora16",
    "mixed16",
    "lora64",
    "mixed64",
    "mixed16-vmap",
)
#: ``mixedN``: one batch of N rows, each with its own LoRA adapter of a bank of N (``jaxpeft.stack_adapters``, the
#: bank's default grouped path); ``loraN``: one LoRA adapter on the same batch; ``mixed16-vmap``: ``mixed16`` on the
#: reference path (each row's adapter gathered and the rule ``vmap``-ped). All reshape the preset's tokens into N rows.
ROWS = {"lora16": 16, "mixed16": 16, "mixed16-vmap": 16, "lora64": 64, "mixed64": 64}
HF_MODES = ("hf-floor", "hf-lora", "hf-lora-compiled")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = r"norm/scale$"  # input_layernorm, post_attention_layernorm and the final norm


@dataclasses.dataclass(frozen=True)
class Shape:
    """The benchmark model and batch."""

    width: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    batch: int
    seq: int
    rank: int = 16
    dtype: str = "float32"

    def llama(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.width,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.seq,
            dtype=self.dtype,
            param_dtype=self.dtype,
        )


PRESETS = {
    "tiny": Shape(width=512, layers=4, heads=8, kv_heads=8, ffn=1376, vocab=8000, batch=4, seq=256),
    # /work/shared/anchors: TinyLlama-1.1B shape, bf16, batch 4 x 2048 tokens
    "tinyllama": Shape(
        width=2048, layers=22, heads=32, kv_heads=4, ffn=5632, vocab=32000, batch=4, seq=2048, dtype="bfloat16"
    ),
}


def _xent(logits: Any, ids: Any) -> Any:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


def _method_config(mode: str, shape: Shape) -> jaxpeft.MethodConfig:
    if mode == "dora":
        return jaxpeft.DoraConfig(rank=shape.rank, alpha=2 * shape.rank, targets=TARGETS)
    if mode == "ia3":  # HF's defaults for Llama: keys, values and the FFN down projection (scaled on its input)
        return jaxpeft.IA3Config()
    return jaxpeft.LoraConfig(rank=shape.rank, alpha=2 * shape.rank, targets=TARGETS)


@dataclasses.dataclass
class Runner:
    """One mode, ready to time: ``run()`` does one step and waits for it; the state lives in ``self.state``."""

    name: str
    run: Callable[[], None]
    flops: float | None = None
    memory: dict[str, int] | None = None
    n_train: int = 0
    big_moves: int | None = None  # activation-sized transposes + copies in the compiled step


def _compiled_stats(compiled: Any) -> tuple[float | None, dict[str, int] | None]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    mem = compiled.memory_analysis()
    memory = None
    if mem is not None:
        memory = {
            k: int(getattr(mem, f"{k}_size_in_bytes"))
            for k in ("argument", "output", "temp", "generated_code")
            if hasattr(mem, f"{k}_size_in_bytes")
        }
    return flops, memory


OPTIMIZERS = {"adamw": lambda: optax.adamw(1e-4), "sgd": lambda: optax.sgd(1e-4)}


def build_step(
    mode: str, shape: Shape, params: Any, ids: Any, optimizer: str = "adamw"
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The AdamW train step of ``mode`` (one of ``MODES``) and its arguments ``(trainable, opt_state, frozen, ids)``.

    ``step(trainable, opt_state, frozen, ids) -> (trainable, opt_state, loss)``; the first two are meant to be
    donated. ``params`` may be abstract (``jax.ShapeDtypeStruct``) for every mode but ``dora`` (its magnitude
    starts at the weights' column norms) and the ``qlora-*`` modes.
    """
    model = LlamaForCausalLM(shape.llama())
    tx = OPTIMIZERS[optimizer]()
    frozen: Any
    if mode in ROWS:
        rows = ROWS[mode]
        if ids.size % rows:
            raise ValueError(
                f"`{mode}` splits the batch's {ids.size} tokens into {rows} rows; use a multiple of {rows}."
            )
        ids = jnp.reshape(ids, (rows, -1))
    if mode.startswith("mixed"):
        cfg = _method_config("lora", shape)
        keys = jax.random.split(jax.random.key(1), ROWS[mode])
        named = {f"user{i}": jaxpeft.linen.init(cfg, model, params, ids, key=k) for i, k in enumerate(keys)}
        train = jaxpeft.stack_adapters(named, grouping="vmap" if mode.endswith("-vmap") else "auto")
        frozen = params
        which = jnp.arange(ROWS[mode], dtype=jnp.int32)

        def loss_fn(t: Any, frozen: Any, ids: jax.Array) -> jax.Array:
            return _xent(jaxpeft.linen.apply(model, {"params": frozen}, t, ids, adapter_ids=which), ids)

    elif mode == "full":
        train, frozen = params, None

        def loss_fn(t: Any, frozen: Any, ids: jax.Array) -> jax.Array:
            return _xent(model.apply({"params": t}, ids), ids)

    elif mode == "floor":
        train, frozen = jaxpeft.partition(params, jaxpeft.path_filter(NORMS))

        def loss_fn(t: Any, frozen: Any, ids: jax.Array) -> jax.Array:
            return _xent(model.apply({"params": jaxpeft.combine(t, frozen)}, ids), ids)

    elif mode in MODES:
        cfg = _method_config(mode.removesuffix("16").removesuffix("64"), shape)
        frozen = params
        if mode.startswith("qlora-"):
            frozen = jaxpeft.linen.quantize(cfg, model, params, ids, kind=mode.removeprefix("qlora-"))
        train = jaxpeft.linen.init(cfg, model, params, ids, key=jax.random.key(1))
        if mode == "merged":  # W + ΔW formed inside the step: a full-size weight gradient per adapted kernel
            fwd = jaxpeft.merged(lambda p, x: model.apply({"params": p}, x))

            def loss_fn(t: Any, frozen: Any, ids: jax.Array) -> jax.Array:
                return _xent(fwd(frozen, t, ids), ids)

        else:

            def loss_fn(t: Any, frozen: Any, ids: jax.Array) -> jax.Array:
                return _xent(jaxpeft.linen.apply(model, {"params": frozen}, t, ids), ids)

    else:
        raise ValueError(f"`mode`={mode!r}; expected one of {MODES}.")

    def step(t: Any, opt: Any, frozen: Any, ids: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(t, frozen, ids)
        updates, opt = tx.update(grads, opt, t)
        return optax.apply_updates(t, updates), opt, loss

    if all(isinstance(x, jax.Array) for x in jax.tree.leaves(train)):
        train = jax.tree.map(jnp.copy, train)  # donated: copies, so the shared base params stay alive
        opt = tx.init(train)
    else:
        opt = jax.eval_shape(tx.init, train)
    return step, (train, opt, frozen, ids)


def compile_step(
    mode: str, shape: Shape, params: Any, ids: Any, optimizer: str = "adamw"
) -> tuple[Any, tuple[Any, ...]]:
    """``build_step``, jitted with the trainable state and optimizer state donated, and compiled."""
    step, args = build_step(mode, shape, params, ids, optimizer)
    return jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile(), args


def hlo_op_counts(hlo_text: str, min_elements: int = 0) -> dict[str, int]:
    """How many instructions of each opcode the compiled HLO text holds (fusion bodies included).

    Only instructions whose (first) result has at least ``min_elements`` elements are counted, so a threshold of
    one activation's size counts the copies and transposes that move activations, not the rank-``r`` ones.
    """
    counts: dict[str, int] = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?[\w.\-]+ = \(?(\w+)\[([\d,]*)\][^ ]* ([\w\-]+)\(", hlo_text, re.M):
        size = math.prod(int(d) for d in m.group(2).split(",") if d)
        if size >= min_elements:
            counts[m.group(3)] = counts.get(m.group(3), 0) + 1
    return counts


def jax_runner(mode: str, shape: Shape, params: Any, ids: jax.Array, optimizer: str = "adamw") -> Runner:
    """Build, compile and warm up the jitted train step of ``mode`` (one of ``MODES``)."""
    compiled, (train, opt, frozen, ids) = compile_step(mode, shape, params, ids, optimizer)
    flops, memory = _compiled_stats(compiled)
    big = hlo_op_counts(compiled.as_text(), shape.batch * shape.seq * min(shape.width, shape.ffn) // 2)
    state = [train, opt]

    def run() -> None:
        t, o, loss = compiled(state[0], state[1], frozen, ids)
        jax.block_until_ready((t, o, loss))
        state[0], state[1] = t, o

    run()  # warm-up
    return Runner(
        mode,
        run,
        flops,
        memory,
        sum(x.size for x in jax.tree.leaves(train)),
        big.get("transpose", 0) + big.get("copy", 0),
    )


def hf_runners(shape: Shape, modes: Sequence[str], seed: int = 0) -> list[Runner]:
    """torch + transformers ``LlamaForCausalLM`` of the same shape: a norms-only floor and HF PEFT LoRA."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[shape.dtype]
    cfg = transformers.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.width,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.seq,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    gen = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runners = []
    for mode in modes:
        torch.manual_seed(seed)
        model: Any = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
        if mode == "hf-floor":
            for name, p in model.named_parameters():
                p.requires_grad_("norm" in name)
        else:
            lora = LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, lora_dropout=0.0, target_modules=list(TARGETS))
            model = get_peft_model(model, lora, autocast_adapter_dtype=False)
            for name, p in model.named_parameters():  # float32 adapters over the (possibly bf16) base
                if "lora_" in name:
                    p.data = p.data.float()
        trainable = [p for p in model.parameters() if p.requires_grad]
        fwd = torch.compile(model) if mode.endswith("compiled") else model
        opt = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda")

        def run(fwd: Any = fwd, opt: Any = opt) -> None:
            out = fwd(input_ids=tok, labels=tok)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()

        run()  # warm-up (and torch.compile)
        run()
        runners.append(Runner(mode, run, None, None, sum(p.numel() for p in trainable)))
    return runners


def _peak_device_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure(runners: Sequence[Runner], reps: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds of each runner, ``reps`` interleaved rounds."""
    times: dict[str, dict[str, list[float]]] = {r.name: {"wall": [], "cpu": []} for r in runners}
    for _ in range(reps):
        for r in runners:
            c0, t0 = time.process_time(), time.perf_counter()
            r.run()
            t1, c1 = time.perf_counter(), time.process_time()
            times[r.name]["wall"].append(t1 - t0)
            times[r.name]["cpu"].append(c1 - c0)
    return times


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    parser.add_argument("--hf", action="store_true", help="also torch + HF PEFT: floor, LoRA eager and compiled")
    parser.add_argument("--no-compile", action="store_true", help="with --hf: skip the torch.compile LoRA")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZERS),
        default="adamw",
        help="the JAX steps' optimizer (default adamw); sgd makes the update one pass over the trainable state, to "
        "see what the optimizer costs modes with many trainable parameters (mixed16, mixed64)",
    )
    for field in dataclasses.fields(Shape):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=str if field.name == "dtype" else int, default=None, help="override the preset")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results (what ``--json`` writes), including ``ratios``."""
    args = _parse(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Shape) if getattr(args, f.name) is not None}
    shape = dataclasses.replace(PRESETS[args.preset], **overrides)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"`--modes` has {unknown}; expected a subset of {', '.join(MODES)}.")
    if "floor" not in modes:
        modes.insert(0, "floor")
    for mixed in [m for m in modes if m.startswith("mixed")]:  # its reference: one adapter on the same rows
        one = f"lora{ROWS[mixed]}"
        if one not in modes:
            modes.insert(modes.index(mixed), one)
    if args.hf:  # before minutes of compiling: say what is missing and how to install it
        missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
        if missing:
            raise SystemExit(
                f'`--hf` needs {", ".join(missing)} (the interop extra): .venv/bin/pip install -e ".[interop]" '
                "from the clone root, or drop --hf."
            )
    tokens = shape.batch * shape.seq
    print(f"preset {args.preset}: {shape} ({tokens} tokens/step), backend {jax.default_backend()}, {args.reps} reps")

    model = LlamaForCausalLM(shape.llama())
    ids = jax.random.randint(jax.random.key(0), (shape.batch, shape.seq), 0, shape.vocab, jnp.int32)
    params = jax.jit(model.init)(jax.random.key(2), ids)["params"]
    runners = []
    for mode in modes:
        t0 = time.perf_counter()
        runners.append(jax_runner(mode, shape, params, ids, args.optimizer))
        print(f"  compiled {mode:12s} in {time.perf_counter() - t0:6.1f} s", flush=True)
    if args.hf:
        hf_modes = [m for m in HF_MODES if not (args.no_compile and m.endswith("compiled"))]
        t0 = time.perf_counter()
        runners.extend(hf_runners(shape, hf_modes))
        print(f"  built {','.join(hf_modes)} in {time.perf_counter() - t0:6.1f} s", flush=True)

    times = measure(runners, args.reps)
    rows: dict[str, dict[str, Any]] = {}
    for r in runners:
        wall, cpu = times[r.name]["wall"], times[r.name]["cpu"]
        med = statistics.median(wall)
        rows[r.name] = {
            "median_ms": 1e3 * med,
            "min_ms": 1e3 * min(wall),
            "cpu_ms": 1e3 * statistics.median(cpu),
            "tokens_per_s": tokens / med,
            "gflop": None if r.flops is None else r.flops / 1e9,
            "memory": r.memory,
            "n_train": r.n_train,
            "big_moves": r.big_moves,
            "wall_ms": [1e3 * t for t in wall],
        }
    for name, row in rows.items():
        floor = rows["hf-floor" if name.startswith("hf-") and "hf-floor" in rows else "floor"]
        row["ratio"] = row["median_ms"] / floor["median_ms"]
        row["ratio_min"] = row["min_ms"] / floor["min_ms"]
        row["flops_ratio"] = None if row["gflop"] is None or floor["gflop"] is None else row["gflop"] / floor["gflop"]

    print(
        f"\n{'mode':18s} {'median ms':>10s} {'min ms':>8s} {'cpu ms':>8s} {'tok/s':>9s} {'GFLOP':>8s} "
        f"{'temp MiB':>9s} {'moves':>6s} {'trainable':>11s} {'/floor':>7s} {'FLOPs/floor':>11s}"
    )
    for name, row in rows.items():
        temp = f"{row['memory'].get('temp', 0) / 2**20:9.1f}" if row["memory"] else ""
        gflop = "" if row["gflop"] is None else f"{row['gflop']:8.2f}"
        fr = "" if row["flops_ratio"] is None else f"{row['flops_ratio']:11.3f}"
        moves = "" if row["big_moves"] is None else str(row["big_moves"])
        print(
            f"{name:18s} {row['median_ms']:10.1f} {row['min_ms']:8.1f} {row['cpu_ms']:8.1f} "
            f"{row['tokens_per_s']:9.0f} {gflop:>8s} {temp:>9s} {moves:>6s} {row['n_train']:11d} "
            f"{row['ratio']:7.3f} {fr:>11s}"
        )
    print("(moves: activation-sized transposes + copies in the compiled step's HLO)")
    peak = _peak_device_bytes()
    if peak is not None:
        print(f"peak device bytes (process, all modes): {peak / 2**30:.2f} GiB")

    ratios: dict[str, float] = {}
    if "lora" in rows and "dora" in rows:
        ratios["dora/lora"] = rows["dora"]["median_ms"] / rows["lora"]["median_ms"]
    for name in [m for m in rows if m.startswith("mixed")]:
        one = f"lora{ROWS[name]}"
        ratios[f"{name}/{one}"] = rows[name]["median_ms"] / rows[one]["median_ms"]
        if rows[one]["gflop"] and rows[name]["gflop"]:
            ratios[f"{name}/{one} FLOPs"] = rows[name]["gflop"] / rows[one]["gflop"]
    for name in rows:
        if name not in ("floor", "hf-floor", "lora", "hf-lora", "hf-lora-compiled"):
            ratios[f"{name}/floor"] = rows[name]["ratio"]
    for name in ("lora", "hf-lora", "hf-lora-compiled"):
        if name in rows:
            ratios[f"{name}/floor"] = rows[name]["ratio"]
    print()
    for key, value in ratios.items():
        print(f"ratio {key} {value:.3f}")
    result = {
        "preset": args.preset,
        "shape": dataclasses.asdict(shape),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "reps": args.reps,
        "optimizer": args.optimizer,
        "date": time.strftime("%Y-%m-%d"),
        "jax": jax.__version__,
        "peak_device_bytes": peak,
        "modes": rows,
        "ratios": ratios,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
