"""The README's example runs as written and its method table tells the truth; the scaling guide's mesh program equals
one device (the other docs blocks run in tests/test_docs.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxpeft
import jaxpeft.linen

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
CUSTOM = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "custom_method.md").read_text()
SCALING = (Path(__file__).resolve().parents[1] / "docs" / "guides" / "scaling.md").read_text()


def _block(heading: str) -> str:
    return re.search(rf"## {heading}\s.*?```python\n(.*?)```", README, re.S).group(1)


def test_readme_example_runs():
    namespace: dict = {}
    exec(compile(_block("A 30-line example"), "README.md", "exec"), namespace)
    assert float(namespace["l"]) < 1e-3
    assert np.isfinite(np.asarray(namespace["merged"]["out"]["kernel"])).all()


def test_custom_method_guide_defines_a_working_method():
    """The guide's method, taken out of its program and used on other params than the guide's own."""
    namespace: dict = {}
    code = re.search(r"## A complete method.*?```python\n(.*?)```", CUSTOM, re.S).group(1)
    exec(compile(code, "docs/guides/custom_method.md", "exec"), namespace)
    cfg = namespace["ScaleShiftConfig"](targets=["up"])
    params = {"up": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    adapters = jax.tree.map(lambda x: x + 0.5, jaxpeft.init(cfg, params, key=jax.random.key(0)))
    merged = jaxpeft.merge(params, adapters)
    np.testing.assert_allclose(merged["up"]["kernel"], 1.5 * np.ones((3, 4)))
    np.testing.assert_allclose(merged["up"]["bias"], 0.5 * np.ones(4))
    assert cfg.to_dict() == {"method": "scale_shift", "targets": ["up"], "exclude": []}


def test_method_table_counts_match_the_quickstart_model():
    from examples.quickstart import METHODS, SEQ, TinyLM

    model, ids = TinyLM(), jax.ShapeDtypeStruct((2, SEQ), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    base = sum(x.size for x in jax.tree.leaves(params))
    assert f"({base:,} base parameters" in README
    rows = dict(re.findall(r"^\| `(\w+)` \| `[^|]*` \| ([\d,]+) \(", README, re.M))
    assert set(rows) == set(METHODS)
    for name, (cfg, _) in METHODS.items():
        assert f"`{type(cfg).__name__}(" in README
        n = jaxpeft.linen.plan(cfg, model, params, ids).n_trainable  # frozen fields (LoRA-FA's A) do not train
        assert rows[name] == f"{n:,}", name


def _run_scaling_block(devices: int) -> dict:
    """The guide's Linen mesh program as written (XLA_FLAGS: 8 CPU devices; 1 with the mesh made (1,1,1)), its
    QLoRA fragment after it, then 2 more steps."""
    code = re.search(r"## A sharded LoRA train step \(Linen\)\s.*?```python\n(.*?)```", SCALING, re.S).group(1)
    if devices == 1:
        code = code.replace("reshape(2, 2, 2)", "reshape(1, 1, 1)")
    (quantised,) = [b for b in re.findall(r"```python\n(.*?)```", SCALING, re.S) if "jaxpeft.quantize(" in b]
    code += quantised
    code += "qloss = float(loss_fn(adapters, qparams, batch))\n"
    code += "leaves = jax.tree.leaves(qparams)\n"
    code += "first = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == jax.devices()[0])\n"
    code += "\nfor _ in range(2):\n    adapters, opt_state, loss = train(adapters, opt_state, params, batch)\n"
    code += "import json; print(json.dumps({'loss': float(loss), 'devices': jax.device_count(), 'qloss': qloss,\n"
    code += "    'first': first, 'total': sum(x.nbytes for x in leaves)}))\n"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == devices
    return out


def test_scaling_out_blocks_run_on_a_2x2x2_mesh_and_equal_one_device():
    sharded, single = _run_scaling_block(8), _run_scaling_block(1)
    assert np.isfinite(sharded["loss"])
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded["qloss"], single["qloss"], rtol=1e-5)  # the QLoRA snippet, sharded
    assert sharded["first"] < 0.5 * sharded["total"]  # one device holds a share of the NF4 base, not all of it
    assert single["first"] == single["total"]
