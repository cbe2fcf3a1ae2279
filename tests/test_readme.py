"""The README's examples run as written, and its method table tells the truth."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxpeft
import jaxpeft.linen

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(heading: str) -> str:
    return re.search(rf"## {heading}\s.*?```python\n(.*?)```", README, re.S).group(1)


def test_readme_example_runs():
    namespace: dict = {}
    exec(compile(_block("A 30-line example"), "README.md", "exec"), namespace)
    assert float(namespace["l"]) < 1e-3
    assert np.isfinite(np.asarray(namespace["merged"]["out"]["kernel"])).all()


def test_write_your_own_method_snippet_is_a_working_method():
    namespace: dict = {}
    exec(compile(_block("Write your own method"), "README.md", "exec"), namespace)
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
