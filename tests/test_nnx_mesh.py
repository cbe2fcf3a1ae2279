"""jaxpeft.nnx on a mesh: adapters placed and annotated like their kernels; a sharded nnx.jit step equals one device."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_nnx_mesh_worker.py")
README = Path(__file__).parents[1] / "docs" / "guides" / "scaling.md"
CASES = ["lora", "dora", "ia3", "bitfit", "bank:lora"]


@pytest.fixture(scope="module")
def results():
    proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_adapters_are_placed_as_adapter_specs_derives_from_the_kernels(results, case):
    r = results[case]
    assert r["specs"] == r["expected"]  # every adapter array, by canonical path/field
    assert any("'fsdp'" in s or "'tp'" in s for s in r["specs"].values())  # (not all replicated by accident)
    assert r["metadata_is_placement"], "nnx.get_partition_spec disagrees with where the adapters are"


@pytest.mark.parametrize("case", CASES)
def test_sharded_step_equals_one_device_and_keeps_shardings(results, case):
    r = results[case]
    assert r["ref_unsharded"], "the one-device reference was itself on the mesh"
    assert r["loss_diff"] < 1e-5 and r["adapter_diff"] < 1e-5
    assert r["opt_sharded_like_adapters"], "jaxpeft.nnx.optimizer's mu/nu are not sharded like the adapters"
    assert r["kept"] and r["opt_kept"], "the nnx.jit step resharded the adapters or the optimizer state"


def test_lora_specs_per_kernel(results):
    specs = results["lora"]["specs"]
    assert specs["up/kernel/a"] == "P('fsdp', None)" and specs["up/kernel/b"] == "P(None, 'tp')"  # column-parallel
    assert specs["down/kernel/a"] == "P('tp', None)" and specs["down/kernel/b"] == "P(None, 'fsdp')"  # row-parallel
    assert specs["q/kernel/a"] == "P('fsdp', None)" and specs["q/kernel/b"] == "P(None, 'tp', None)"  # heads
    assert specs["o/kernel/a"] == "P('tp', None, None)" and specs["o/kernel/b"] == "P(None, 'fsdp')"
    bank = results["bank:lora"]["specs"]  # the bank axis comes first and is replicated
    assert bank["up/kernel/a"] == "P(None, 'fsdp', None)" and bank["up/kernel/b"] == "P(None, None, 'tp')"
    assert results["ia3"]["specs"]["down/kernel/vector"] == "P('tp',)"  # the fan-in it scales
    assert results["dora"]["specs"]["up/kernel/magnitude"] == "P('tp',)"
    assert results["bitfit"]["specs"]["norm/bias/delta"] == "P('tp',)"


LORA_PAIR = {
    "up/a": ["P('fsdp', None)", "('fsdp', None)"],
    "up/b": ["P(None, 'tp')", "(None, 'tp')"],
    "down/a": ["P('tp', None)", "('tp', None)"],
    "down/b": ["P(None, 'fsdp')", "(None, 'fsdp')"],
}


def test_specs_from_metadata_when_the_kernels_are_not_placed(results):
    r = results["extras"]["metadata_only"]
    assert r["kernel"] == "P(None, None)"  # eager sharding off: the kernel itself is replicated
    assert r["specs"] == LORA_PAIR
    assert sorted(r["derived"]) == sorted(spec for spec, _ in LORA_PAIR.values())


def test_no_mesh_leaves_adapters_unsharded_and_unannotated(results):
    r = results["extras"]["no_mesh"]
    assert all(v == ["SingleDeviceSharding", "None"] for v in r["specs"].values())
    assert r["metadata"] == ["P()"] * 4


def test_logical_names_are_kept_where_their_rules_resolve_them(results):
    r = results["extras"]["logical"]
    assert r["inside"]["up/a"] == ["P('fsdp', None)", "('embed', None)"]
    assert r["inside"]["down/b"] == ["P(None, 'fsdp')", "(None, 'embed')"]
    assert r["resolved"] == ["P('tp', None)", "P(None, 'fsdp')", "P('fsdp', None)", "P(None, 'tp')"]
    assert r["outside"] == LORA_PAIR  # no rules in effect: the kernels' own placement, in mesh names


def test_unresolvable_names_are_refused_by_path(results):
    assert re.match(
        r"the base weight 'down/kernel' is annotated \('mlp', 'embed'\), which resolves to P\('mlp', 'embed'\), "
        r"naming axes \['embed', 'mlp'\] that the mesh \('data', 'fsdp', 'tp'\) does not have\. .*"
        r"nnx\.logical_axis_rules",
        results["extras"]["unresolved_error"],
    )


def test_an_axis_the_mesh_does_not_divide_is_replicated_in_placement_and_metadata(results):
    odd = results["extras"]["odd"]  # fan-out 6 on tp=4
    assert odd["up/a"] == ["P('fsdp', None)", "('fsdp', None)"] and odd["up/b"] == ["P(None, None)", "(None, None)"]
    assert odd["down/a"] == ["P(None, None)", "(None, None)"]


def test_pissa_residual_stays_sharded(results):
    r = results["extras"]["pissa"]
    assert r["changed"] and r["kernels"] == {"up": "P('fsdp', 'tp')", "down": "P('tp', 'fsdp')"}
    assert r["specs"] == LORA_PAIR


def test_explicit_axes_mesh(results):
    assert results["extras"]["explicit"] == LORA_PAIR


def test_vmap_stack_is_sliced_by_scan_with_its_metadata(results):
    r = results["extras"]["stack"]
    assert r["specs"] == {"layers/a": "P(None, 'fsdp', None)", "layers/b": "P(None, None, 'tp')"}
    assert r["metadata"] == ["P(None, 'fsdp', None)", "P(None, None, 'tp')"]
    assert r["identity"] == 0.0


def test_readme_example_runs_and_keeps_shardings(results):
    r = results["readme"]
    assert r["printed"] == ["P('fsdp', None)", "P(None, 'tp')"]
    assert r["specs_after"] == {
        "up/a": "P('fsdp', None)",
        "up/b": "P(None, 'tp')",
        "down/a": "P('tp', None)",
        "down/b": "P(None, 'fsdp')",
    }
    moments = {p.rpartition("/mu/")[2]: s for p, s in r["opt_specs_after"].items() if "/mu/" in p}
    assert moments == r["specs_after"] and len(r["opt_specs_after"]) == 8  # mu and nu
    assert r["loss"] > 0


def test_scaling_guide_block_is_the_one_the_worker_runs():
    """The scaling guide's NNX mesh example is the worker's ``README`` text, character for character."""
    source = WORKER.read_text()
    block = re.search(r'README = """\\\n(.*?)"""', source, re.S).group(1)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    nnx_mesh = [b for b in blocks if "jaxpeft.nnx.optimizer" in b and "jax.set_mesh" in b]
    assert nnx_mesh == [block], (
        "docs/guides/scaling.md's NNX mesh example differs from tests/_nnx_mesh_worker.py's README"
    )
