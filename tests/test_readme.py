"""The README's example runs as written."""

import re
from pathlib import Path

import numpy as np


def test_readme_example_runs():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## A 30-line example\s+```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert float(namespace["l"]) < 1e-3
    assert np.isfinite(np.asarray(namespace["merged"]["out"]["kernel"])).all()
