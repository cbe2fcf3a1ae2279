"""Subprocess side of tests/test_qlora_mesh.py: 8 CPU devices, a quantised tiny Llama placed by base_specs.

The base is quantised (NF4 and int8) and placed on a (2, 2, 2) ``data × fsdp × tp`` mesh with
``jaxpeft.sharding.base_specs``: codes and block scales sharded along the weight's axes. For each kind it measures
the base's bytes on one device against the bf16 base's under the same base_specs, runs one QLoRA AdamW step that
must equal the one-device step (and lists what its compiled HLO all-gathers), and saves and restores the adapters
over the sharded quantised base (no ``adapters_like``). Prints one JSON line of results; the test asserts on it.
Run as ``python tests/_qlora_mesh_worker.py DIRECTORY``.
"""

import json
import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxpeft  # noqa: E402
import jaxpeft.checkpoint  # noqa: E402
import jaxpeft.linen  # noqa: E402
import jaxpeft.quant  # noqa: E402
import jaxpeft.sharding  # noqa: E402
from jaxpeft._paths import leaves_with_paths  # noqa: E402
from tests._mesh_llama import CFG, TX, make_step, mesh_llama, nonzero  # noqa: E402

# Width 128 and MLP 512 so that blocks of 64 fall whole on every fsdp/tp shard; a small vocab, as the embeddings
# and the head stay bf16 (QLoRA quantises the projections only).
CONFIG, MODEL, IDS, PARAMS, LAYOUTS = mesh_llama(hidden=128, mlp=512, std=0.05)
MESH = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tp"))


step = make_step(MODEL)


def place(params):
    """``params`` on the mesh, placed by ``base_specs`` (a quantised weight: each code and scale array)."""
    specs = jaxpeft.sharding.base_specs(params, LAYOUTS, mesh=MESH)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(MESH, s)), params, specs)


def device_bytes(params, device) -> int:
    """Bytes of ``params`` (every stored array: codes, scales, floats) that ``device`` holds."""
    return sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == device)


def specs_of(tree) -> dict:
    return {p: str(x.sharding.spec) for p, x in leaves_with_paths(tree)}


def gathered(hlo: str) -> list[str]:
    """The result types of the all-gathers in a compiled step, e.g. ``f32[4,12,64]``."""
    return sorted(
        {
            line.split("all-gather(")[0].split("=")[1].split("{")[0].strip()
            for line in hlo.splitlines()
            if "all-gather(" in line
        }
    )


def quantised_leaves(params) -> list:
    return [x for x in jax.tree.leaves(params, is_leaf=jaxpeft.quant.is_quantized) if jaxpeft.quant.is_quantized(x)]


def reference(qp):
    dev = jax.devices()[0]
    params = jax.device_put(qp, dev)
    adapters = nonzero(jaxpeft.init(CFG, params, key=jax.random.key(2), layouts=LAYOUTS))
    new, _, loss = jax.jit(step)(adapters, jax.jit(TX.init)(adapters), params, jax.device_put(IDS, dev))
    return float(loss), jax.tree.leaves(new)


def run(kind: str, directory: str) -> dict:
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    dev = jax.devices()[0]
    quantised_bf16 = jaxpeft.quantize(bf16, CFG, kind=kind, layouts=LAYOUTS)
    ratio = device_bytes(place(quantised_bf16), dev) / device_bytes(place(bf16), dev)
    total_ratio = jaxpeft.summary(quantised_bf16, {}).base_bytes / jaxpeft.summary(bf16, {}).base_bytes

    qp = jaxpeft.quantize(PARAMS, CFG, kind=kind, layouts=LAYOUTS)  # float32 logical dtype: a tight comparison
    ref_loss, ref_adapters = reference(qp)
    params = place(qp)
    q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    ids = jax.device_put(IDS, NamedSharding(MESH, P(("data", "fsdp"))))
    adapters = nonzero(jaxpeft.sharding.init(CFG, params, key=jax.random.key(2), layouts=LAYOUTS))
    shardings = jaxpeft.sharding.adapter_shardings(adapters, params)
    opt = jaxpeft.sharding.init_optimizer(TX, adapters, shardings)
    train = jax.jit(step, out_shardings=(shardings, jax.tree.map(lambda x: x.sharding, opt), None))
    compiled = train.lower(adapters, opt, params, ids).compile()
    new, _, loss = compiled(adapters, opt, params, ids)

    # checkpoint over the sharded quantised base: restore with only the params, no adapters_like
    ckpt = os.path.join(directory, kind)
    jaxpeft.checkpoint.save_adapters(ckpt, 1, new, CFG, params)
    restored = jaxpeft.checkpoint.restore_adapters(ckpt, CFG, params).adapters
    saved, back = specs_of(new), specs_of(restored)
    lora = new["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    return {
        "device_ratio": ratio,
        "total_ratio": total_ratio,
        "q_proj_arrays": [str(x.sharding.spec) for x in jax.tree.leaves(q)],
        "q_proj_codes_shard": list(q.codes.addressable_shards[0].data.shape),
        "q_proj_a_b": [str(lora.a.sharding.spec), str(lora.b.sharding.spec)],
        "all_gathers": gathered(compiled.as_text()),
        "weight_shapes": sorted({str(list(x.shape[i:])) for x in quantised_leaves(qp) for i in (0, 1)}),
        "loss_diff": abs(float(loss) - ref_loss),
        "adapter_diff": max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(new), ref_adapters, strict=True)
        ),
        "restored_specs_kept": sum(back[p] == s for p, s in saved.items()),
        "restored_specs_total": len(saved),
        "restored_sharded": sum("'" in s for s in back.values()),
        "restored_equal": all(
            np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(restored), strict=True)
        ),
    }


if __name__ == "__main__":
    out = {kind: run(kind, sys.argv[1]) for kind in ("nf4", "int8")}
    print(json.dumps(out))
    sys.stdout.flush()
