"""Runs examples/lora_sft.py in-process for each method named on the command line, on a (2,2,2) mesh of 8 CPU
devices: one step, then a resume for a second step from the checkpoint, then the HF export. Prints one JSON object
(method -> what each run returned and printed, or the SystemExit message) on its last line.

Usage: python tests/_sft_methods_worker.py OUT_DIR METHOD...   (METHOD+nf4 / +int8: over a quantised base)
"""

import contextlib
import io
import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
# The resumed run compiles the same train and eval steps again: let it find them in a cache.
jax.config.update("jax_compilation_cache_dir", os.path.join(sys.argv[1], "jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from examples import lora_sft  # noqa: E402

#: 1 layer of the tiny Llama, batches of 8 rows of 16 tokens: one row per device pair of data × fsdp.
COMMON = ["--mesh", "data=2,fsdp=2,tp=2", "--model", "tiny", "--data", "synthetic", "--layers", "1", "--steps", "2"]
COMMON += ["--batch", "8", "--seq-len", "16", "--eval-rows", "8", "--save-every", "1", "--no-progress"]


def run(argv: list[str]) -> dict:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            result = lora_sft.main(argv)
    except SystemExit as err:
        return {"exit": str(err.code), "out": out.getvalue()}
    return {"result": json.loads(json.dumps(result, default=str)), "out": out.getvalue()}


def main() -> None:
    root, methods = sys.argv[1], sys.argv[2:]
    report = {}
    for method in methods:
        d = os.path.join(root, method)
        name, _, quantized = method.partition("+")  # "lora+nf4": LoRA over an NF4 base
        argv = [*COMMON, "--method", name, "--ckpt-dir", os.path.join(d, "ckpt")]
        argv += ["--quantize", quantized] if quantized else []
        if method in lora_sft.INPUT_METHODS:
            argv += ["--num-virtual-tokens", "4"]
        if method != "bitfit":  # PEFT has no BitFit format
            argv += ["--export-hf", os.path.join(d, "hf")]
        first = run([*argv, "--stop-at", "0"])
        report[method] = {"first": first, "resumed": run(argv) if "result" in first else None}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
