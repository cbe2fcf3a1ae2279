"""The public API: sorted __all__, everything exported exists, and `import jaxpeft` stays light."""

import subprocess
import sys

import jaxpeft


def test_all_is_sorted_and_complete():
    assert list(jaxpeft.__all__) == sorted(jaxpeft.__all__)
    for name in jaxpeft.__all__:
        assert getattr(jaxpeft, name) is not None


def test_import_does_not_load_flax_or_orbax():
    code = "import sys, jaxpeft; print('flax' in sys.modules, 'orbax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_submodules_load_on_use():
    assert jaxpeft.linen.apply is not None
    assert jaxpeft.ops.lora_dense is not None
