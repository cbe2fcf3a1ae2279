"""Write ``docs/api.md``: one autodoc section per public module, each documenting the module's ``__all__``.

The page holds no hand-kept list of names: every section is an ``automodule`` with ``:members:`` (autodoc follows the
module's ``__all__``). A class or function that ``jaxpeft`` re-exports is documented once, under ``jaxpeft``; the
section of the module that defines it excludes it and links to it. ``tests/test_api_reference.py`` checks the page
is what this script writes, so a new module or a new re-export shows up as a failing test until the page is
regenerated::

    .venv/bin/python docs/_gen_api.py
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jaxpeft  # noqa: E402

HEADER = """\
# API reference

Generated from the docstrings, so it says what the code you have does. The top-level `jaxpeft` namespace holds what
most programs need; the submodules below it are loaded on first use (`jaxpeft.linen`, `jaxpeft.nnx`, `jaxpeft.hf`,
...), so `import jaxpeft` stays light.

Each section documents everything in its module's `__all__`. A class or function that the top-level namespace
re-exports is documented once, under `jaxpeft`, and the section of the module that defines it links there. The small
modules `jaxpeft.quant`, `jaxpeft.optim` and `jaxpeft.analysis` are documented in full under their own names too.
The examples (`>>>`) are doctests: `.venv/bin/pytest -q --doctest-modules jaxpeft` runs them.

<!-- Written by docs/_gen_api.py (.venv/bin/python docs/_gen_api.py); tests/test_api_reference.py checks it. -->

```{contents} Modules
:local:
:depth: 1
```
"""

#: The NamedTuples of ``jaxpeft.hf``: documented by their class docstring's ``Attributes`` alone (autodoc would
#: document each field a second time as "Alias for field number ...").
HF_TUPLES = ("PeftCodec", "Export", "Import", "FieldTable")

#: ``(module, heading level, intro)``, in page order. A module whose re-exports are documented under ``jaxpeft`` gets
#: them excluded (``"defer"``); ``"full"`` documents all of its ``__all__`` under its own name.
MODULES: list[tuple[str, int, str, str]] = [
    ("jaxpeft", 2, "full", ""),
    ("jaxpeft.linen", 2, "full", ""),
    ("jaxpeft.nnx", 2, "full", ""),
    ("jaxpeft.hf", 2, "hf", ""),
    ("jaxpeft.hf.codec", 3, "hf", "The building blocks of a method's own PEFT codec."),
    ("jaxpeft.checkpoint", 2, "full", ""),
    ("jaxpeft.adapter_sets", 2, "full", ""),
    ("jaxpeft.sharding", 2, "full", ""),
    ("jaxpeft.quant", 2, "full", ""),
    ("jaxpeft.ops", 2, "full", ""),
    ("jaxpeft.analysis", 2, "full", ""),
    ("jaxpeft.optim", 2, "full", ""),
    ("jaxpeft.functional", 2, "full", ""),
    ("jaxpeft.protocol", 2, "defer", "What a method of your own builds on (see also `jaxpeft.hf.codec`)."),
    ("jaxpeft.api", 2, "defer", ""),
    (
        "jaxpeft.methods",
        2,
        "full",
        "The built-in methods, one module each: its config, its adapter node and, where PEFT has a format, its codec.",
    ),
    ("jaxpeft.methods.registry", 3, "full", ""),
    *[
        (f"jaxpeft.methods.{name}", 3, "defer", "")
        for name in (
            "lora",
            "dora",
            "lora_fa",
            "ia3",
            "loha",
            "lokr",
            "vera",
            "bitfit",
            "ln_tuning",
            "leaf",
            "prompt",
            "bank",
            "combine",
        )
    ],
]


def _role(name: str) -> str:
    obj = getattr(jaxpeft, name)
    kind = "class" if inspect.isclass(obj) else "func"
    return f"{{py:{kind}}}`jaxpeft.{name}`"


def _is_data(mod: object, name: str) -> bool:
    obj = getattr(mod, name)
    return not (inspect.isclass(obj) or callable(obj))


def _data_alias(name: str) -> str:
    """An entry for a constant ``jaxpeft`` re-exports (autodoc finds doc comments only where a name is assigned)."""
    home = next(
        m
        for m, *_ in MODULES
        if m != "jaxpeft"
        and name in getattr(importlib.import_module(m), "__all__", ())
        and getattr(importlib.import_module(m), name) is getattr(jaxpeft, name)
    )
    return f"\n.. autodata:: jaxpeft.{name}\n   :no-value:\n\n   The same object as :data:`{home}.{name}`.\n"


def deferred(module: str) -> list[str]:
    """The classes and functions of ``module.__all__`` that ``jaxpeft.__all__`` re-exports (data stays put)."""
    mod = importlib.import_module(module)
    out = []
    for name in mod.__all__:
        if name in jaxpeft.__all__ and (inspect.isclass(getattr(mod, name)) or callable(getattr(mod, name))):
            out.append(name)
    return out


def section(module: str, level: int, mode: str, intro: str) -> str:
    parts = [f"{'#' * level} `{module}`\n"]
    exclude: list[str] = []
    if intro:
        parts.append(intro + "\n")
    if mode == "defer":
        exclude = deferred(module)
        if exclude:
            parts.append("Documented under `jaxpeft`: " + ", ".join(_role(n) for n in exclude) + ".\n")
    rst = f".. automodule:: {module}\n   :members:\n"
    if mode == "hf":
        exclude = list(HF_TUPLES)
        if module == "jaxpeft.hf":
            rst += "".join(f"\n.. autoclass:: jaxpeft.hf.{n}\n   :no-members:\n" for n in HF_TUPLES)
        else:
            parts.append("Its types: " + ", ".join(f"{{py:class}}`jaxpeft.hf.{n}`" for n in HF_TUPLES) + ".\n")
    if module == "jaxpeft":
        rst += "".join(_data_alias(name) for name in jaxpeft.__all__ if _is_data(jaxpeft, name))
    if exclude:
        rst = rst.replace("   :members:\n", "   :members:\n   :exclude-members: " + ", ".join(exclude) + "\n", 1)
    parts.append("```{eval-rst}\n" + rst + "```\n")
    return "\n".join(parts)


def render() -> str:
    return HEADER + "\n" + "\n".join(section(*m) for m in MODULES)


if __name__ == "__main__":
    (ROOT / "docs" / "api.md").write_text(render())
