"""jaxpeft.hf under faults and hostile input (issue 8): exports that fail or are killed half-way, configs that
disagree with their tensors, bad values in files, odd module names, and property tests over config and tensor dicts.

Any input either imports or raises a ``ValueError``/``TypeError``/``FileNotFoundError`` that names the problem;
an export changes the config/tensor pair together or not at all, and never touches other files.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save, save_file

import jaxpeft
import jaxpeft.hf as hf
from jaxpeft.hf import _files

# Two unstacked decoder layers named as PEFT names a Llama's: model.layers.{0,1}.{q,v}_proj.
PARAMS = {"model": {f"layers_{i}": {m: {"kernel": jnp.ones((8, 6))} for m in ("q_proj", "v_proj")} for i in range(2)}}
FN = hf.module_name_map()
MODULES = [f"model.layers.{i}.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
DOCUMENTED = (ValueError, TypeError, FileNotFoundError)
# What a documented error's message must mention: the file, a field in backticks, a tensor or module.
NAMES_THE_PROBLEM = re.compile(r"adapter_config\.json|adapter_model\.safetensors|`\w+`|tensor|HF module|adapter file")


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.3


def _adapters(cfg, seed=0):
    shapes = jax.eval_shape(lambda: jaxpeft.init(cfg, PARAMS, key=jax.random.key(0)))
    rng = iter(range(seed, seed + 1000))
    return jax.tree.map(lambda s: jnp.asarray(_random(s.shape, next(rng))), shapes)


LORA = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"])
ADAPTERS = _adapters(LORA)
IA3 = jaxpeft.IA3Config(targets=["q_proj", "v_proj"], feedforward=["v_proj"])


@pytest.fixture(scope="module")
def lora_files():
    return hf.to_state_dict(ADAPTERS, LORA, PARAMS, FN)


@pytest.fixture(scope="module")
def ia3_files():
    return hf.to_state_dict(_adapters(IA3, seed=7), IA3, PARAMS, FN)


def _paths(adapters):
    return sorted(p for p, _ in jaxpeft.adapter_items(adapters))


def _snapshot(directory):
    """Every file under ``directory`` (hidden ones included) with its bytes."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


# ----------------------------------------------------------------------------------------------- 1. atomic export


@pytest.fixture
def exported(tmp_path):
    """A good export with a user's README.md beside it; returns the directory and its snapshot."""
    directory = tmp_path / "adapter"
    hf.export_adapters(directory, ADAPTERS, LORA, PARAMS, FN)
    (directory / "README.md").write_text("my notes\n")
    return directory, _snapshot(directory)


def _fail_when_replacing(monkeypatch, target_name):
    """Make ``os.replace``/``os.rename`` raise the first time they would put ``target_name`` in place."""
    real_replace, real_rename = os.replace, os.rename
    failed = []

    def check(dst):
        if os.path.basename(os.fspath(dst)) == target_name and not failed:
            failed.append(dst)
            raise OSError(28, "No space left on device (injected)")

    def replace(src, dst, *args, **kwargs):
        check(dst)
        return real_replace(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        check(dst)
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)


def test_failed_reexport_keeps_the_old_pair(exported, monkeypatch):
    directory, before = exported
    new = _adapters(LORA, seed=50)
    _fail_when_replacing(monkeypatch, hf.CONFIG_NAME)  # the tensors are already written when the config fails
    with pytest.raises(OSError, match="injected"):
        hf.export_adapters(directory, new, LORA, PARAMS, FN)
    monkeypatch.undo()
    assert _snapshot(directory) == before  # old pair, README.md, no staging leftovers
    _, back = hf.import_adapters(directory, PARAMS, FN)
    np.testing.assert_array_equal(
        back["model"]["layers_0"]["q_proj"]["kernel"].a, ADAPTERS["model"]["layers_0"]["q_proj"]["kernel"].a
    )
    hf.export_adapters(directory, new, LORA, PARAMS, FN)  # and the next export works
    after = _snapshot(directory)
    assert after["README.md"] == b"my notes\n" and after[hf.WEIGHTS_NAME] != before[hf.WEIGHTS_NAME]
    assert sorted(after) == sorted(before)


def test_failed_first_export_creates_nothing(tmp_path, monkeypatch):
    _fail_when_replacing(monkeypatch, "adapter")  # the staging directory's rename into place
    with pytest.raises(OSError, match="injected"):
        hf.export_adapters(tmp_path / "adapter", ADAPTERS, LORA, PARAMS, FN)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
    hf.export_adapters(tmp_path / "adapter", ADAPTERS, LORA, PARAMS, FN)  # no lock or staging left beside it
    assert os.listdir(tmp_path) == ["adapter"]
    assert sorted(os.listdir(tmp_path / "adapter")) == [hf.CONFIG_NAME, hf.WEIGHTS_NAME]


def _bad_module_name(module):
    return "../" + module.replace("/", ".")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"module_name": _bad_module_name}, ValueError, r"returned|is '\.\./model"),
        ({"target_modules": "("}, ValueError, r"`target_modules`='\(' is not a valid regular expression"),
        ({"tied_head": "lm head"}, ValueError, r"`tied_head` is 'lm head', which is not a torch module path"),
        ({"task_type": 3}, TypeError, r"`task_type`=3; expected a string or None"),
        ({"cfg": jaxpeft.LoraConfig(rank=3, targets=["q_proj", "v_proj"])}, ValueError, r"has rank 2 but `cfg`"),
    ],
)
def test_argument_errors_write_nothing(exported, kwargs, error, message):
    directory, before = exported
    args = {"adapters": ADAPTERS, "cfg": LORA, "params": PARAMS, "module_name": FN, **kwargs}
    with pytest.raises(error, match=message):
        hf.export_adapters(directory, **args)
    assert _snapshot(directory) == before


def test_a_second_concurrent_export_is_refused(exported):
    fcntl = pytest.importorskip("fcntl")
    directory, before = exported
    lock = os.path.join(directory, ".jaxpeft-export.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another exporter holds the directory
        os.write(fd, b"pid 1 on elsewhere")
        with pytest.raises(ValueError, match=r"another export into .* is running \(pid 1 on elsewhere; lock"):
            hf.export_adapters(directory, _adapters(LORA, seed=9), LORA, PARAMS, FN)
    finally:
        os.close(fd)
        os.remove(lock)
    assert _snapshot(directory) == before


_KILLED_EXPORT = textwrap.dedent(
    """
    import os, sys, time
    sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]
    import test_hf_faults as t
    import jaxpeft.hf as hf

    real_replace = os.replace
    def replace(src, dst):
        if os.path.basename(dst) == hf.CONFIG_NAME:  # the config goes in last: the tensors are already in place
            print("COMMITTING", flush=True)
            time.sleep(60)
        return real_replace(src, dst)
    os.replace = replace
    hf.export_adapters({directory!r}, t._adapters(t.LORA, seed=60), t.LORA, t.PARAMS, t.FN)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9 is POSIX")
def test_a_killed_export_never_leaves_a_mixed_pair(exported):
    """kill -9 between swapping the tensors and committing the config: loaders refuse, naming the cause."""
    directory, before = exported
    code = _KILLED_EXPORT.format(tests=os.path.dirname(__file__), directory=str(directory))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
    finally:
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate()
    assert line.strip() == "COMMITTING", err
    assert hf.CONFIG_NAME not in os.listdir(directory)  # never the old config with the new tensors
    with pytest.raises(FileNotFoundError, match=r"a jaxpeft export into it is running or was interrupted"):
        hf.import_adapters(directory, PARAMS, FN)
    staged = sorted(os.listdir(directory / ".jaxpeft-export"))
    assert staged == [f"new-{hf.CONFIG_NAME}", f"old-{hf.CONFIG_NAME}", f"old-{hf.WEIGHTS_NAME}"]
    assert (directory / "README.md").read_text() == "my notes\n"
    hf.export_adapters(directory, ADAPTERS, LORA, PARAMS, FN)  # the killed export's lock died with it
    assert _snapshot(directory) == before


def test_export_target_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"exists and is not a directory"):
        hf.export_adapters(tmp_path / "f", ADAPTERS, LORA, PARAMS, FN)


# ----------------------------------------------------------------------------------------------- 4. module names


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("../x", ValueError),
        ("a..b", ValueError),
        ("", ValueError),
        ("a.", ValueError),
        (" q_proj", ValueError),
        ("q proj", ValueError),
        ("model/q_proj", ValueError),
        ("q-proj", ValueError),
        ("q_proj\n", ValueError),
        ("layers.{layer}.{layer}", ValueError),
        (None, TypeError),
        (3, TypeError),
    ],
)
def test_odd_module_names_are_refused_before_writing(tmp_path, name, error):
    with pytest.raises(error, match=r"`module_name`\('model/layers_0/q_proj'\)|`module_name`\("):
        hf.export_adapters(tmp_path / "a", ADAPTERS, LORA, PARAMS, lambda m: name)
    assert os.listdir(tmp_path) == []


def test_torch_module_paths_are_accepted():
    names = {"model/layers_0/q_proj": "model.layers.0.q_proj", "model/layers_1/q_proj": "model.layers.1.q_proj"}
    names |= {"model/layers_0/v_proj": "h_0.attn.0", "model/layers_1/v_proj": "h_1.attn.0"}
    _, tensors = hf.to_state_dict(ADAPTERS, LORA, PARAMS, names)
    assert "base_model.model.h_1.attn.0.lora_A.weight" in tensors


# ----------------------------------------------------------------------------------------------- 2. PEFT's selection


def _only(tensors, modules):
    return {k: v for k, v in tensors.items() if any(f".{m}.lora_" in k for m in modules)}


@pytest.mark.parametrize(
    ("change", "ignored"),
    [
        ({"target_modules": ["q_proj"]}, "'model.layers.0.v_proj', 'model.layers.1.v_proj'"),
        ({"exclude_modules": ["v_proj"]}, "'model.layers.0.v_proj', 'model.layers.1.v_proj'"),
        ({"exclude_modules": r".*\.1\..*"}, "'model.layers.1.q_proj', 'model.layers.1.v_proj'"),
        ({"layers_to_transform": [0], "layers_pattern": "layers"}, "'model.layers.1.q_proj', 'model.layers.1.v"),
        ({"layers_to_transform": 1}, "'model.layers.0.q_proj', 'model.layers.0.v_proj'"),
        ({"layers_to_transform": [0], "layers_pattern": ["blocks"]}, "'model.layers.0.q_proj', 'model.layers.0.v"),
        ({"target_modules": r"model\.layers\.0\..*"}, "'model.layers.1.q_proj', 'model.layers.1.v_proj'"),
        ({"target_modules": "q_proj|v_proj"}, "'model.layers.0.q_proj', "),  # a string is a full-match regex
    ],
)
def test_tensors_the_config_does_not_select_are_refused(lora_files, change, ignored):
    """PEFT's from_pretrained silently drops them (tests/test_interop.py checks that): refuse, naming them."""
    config, tensors = lora_files
    with pytest.raises(ValueError, match=rf"tensors for HF modules {re.escape(ignored)}.* does not select them"):
        hf.from_state_dict({**config, **change}, tensors, PARAMS, FN)


@pytest.mark.parametrize(
    ("change", "modules"),
    [
        ({"target_modules": ["q_proj"]}, ["layers.0.q_proj", "layers.1.q_proj"]),
        ({"exclude_modules": ["v_proj"]}, ["layers.0.q_proj", "layers.1.q_proj"]),
        ({"layers_to_transform": [0], "layers_pattern": "layers"}, ["layers.0.q_proj", "layers.0.v_proj"]),
        ({"target_modules": "model.layers.1.v_proj"}, ["layers.1.v_proj"]),
    ],
)
def test_import_is_what_peft_selects(lora_files, change, modules):
    config, tensors = lora_files
    cfg, adapters = hf.from_state_dict({**config, **change}, _only(tensors, modules), PARAMS, FN)
    assert _paths(adapters) == sorted(f"model/{m.replace('.', '_', 1).replace('.', '/')}/kernel" for m in modules)
    assert [t.path for t in jaxpeft.plan(cfg, PARAMS).targets] == _paths(adapters)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"init_lora_weights": False}, "init_lora_weights"),
        ({"init_lora_weights": "orthogonal"}, "init_lora_weights"),
    ],
)
def test_selected_modules_without_tensors(lora_files, change, field):
    """PEFT gives them a fresh adapter: the identity under PEFT's default init (accepted), else random (refused)."""
    config, tensors = lora_files
    q_only = _only(tensors, ["q_proj"])
    _, adapters = hf.from_state_dict(config, q_only, PARAMS, FN)  # init_lora_weights=True: v_proj stays the identity
    assert _paths(adapters) == ["model/layers_0/q_proj/kernel", "model/layers_1/q_proj/kernel"]
    with pytest.raises(ValueError, match=rf"selects HF modules 'model.layers.0.v_proj'.* its `{field}` makes PEFT"):
        hf.from_state_dict({**config, **change}, q_only, PARAMS, FN)


def test_ia3_selection_and_missing_modules(ia3_files):
    config, tensors = ia3_files
    with pytest.raises(ValueError, match=r"HF modules 'model.layers.0.q_proj'.* does not select them"):
        hf.from_state_dict({**config, "exclude_modules": ["q_proj"]}, tensors, PARAMS, FN)
    v_only = {k: v for k, v in tensors.items() if "v_proj" in k}
    _, adapters = hf.from_state_dict(config, v_only, PARAMS, FN)
    assert _paths(adapters) == ["model/layers_0/v_proj/kernel", "model/layers_1/v_proj/kernel"]
    with pytest.raises(ValueError, match=r"its `init_ia3_weights` makes PEFT give them random weights"):
        hf.from_state_dict({**config, "init_ia3_weights": False}, v_only, PARAMS, FN)
    with pytest.raises(ValueError, match=r"`feedforward_modules`=\['k_proj'\] that are not all in `target_modules`"):
        hf.from_state_dict({**config, "feedforward_modules": ["k_proj"]}, tensors, PARAMS, FN)


REFUSED_VALUES = {
    "lora_bias": True,
    "trainable_token_indices": [1, 2],
    "target_parameters": ["mlp.experts.down_proj"],
    "layer_replication": [[0, 2]],
    "use_qalora": True,
    "alora_invocation_tokens": [5],
    "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {"beta": 1.0},
    "velora_config": {"num_groups": 4},
    "monteclora_config": {"n_samples": 2},
    "megatron_config": {"tensor_model_parallel_size": 2},
}


@pytest.mark.parametrize("field", sorted(REFUSED_VALUES))
def test_forward_changing_fields_are_refused_by_name(lora_files, field):
    config, tensors = lora_files
    with pytest.raises(ValueError, match=rf"adapter_config.json sets `{field}`=.*refusing it"):
        hf.from_state_dict({**config, field: REFUSED_VALUES[field]}, tensors, PARAMS, FN)
    hf.from_state_dict({**config, field: None}, tensors, PARAMS, FN)  # unset: accepted


def test_unknown_and_harmless_fields(lora_files, ia3_files):
    config, tensors = lora_files
    with pytest.raises(ValueError, match=r"sets `my_variant`=\{'on': 1\}, which PEFT 0.21.2's LoraConfig does not"):
        hf.from_state_dict({**config, "my_variant": {"on": 1}}, tensors, PARAMS, FN)
    unset = {"my_variant": None, "my_flag": False, "my_list": [], "my_dict": {}}
    harmless = {
        "fan_in_fan_out": True,
        "inference_mode": False,
        "eva_config": {"rho": 2.0},
        "loftq_config": {"loftq_bits": 4},
        "corda_config": {"cache_file": "x"},
        "lora_ga_config": {"direction": "ArB2r"},
        "runtime_config": {"ephemeral_gpu_offload": True},
        "qalora_group_size": 32,
        "megatron_core": "megatron.core",
        "peft_version": "0.99.0",
        "task_type": "CAUSAL_LM",
        "init_lora_weights": "gaussian",
    }
    hf.from_state_dict({**config, **unset, **harmless}, tensors, PARAMS, FN)
    config, tensors = ia3_files
    with pytest.raises(ValueError, match=r"sets `r`=8, which PEFT 0.21.2's IA3Config does not have"):
        hf.from_state_dict({**config, "r": 8}, tensors, PARAMS, FN)
    hf.from_state_dict({**config, "fan_in_fan_out": True, "init_ia3_weights": False, "r": None}, tensors, PARAMS, FN)


# ----------------------------------------------------------------------------------------------- 3. bad values


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_alpha": float("nan")}, r"`lora_alpha`=nan; expected a positive finite number"),
        ({"lora_alpha": float("inf")}, r"`lora_alpha`=inf; expected a positive finite number"),
        ({"lora_alpha": None}, r"`lora_alpha`=None; expected a positive finite number"),
        ({"lora_alpha": "8"}, r"`lora_alpha`='8'; expected a positive finite number"),
        ({"lora_alpha": 0}, r"`lora_alpha`=0; .* refuses NaN, infinite, zero and negative alphas"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, r"`alpha_pattern\['q_proj'\]`=nan; expected a positive finite"),
        ({"alpha_pattern": ["q_proj"]}, r"`alpha_pattern`=\['q_proj'\]; expected an object"),
        ({"r": 2.7}, r"`r`=2.7; expected a positive whole number \(a rank\). Ranks are never rounded"),
        ({"r": "four"}, r"`r`='four'; expected a positive whole number"),
        ({"r": None}, r"`r`=None; expected a positive whole number"),
        ({"r": True}, r"`r`=True; expected a positive whole number"),
        ({"r": 0}, r"`r`=0; expected a positive whole number"),
        ({"rank_pattern": {"q_proj": float("inf")}}, r"`rank_pattern\['q_proj'\]`=inf; expected a positive whole"),
        ({"rank_pattern": {"q_proj": 2.0}}, r"`rank_pattern\['q_proj'\]`=2.0; expected a positive whole"),
        ({"rank_pattern": {"(q": 2}}, r"`rank_pattern` key `\(q`='\(q'; expected a valid regular expression"),
        ({"use_rslora": "false"}, r"`use_rslora`='false'; expected true or false. PEFT would treat"),
        ({"use_dora": "true"}, r"`use_dora`='true'; expected true or false"),
        ({"use_rslora": None}, r"`use_rslora`=None; expected true or false"),
        ({"ensure_weight_tying": 1}, r"`ensure_weight_tying`=1; expected true or false"),
        ({"lora_dropout": "0.1"}, r"`lora_dropout`='0.1'; expected a rate in \[0, 1\)"),
        ({"lora_dropout": 1.0}, r"`lora_dropout`=1.0; expected a rate in \[0, 1\)"),
        ({"init_lora_weights": "kaiming"}, r"`init_lora_weights`='kaiming'; expected true, false, 'gaussian'"),
        ({"init_lora_weights": "olora"}, r"`init_lora_weights`='olora': that initialisation rewrites the base"),
        ({"target_modules": None}, r"`target_modules`=None; expected the adapted module names. PEFT then takes"),
        ({"target_modules": "all-linear"}, r"`target_modules`='all-linear'; expected module names. PEFT expands"),
        ({"target_modules": []}, r"`target_modules`=\[\]; expected at least one module name"),
        ({"target_modules": ["q_proj", 1]}, r"`target_modules`=\['q_proj', 1\]; expected a list of module names"),
        ({"target_modules": "q_proj("}, r"`target_modules`='q_proj\('; expected a valid regular expression"),
        ({"exclude_modules": 3}, r"`exclude_modules`=3; expected a list of module names or a regular expression"),
        ({"layers_to_transform": [1.5]}, r"`layers_to_transform`=\[1.5\]; expected a layer index"),
        ({"layers_to_transform": True}, r"`layers_to_transform`=True; expected a layer index"),
        ({"layers_to_transform": [0], "layers_pattern": "("}, r"`layers_pattern`='\('; expected a valid regular"),
        ({"layers_pattern": "layers"}, r"`layers_pattern` without `layers_to_transform`, which PEFT refuses"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, r"a regex `target_modules`=.* which PEFT"),
        ({"peft_type": None}, r"`peft_type`=None; jaxpeft.hf imports 'IA3', .*'LORA'"),
    ],
)
def test_bad_lora_config_values(lora_files, change, message):
    config, tensors = lora_files
    with pytest.raises(ValueError, match=message):
        hf.from_state_dict({**config, **change}, tensors, PARAMS, FN)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"feedforward_modules": "("}, r"`feedforward_modules`='\('; expected a valid regular expression"),
        ({"feedforward_modules": [1]}, r"`feedforward_modules`=\[1\]; expected a list of module names"),
        ({"init_ia3_weights": "yes"}, r"`init_ia3_weights`='yes'; expected true or false"),
    ],
)
def test_bad_ia3_config_values(ia3_files, change, message):
    config, tensors = ia3_files
    with pytest.raises(ValueError, match=message):
        hf.from_state_dict({**config, **change}, tensors, PARAMS, FN)


def test_missing_rank_and_alpha_take_peft_defaults(lora_files):
    config, tensors = lora_files
    with pytest.raises(ValueError, match=r"has rank 2 in the tensors but 8 in adapter_config.json"):
        hf.from_state_dict({k: v for k, v in config.items() if k != "r"}, tensors, PARAMS, FN)
    cfg, _ = hf.from_state_dict({k: v for k, v in config.items() if k != "lora_alpha"}, tensors, PARAMS, FN)
    assert cfg.alpha == 8.0  # PEFT's default lora_alpha


@pytest.mark.parametrize(
    ("tensors", "error", "message"),
    [
        ([1, 2], TypeError, r"`tensors` is a list; expected \{key: array\}"),
        ({1: np.ones((2, 8), np.float32)}, TypeError, r"adapter tensor key 1 is a int; safetensors keys are strings"),
        ({"k": [1.0]}, TypeError, r"adapter tensor 'k' is a list; expected a numpy or JAX array"),
        ({"k": np.ones(2, np.int64)}, ValueError, r"adapter tensor 'k' has dtype int64; adapter tensors are float16"),
        ({"k": np.array([1.0, np.nan], np.float32)}, ValueError, r"adapter tensor 'k' holds NaN or infinite values"),
    ],
)
def test_bad_tensor_dicts(lora_files, tensors, error, message):
    with pytest.raises(error, match=message):
        hf.from_state_dict(lora_files[0], tensors, PARAMS, FN)


def test_float64_files_need_a_dtype(lora_files):
    config, tensors = lora_files
    doubles = {k: v.astype(np.float64) for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"holds float64 tensors, .* pass `dtype='float32'`"):
        hf.from_state_dict(config, doubles, PARAMS, FN)
    cfg, adapters = hf.from_state_dict(config, doubles, PARAMS, FN, dtype="float32")
    assert cfg.dtype == "float32" and {n.a.dtype.name for _, n in jaxpeft.adapter_items(adapters)} == {"float32"}
    with pytest.raises(ValueError, match=r"`dtype`='floaty' is not a dtype"):
        hf.from_state_dict(config, tensors, PARAMS, FN, dtype="floaty")


def test_bad_tensor_shapes(lora_files):
    config, tensors = lora_files
    key = "base_model.model.model.layers.0.q_proj.lora_A.weight"
    for bad in (np.float32(1.0), np.ones(8, np.float32)):
        with pytest.raises(ValueError, match=r"HF module 'model.layers.0.q_proj' has LoRA factors of shapes"):
            hf.from_state_dict(config, {**tensors, key: bad}, PARAMS, FN)


def _write_pair(directory, config_bytes, weights_bytes):
    os.makedirs(directory, exist_ok=True)
    (directory / hf.CONFIG_NAME).write_bytes(config_bytes)
    (directory / hf.WEIGHTS_NAME).write_bytes(weights_bytes)


@pytest.fixture
def good_bytes(lora_files):
    config, tensors = lora_files
    return json.dumps(config).encode(), save(tensors, {"format": "pt"})


@pytest.mark.parametrize(
    ("config_bytes", "message"),
    [
        (b'{"peft_type": "LORA", "r": 2', r"adapter_config.json' is not valid JSON .*truncated or was edited"),
        (b"[1, 2]", r"adapter_config.json' holds a JSON list, not an object"),
        (b'"LORA"', r"adapter_config.json' holds a JSON str, not an object"),
        (b"\xff\xfe{}", r"adapter_config.json' is not UTF-8 text"),
        (b"[" * 100_000, r"adapter_config.json' (nests JSON too deeply|is not valid JSON)"),
        (b'{"peft_type": "LORA", "lora_alpha": NaN}', r"`lora_alpha`=nan; expected a positive finite number"),
    ],
)
def test_bad_config_files(tmp_path, good_bytes, config_bytes, message):
    _write_pair(tmp_path, config_bytes, good_bytes[1])
    with pytest.raises(ValueError, match=message):
        hf.import_adapters(tmp_path, PARAMS, FN)


def test_bad_safetensors_files(tmp_path, good_bytes):
    config_bytes, weights = good_bytes
    header = 8 + int.from_bytes(weights[:8], "little")
    cases = {
        weights[:5]: r"too short for a safetensors file",
        weights[: header - 3]: r"is truncated: its safetensors header announces",
        weights[:-4]: r"tensor '.*' of shape \(.*\) needs 32 bytes|header entry of tensor .* is corrupt",
        weights[:8] + b"\xff" * (header - 8) + weights[header:]: r"has a corrupt safetensors header",
        save({"k": np.ones((2, 2), np.int32)}): r"tensor 'k' has dtype I32; adapter tensors are floating point",
        save({"k": np.array([np.inf], np.float32)}): r"adapter tensor 'k' holds NaN or infinite values",
    }
    for data, message in cases.items():
        _write_pair(tmp_path, config_bytes, data)
        with pytest.raises(ValueError, match=message):
            hf.import_adapters(tmp_path, PARAMS, FN)
    for cut in range(0, len(weights), 37):  # any truncation: a jaxpeft error naming the file
        _write_pair(tmp_path, config_bytes, weights[:cut])
        with pytest.raises(ValueError, match=r"adapter_model\.safetensors'"):
            hf.import_adapters(tmp_path, PARAMS, FN)


def test_missing_files(tmp_path, good_bytes):
    with pytest.raises(FileNotFoundError, match=r"no directory '.*nowhere'"):
        hf.import_adapters(tmp_path / "nowhere", PARAMS, FN)
    (tmp_path / hf.CONFIG_NAME).write_bytes(good_bytes[0])
    with pytest.raises(FileNotFoundError, match=r"no adapter_model.safetensors in"):
        hf.import_adapters(tmp_path, PARAMS, FN)


def test_reader_matches_safetensors_and_reads_bfloat16(tmp_path):
    """Our safetensors reader against the library's, and bfloat16 files (which safetensors' numpy reader cannot
    read) imported as bfloat16 adapters."""
    from safetensors.numpy import load_file

    cfg = jaxpeft.LoraConfig(rank=2, alpha=4, targets=["q_proj"], dtype="bfloat16")
    adapters = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _adapters(cfg, seed=3))
    hf.export_adapters(tmp_path / "bf16", adapters, cfg, PARAMS, FN)
    cfg2, back = hf.import_adapters(tmp_path / "bf16", PARAMS, FN)
    assert cfg2.dtype == "bfloat16"
    for p, node in jaxpeft.adapter_items(back):
        assert node.a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(node.b), np.asarray(dict(jaxpeft.adapter_items(adapters))[p].b))
    mixed = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones((0, 4), np.float16), "c": np.ones(3)}
    save_file(mixed, tmp_path / "m.safetensors")
    ours, theirs = _files.read_safetensors(str(tmp_path / "m.safetensors")), load_file(tmp_path / "m.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype
        np.testing.assert_array_equal(ours[k], theirs[k])


# ----------------------------------------------------------------------------------------------- 5. properties

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "q_proj", "v_proj", "(", "false", "LORA", "IA3", ".*", "layers", "all-linear", "none"]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["q_proj", "(", "x", ""]), inner),
    max_leaves=5,
)
FIELDS = sorted(jaxpeft.LoraConfig.codec.fields.known | jaxpeft.IA3Config.codec.fields.known | {"unknown_field"})


def _check_documented(call):
    try:
        call()
    except DOCUMENTED as err:
        assert NAMES_THE_PROBLEM.search(str(err)), f"the message does not name the problem: {err}"


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["lora", "ia3"]),
    drop=st.lists(st.sampled_from(FIELDS), max_size=3),
    replace=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=3),
)
def test_any_config_dict_imports_or_names_the_problem(lora_files, ia3_files, method, drop, replace):
    config, tensors = lora_files if method == "lora" else ia3_files
    config = {k: v for k, v in config.items() if k not in drop} | replace
    _check_documented(lambda: hf.from_state_dict(config, tensors, PARAMS, FN))


FLOATS = (np.float32, np.float16, np.float64)
ARRAYS = st.builds(
    lambda shape, dtype, fill: np.full(shape, fill if dtype in FLOATS else 1, dtype),
    st.sampled_from([(2, 8), (6, 2), (8, 2), (2, 6), (6, 1), (1, 8), (6,), (1, 6, 1, 1)])
    | st.lists(st.integers(0, 9), max_size=3).map(tuple),
    st.sampled_from([*FLOATS, np.int32, np.bool_]),
    st.sampled_from([0.5, 0.5, 0.5, np.nan, 0.0]),
)
SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", ".lora_embedding_A", ".ia3_l", ".x"]
KEYS = st.builds(
    lambda module, suffix: f"base_model.model.{module}{suffix}",
    st.sampled_from([*MODULES, "model.layers.2.q_proj", "lm_head", ""]),
    st.sampled_from(SUFFIXES),
)


@settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["lora", "ia3"]),
    drop=st.lists(st.integers(0, 7), max_size=3),
    replace=st.dictionaries(KEYS, ARRAYS, max_size=3),
)
def test_any_tensor_dict_imports_or_names_the_problem(lora_files, ia3_files, method, drop, replace):
    config, tensors = lora_files if method == "lora" else ia3_files
    keys = sorted(tensors)
    tensors = {k: tensors[k] for i, k in enumerate(keys) if i not in drop} | replace
    _check_documented(lambda: hf.from_state_dict(config, tensors, PARAMS, FN))


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_edit_of_the_config_file_imports_or_names_the_problem(tmp_path_factory, good_bytes, data):
    """Byte-level damage to adapter_config.json (cuts, flipped characters) on a real directory."""
    config_bytes, weights = good_bytes
    cut = data.draw(st.integers(0, len(config_bytes)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(config_bytes) - 1), st.binary(min_size=1, max_size=1))))
    damaged = bytearray(config_bytes[:cut] if data.draw(st.booleans()) else config_bytes)
    for i, b in flips:
        if i < len(damaged):
            damaged[i : i + 1] = b
    directory = tmp_path_factory.mktemp("edit")
    _write_pair(directory, bytes(damaged), weights)
    _check_documented(lambda: hf.import_adapters(directory, PARAMS, FN))
