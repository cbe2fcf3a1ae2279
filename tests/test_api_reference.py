"""The API reference is generated: ``docs/api.md`` is what ``docs/_gen_api.py`` writes from the modules' ``__all__``."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path

import jaxpeft

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("_gen_api", ROOT / "docs" / "_gen_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_page_is_what_the_generator_writes():
    gen = _generator()
    assert (ROOT / "docs" / "api.md").read_text() == gen.render(), (
        "docs/api.md is stale: run .venv/bin/python docs/_gen_api.py"
    )


def test_every_public_module_has_a_section():
    documented = {m for m, *_ in _generator().MODULES}
    public = {"jaxpeft"}
    for info in pkgutil.walk_packages(jaxpeft.__path__, "jaxpeft."):
        if not any(part.startswith("_") for part in info.name.split(".")) and info.name != "jaxpeft.methods.base":
            public.add(info.name)  # methods.base: a deprecated alias module
    assert public - documented == set()


def test_a_deferred_name_is_documented_at_the_top_level():
    gen = _generator()
    for module, _, mode, _ in gen.MODULES:
        if mode == "defer":
            for name in gen.deferred(module):
                assert name in jaxpeft.__all__
                assert getattr(jaxpeft, name) is getattr(importlib.import_module(module), name)
