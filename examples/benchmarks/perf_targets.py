"""The performance targets in one command: median of several runs of ``train_step.py``, peak memory per mode, a JSON.

Each run is a fresh process running ``examples/benchmarks/train_step.py --json`` (every mode interleaved, so the
ratios are measured within one run); the script takes the median of each ratio over the runs, then, on an
accelerator, runs the floor and LoRA once more each in a process of its own to read the device's peak memory (one mode
per process: a process's peak covers everything it compiled). It prints each target with its value and whether it
is met, and writes everything to ``--out``.

    # a GPU or TPU (the accelerator targets; TinyLlama-1.1B shape, bf16, 4 x 2048 tokens, torch + HF PEFT beside):
    .venv/bin/python examples/benchmarks/perf_targets.py --preset tinyllama --out runs/perf_tinyllama.json
    # the 2-core CPU targets (the tiny preset):
    .venv/bin/python examples/benchmarks/perf_targets.py --preset tiny --out runs/perf_tiny.json

``--hf`` needs the interop extra (torch, transformers, peft): ``.venv/bin/pip install -e ".[interop]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MODES = "floor,lora,dora,ia3,qlora-int8,qlora-nf4"

#: ``name: (what, limit, kind)``: kind ``max`` means value ≤ limit, ``min`` value ≥ limit. Values are medians over
#: the runs. ``lora/floor < hf-lora/floor`` is checked separately (both sides measured).
TARGETS = {
    "tiny": {
        "lora/floor": ("LoRA step over the frozen floor", 1.05, "max"),
        "dora/lora": ("DoRA step over LoRA's", 1.05, "max"),
        "qlora-nf4/floor": ("QLoRA NF4 step over the frozen floor", 1.08, "max"),
    },
    "tinyllama": {
        "lora/floor": ("LoRA step over the frozen floor", 1.08, "max"),
        "hf-lora/lora speed": ("HF PEFT eager step time over jaxpeft LoRA's", 2.4, "min"),
        "hf-lora-compiled/lora speed": ("HF PEFT torch.compile step time over jaxpeft LoRA's", 1.6, "min"),
        "lora/floor peak memory": ("peak device memory, LoRA over the floor", 1.10, "max"),
    },
}


def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--preset", choices=sorted(TARGETS), default="tiny")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes; each ratio is their median (default 3)")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions per run (default 15)")
    parser.add_argument("--modes", default=MODES, help=f"train_step.py modes (default {MODES})")
    parser.add_argument("--no-hf", action="store_true", help="skip torch + HF PEFT (default: measured beside)")
    parser.add_argument("--out", default=None, help="write the results to this JSON file")
    # anything else (e.g. --width 64) goes to train_step.py unchanged
    return parser.parse_known_args(argv)


def _run(args: list[str], timeout: float = 3600) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, os.path.join(HERE, "train_step.py"), *args, "--json", out]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SystemExit(f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def _ratios(result: dict[str, Any]) -> dict[str, float]:
    r = dict(result["ratios"])
    modes = result["modes"]
    for hf in ("hf-lora", "hf-lora-compiled"):
        if hf in modes and "lora" in modes:
            r[f"{hf}/lora speed"] = modes[hf]["median_ms"] / modes["lora"]["median_ms"]
    return r


def check(preset: str, ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each target of ``preset`` against the median ``ratios``: ``{name: {what, value, limit, met}}``."""
    out: dict[str, dict[str, Any]] = {}
    for name, (what, limit, kind) in TARGETS[preset].items():
        value = ratios.get(name)
        met = None if value is None else (value <= limit if kind == "max" else value >= limit)
        out[name] = {"what": what, "value": value, "limit": limit, "kind": kind, "met": met}
    if preset == "tiny" and "lora/floor" in ratios and "hf-lora/floor" in ratios:
        out["lora/floor below hf-lora/floor"] = {
            "what": "jaxpeft LoRA's overhead over its floor below HF PEFT eager's over its own",
            "value": ratios["lora/floor"] - ratios["hf-lora/floor"],
            "limit": 0.0,
            "kind": "max",
            "met": ratios["lora/floor"] < ratios["hf-lora/floor"],
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the targets' measurements; returns what ``--out`` writes."""
    args, extra = _parse(argv)
    base = ["--preset", args.preset, "--modes", args.modes, "--reps", str(args.reps), *extra]
    if not args.no_hf:
        base.append("--hf")
    runs = []
    for i in range(args.runs):
        t0 = time.perf_counter()
        runs.append(_run(base))
        print(f"run {i + 1}/{args.runs}: {time.perf_counter() - t0:.0f} s", flush=True)
    keys = sorted(set.intersection(*(set(_ratios(r)) for r in runs)))
    medians = {k: statistics.median(_ratios(r)[k] for r in runs) for k in keys}
    peaks: dict[str, int | None] = {}
    if runs[0]["backend"] != "cpu":  # one mode per process: the device's peak is that mode's
        for mode in ("floor", "lora"):
            one = _run(["--preset", args.preset, "--modes", mode, "--reps", "2", *extra])
            peaks[mode] = one["peak_device_bytes"]
        if peaks.get("floor") and peaks.get("lora"):
            medians["lora/floor peak memory"] = peaks["lora"] / peaks["floor"]
    targets = check(args.preset, medians)
    print()
    for k in keys:
        print(f"median ratio {k} {medians[k]:.3f}  (runs: {', '.join(f'{_ratios(r)[k]:.3f}' for r in runs)})")
    print()
    for name, t in targets.items():
        value = "unmeasured" if t["value"] is None else f"{t['value']:.3f}"
        sign = "<=" if t["kind"] == "max" else ">="
        verdict = {True: "met", False: "NOT met", None: "unmeasured"}[t["met"]]
        print(f"target {name}: {value} {sign} {t['limit']} {verdict}  ({t['what']})")
    result = {
        "preset": args.preset,
        "runs": runs,
        "median_ratios": medians,
        "peak_device_bytes": peaks,
        "targets": targets,
        "backend": runs[0]["backend"],
        "devices": runs[0]["devices"],
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
