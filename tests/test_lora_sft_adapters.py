"""examples/lora_sft.py --adapters: several adapters trained in one run as a bank, on made-up data and a tiny model."""

import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft
import jaxpeft.adapter_sets
import jaxpeft.linen
from examples import lora_sft, sft_data
from examples.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 1-layer tiny Llama over bytes; 8 steps of 32-token rows; a checkpoint every 4 steps.
COMMON = ["--model", "tiny", "--layers", "1", "--steps", "8", "--seq-len", "32", "--eval-rows", "4"]
COMMON += ["--no-progress", "--generate", "0", "--save-every", "4"]
TASKS = {"up": str.upper, "rev": lambda w: w[::-1], "dup": lambda w: w + w}  # three made-up tasks, one per adapter


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One .jsonl file per task: 60 five-letter words and their answers (54 train / 6 held-out rows each)."""
    d = tmp_path_factory.mktemp("tenant_data")
    rng = random.Random(0)
    for name, answer in TASKS.items():
        words = ["".join(rng.choice("abcdefgh") for _ in range(5)) for _ in range(60)]
        (d / f"{name}.jsonl").write_text(
            "".join(json.dumps({"prompt": w, "completion": answer(w)}) + "\n" for w in words)
        )
    return d


def adapters_flag(data, names=("up", "rev", "dup")) -> str:
    return ",".join(f"{n}={data / f'{n}.jsonl'}" for n in names)


@pytest.fixture(scope="module")
def three(data, tmp_path_factory):
    """Three adapters, two rows of each in every batch of 6, trained in one run; checkpointed and exported."""
    d = tmp_path_factory.mktemp("three")
    argv = [*COMMON, "--adapters", adapters_flag(data), "--batch", "6"]
    result = lora_sft.main([*argv, "--ckpt-dir", str(d / "ckpt"), "--export-hf", str(d / "hf")])
    return d, argv, result


def tiny_params():
    config = lora_sft.tiny_config(sft_data.ByteTokenizer.vocab_size, lora_sft.parse_args(["--layers", "1"]))
    return llama.abstract_params(config)


def held_out(data, name):
    """The script's held-out rows of an adapter: every 10th row of its file, the first --eval-rows of them."""
    rows = sft_data.file_examples(str(data / f"{name}.jsonl"), sft_data.ByteTokenizer(), 32)
    return sft_data.split(rows)[1][:4]


def test_each_adapter_learns_its_own_data_and_every_metric_is_per_adapter(three, data):
    d, _, result = three
    for name in TASKS:
        before, after = result["eval"][f"before/{name}"], result["eval"][f"after/{name}"]
        assert after < before - 0.3, (name, before, after)
        losses = result["adapter_losses"][name]
        assert sorted(losses) == list(range(8))
        assert np.mean([losses[s] for s in (5, 6, 7)]) < np.mean([losses[s] for s in (0, 1, 2)]) - 0.3, losses
    # The overall eval loss is token-weighted over the adapters' held-out rows, as the single-adapter loss is.
    tokens = {n: sft_data.pack_rows(held_out(data, n), 32, 257)["mask"].sum() for n in TASKS}
    weighted = sum(result["eval"][f"after/{n}"] * tokens[n] for n in TASKS) / sum(tokens.values())
    np.testing.assert_allclose(result["eval"]["after"], weighted, rtol=1e-6)
    with open(d / "ckpt" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [-1, *range(8), 8]
    for r in records[1:-1]:
        assert {f"loss/{n}" for n in TASKS} <= set(r) and r["loss/up"] == result["adapter_losses"]["up"][r["step"]]
        assert min(r[f"loss/{n}"] for n in TASKS) <= r["loss"] <= max(r[f"loss/{n}"] for n in TASKS)
    assert records[-1]["eval_loss/rev"] == result["eval"]["after/rev"]


def test_one_adapter_alone_trains_bit_identically_to_the_same_adapter_beside_others(three, data, tmp_path):
    """`rev` trained alone (a bank of one, its 2 rows a step) equals `rev` trained beside `up` and `dup` (6 rows a
    step, `rev` in the middle): the same rows, init and steps, and nothing of the other rows reaches it (a bank
    gathers each row's adapter; each adapter's gradient is its own token mean, clipped by its own norm)."""
    d, _, result = three
    alone = lora_sft.main(
        [*COMMON, "--adapters", adapters_flag(data, ["rev"]), "--batch", "2", "--ckpt-dir", str(tmp_path / "ckpt")]
    )
    assert alone["adapter_losses"]["rev"] == result["adapter_losses"]["rev"]  # every step, exactly
    # (the eval batches have --batch rows: other sums, the same loss to rounding)
    np.testing.assert_allclose(alone["eval"]["after/rev"], result["eval"]["after/rev"], rtol=1e-6)
    one, _ = jaxpeft.adapter_sets.restore_adapter_set(str(tmp_path / "ckpt" / "adapters"), tiny_params())
    many, _ = jaxpeft.adapter_sets.restore_adapter_set(str(d / "ckpt" / "adapters"), tiny_params())
    assert list(one) == ["rev"] and list(many) == ["up", "rev", "dup"]
    for path, node in jaxpeft.adapter_items(one["rev"]):
        other = dict(jaxpeft.adapter_items(many["rev"]))[path]
        for x, y in zip(jax.tree.leaves(node), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=path)
    # Not true by accident: the adapters trained (B moved off zero) and differ from each other.
    b = [np.asarray(n.b) for _, n in jaxpeft.adapter_items(many["rev"])]
    assert all(np.abs(x).max() > 0 for x in b)
    up = [np.asarray(n.b) for _, n in jaxpeft.adapter_items(many["up"])]
    assert all(not np.array_equal(x, y) for x, y in zip(b, up, strict=True))


def test_resume_from_the_adapter_set_continues_the_same_curves(three, tmp_path):
    _, argv, result = three
    ckpt = str(tmp_path / "ckpt")
    first = lora_sft.main([*argv, "--ckpt-dir", ckpt, "--stop-at", "5"])
    assert sorted(first["adapter_losses"]["up"]) == list(range(6))
    names = jaxpeft.adapter_sets.read_index(os.path.join(ckpt, "adapters"), "jaxpeft.checkpoint")
    assert names == ["up", "rev", "dup"]
    resumed = lora_sft.main([*argv, "--ckpt-dir", ckpt])
    for name in TASKS:
        assert sorted(resumed["adapter_losses"][name]) == [6, 7]
        for step in (6, 7):  # the optimizer state came back too: the same step, to the bit
            assert resumed["adapter_losses"][name][step] == result["adapter_losses"][name][step]
        assert resumed["eval"][f"after/{name}"] == result["eval"][f"after/{name}"]
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [-1, *range(8), 8]


def test_resume_with_other_adapters_is_refused_naming_the_flag(three, data):
    d, argv, _ = three
    other = adapters_flag(data, ["rev", "up", "dup"])
    changed = [a if a != adapters_flag(data) else other for a in argv]
    with pytest.raises(SystemExit, match=r"other settings: --adapters=up=.* then, rev=.* now"):
        lora_sft.main([*changed, "--ckpt-dir", str(d / "ckpt")])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations inside PeftModel
def test_the_exported_set_is_one_peft_directory_per_adapter_and_runs_in_peft(three, data, monkeypatch):
    """Each exported directory imports back to the checkpointed adapter, and PEFT, loading all of them as named
    adapters of one model (the export's README recipe), gives each adapter's held-out loss that the script measured."""
    d, _, result = three
    hf = d / "hf"
    for name in TASKS:
        config = json.loads((hf / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(hf / "base")
    recipe = (hf / "README.md").read_text()
    assert f"model.load_adapter({str(hf / 'dup')!r}, adapter_name='dup')" in recipe
    imported, _ = jaxpeft.adapter_sets.import_adapter_set(str(hf), tiny_params(), llama.hf_module_name)
    saved, _ = jaxpeft.adapter_sets.restore_adapter_set(str(d / "ckpt" / "adapters"), tiny_params())
    assert list(imported) == list(saved) == ["up", "rev", "dup"]
    for name in TASKS:
        for x, y in zip(jax.tree.leaves(imported[name]), jax.tree.leaves(saved[name]), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)

    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf / "base"))
    model = peft.PeftModel.from_pretrained(model, str(hf / "up"), adapter_name="up")
    for name in ("rev", "dup"):
        model.load_adapter(str(hf / name), adapter_name=name)
    model.eval()
    for name in ("dup", "up"):
        model.set_adapter(name)
        batch = sft_data.pack_rows(held_out(data, name), 32, 257)
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(batch["inputs"].astype(np.int64))).logits.numpy()
        ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(batch["targets"]))
        loss = float((ce * batch["mask"]).sum() / batch["mask"].sum())
        np.testing.assert_allclose(loss, result["eval"][f"after/{name}"], rtol=2e-4)


# ----------------------------------------------------------------------------------- the step, on a bank directly


def tiny_bank(n: int):
    args = lora_sft.parse_args(["--layers", "1", "--seq-len", "8"])
    model = llama.LlamaForCausalLM(lora_sft.tiny_config(256, args))
    sample = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), sample)["params"]
    cfg = lora_sft.method_config(args)
    named = {
        f"a{i}": jax.tree.map(lambda x, i=i: x + 0.01 * (i + 1), jaxpeft.linen.init(cfg, model, params, sample, key=k))
        for i, k in enumerate(jax.random.split(jax.random.key(1), n))
    }  # B non-zero: every factor gets a gradient
    return model, params, jaxpeft.stack_adapters(named)


def test_a_rows_loss_reaches_only_its_own_adapter():
    model, params, bank = tiny_bank(2)
    ids = jnp.asarray([0, 1, 0, 1], jnp.int32)
    batch = {k: jnp.asarray(v) for k, v in sft_data.pack_rows(sft_data.synthetic_examples(4, 8, 256, 0), 8, 0).items()}

    def rows_loss(b, which):
        out = lora_sft.logits(model, params, b, batch["inputs"], None, adapter_ids=ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(out, batch["targets"]) * batch["mask"]
        return (ce.sum(-1) * (ids == which)).sum()

    grad = jax.jit(jax.grad(rows_loss), static_argnums=1)
    for which in (0, 1):
        grads = grad(bank, which)
        for _, node in jaxpeft.adapter_items(grads):
            axis = node.layout.stack
            for leaf in jax.tree.leaves(node.adapters):
                mine, other = (np.take(np.asarray(leaf), i, axis=axis) for i in (which, 1 - which))
                assert np.all(other == 0)  # exactly: the other adapter's rows are not in this loss
                assert np.abs(mine).max() > 0


def banks(tree):
    """The adapter banks in ``tree`` (an adapter tree, or an optimizer state holding such trees)."""
    return [x for x in jax.tree.leaves(tree, is_leaf=lora_sft._is_bank) if lora_sft._is_bank(x)]


def test_an_adapter_without_target_tokens_in_a_step_stays_bit_identical():
    model, params, bank = tiny_bank(2)
    tx = jaxpeft.skip_unused_adapters(optax.chain(lora_sft.clip_each_adapter(1.0), optax.adamw(1e-2, weight_decay=0.1)))
    packed = sft_data.pack_rows(sft_data.synthetic_examples(4, 8, 256, 0), 8, 0)
    packed["mask"][2:] = 0  # adapter 1's rows hold no target token
    batch = {k: jnp.asarray(v[None]) for k, v in packed.items()}
    batch["ids"] = jnp.asarray([[0, 0, 1, 1]], jnp.int32)
    step = jax.jit(lora_sft.make_bank_train_step(model, tx, False, 2))
    state = tx.init(bank)
    new, new_state, loss, _, sums, counts = step(bank, state, params, batch, jax.random.key(0))
    assert counts.tolist() == [packed["mask"][:2].sum(), 0] and float(sums[1]) == 0.0
    np.testing.assert_allclose(loss, sums[0] / counts[0], rtol=1e-6)
    assert len(banks(new_state)) == 2 * len(banks(bank))
    for tree, old in ((new, bank), (new_state, state)):  # the adapters, and Adam's moments
        for node, was in zip(banks(tree), banks(old), strict=True):
            for x, y in zip(jax.tree.leaves(node.adapters), jax.tree.leaves(was.adapters), strict=True):
                axis = node.layout.stack
                np.testing.assert_array_equal(np.take(np.asarray(x), 1, axis), np.take(np.asarray(y), 1, axis))
    moved = [
        np.abs(np.asarray(x) - np.asarray(y)).max()
        for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(bank), strict=True)
    ]
    assert max(moved) > 0


def test_clip_each_adapter_clips_each_by_its_own_norm():
    _, _, bank = tiny_bank(2)
    grads = jax.tree.map(jnp.ones_like, bank)

    def scaled(node):  # adapter 0's norm far above the bound, adapter 1's far below
        axis = node.layout.stack
        return jax.tree.map(
            lambda g: g * jnp.asarray([100.0, 1e-4]).reshape([-1 if i == axis else 1 for i in range(g.ndim)]), node
        )

    grads = jax.tree.map(scaled, grads, is_leaf=lora_sft._is_bank)
    clipped, _ = jax.jit(lora_sft.clip_each_adapter(1.0).update)(grads, optax.EmptyState())
    for i, want in ((0, 1.0), (1, None)):
        leaves = [
            np.take(np.asarray(x), i, axis=node.layout.stack)
            for _, node in jaxpeft.adapter_items(clipped)
            for x in jax.tree.leaves(node.adapters)
        ]
        norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in leaves))
        if want is None:  # under the bound: untouched, to the bit
            orig = [
                np.take(np.asarray(x), i, axis=node.layout.stack)
                for _, node in jaxpeft.adapter_items(grads)
                for x in jax.tree.leaves(node.adapters)
            ]
            assert all(np.array_equal(a, b) for a, b in zip(leaves, orig, strict=True))
        else:
            np.testing.assert_allclose(norm, want, rtol=1e-5)
    # With one adapter it is optax's global-norm clip.
    _, _, one = tiny_bank(1)
    g = jax.tree.map(lambda x: 50 * jnp.ones_like(x), one)
    mine, _ = lora_sft.clip_each_adapter(1.0).update(g, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    for x, y in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)


# ------------------------------------------------------------------------------------------ data and refusals


def test_chatterbot_topics_name_each_adapters_data_and_train_in_one_run(tmp_path):
    pytest.importorskip("yaml")
    try:
        topics = sft_data.chatterbot_topics()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    assert {"ai", "food", "history"} <= set(topics)
    assert sft_data.data_source("ai") == "chatterbot:ai"
    assert sft_data.data_source("food+history") == sft_data.data_source("chatterbot:food+history")
    assert sft_data.data_source("chatterbot:food+history") == "chatterbot:food,history"
    result = lora_sft.main(
        ["--model", "tiny", "--layers", "1", "--steps", "2", "--batch", "4", "--seq-len", "48", "--eval-rows", "4",
         "--generate", "1", "--max-new-tokens", "3", "--no-progress", "--adapters", "ai=ai,food=food+history",
         "--metrics", str(tmp_path / "m.jsonl")]
    )  # fmt: skip
    assert sorted(result["adapter_losses"]) == ["ai", "food"]
    assert all(np.isfinite(result["eval"][f"after/{n}"]) for n in ("ai", "food"))
    assert {n: len(g) for n, g in result["generations_after"].items()} == {"ai": 1, "food": 1}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "prompt"], "--adapters with --method prompt: an adapter bank switches adapters of layer calls "
         "per row, and prompt tuning (virtual input tokens) feeds the model inputs; use one of lora, dora, "
         "lora_fa, pissa"),
        (["--method", "ln_tuning"], "--adapters with --method ln_tuning: an adapter bank switches adapters of layer "
         "calls per row, and LN tuning (the RMSNorm scales) adapts none"),
        (["--method", "bitfit"], "--adapters with --method bitfit: an adapter bank switches adapters of layer "
         "calls per row"),
        (["--adapters", "a=synthetic,b"], "--adapters=a=synthetic,b: 'b' is not NAME=DATA (no '='); expected "
         "NAME=DATA,NAME=DATA,..."),
        (["--adapters", "=synthetic"], "'=synthetic' is not NAME=DATA (an empty name)"),
        (["--adapters", "a="], "'a=' is not NAME=DATA (no data after a=)"),
        (["--adapters", "a=synthetic,a=synthetic"], "'a=synthetic' is not NAME=DATA (name 'a' is given twice)"),
        (["--adapters", ".a=synthetic"], "name '.a' is not a plain directory name"),
        (["--adapters", "a=nope.jsonl"], "adapter 'a': 'nope.jsonl' is not a file; expected an existing .jsonl"),
        (["--adapters", "a=synthetic", "--data", "synthetic"], "--data=synthetic with --adapters: each adapter names "
         "its own data (NAME=DATA); leave --data out"),
        (["--adapters", "a=synthetic,b=synthetic,c=synthetic", "--batch", "8"], "--batch=8 / --grad-accum=1 = 8 rows "
         "per micro-batch is not divisible by the 3 adapters of --adapters; every micro-batch holds the same number "
         "of rows of each adapter: e.g. --batch=9"),
        (["--adapters", "base=synthetic", "--export-hf", "out"], "--adapters names an adapter 'base', and "
         "--export-hf=out with --model tiny writes the random base model to EXPORT/base; rename that adapter"),
    ],
)  # fmt: skip
def test_bad_adapters_are_refused_naming_the_entry(flags, message, capsys):
    if "--adapters" not in flags:
        flags = [*flags, "--adapters", "a=synthetic"]
    with pytest.raises(SystemExit) as exit_info:
        lora_sft.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_an_unknown_topic_is_refused_listing_the_known_ones(capsys):
    pytest.importorskip("yaml")
    try:
        topics = sft_data.chatterbot_topics()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    with pytest.raises(SystemExit):
        lora_sft.parse_args(["--adapters", "a=ai,b=cooking"])
    err = capsys.readouterr().err
    assert (
        "--adapters=a=ai,b=cooking: adapter 'b': 'cooking' names no data: 'cooking' is not a chatterbot topic; " in err
    )
    assert f"Known topics: {', '.join(topics)}" in err


def test_a_bank_on_a_2x2x2_mesh_resumes_and_trains_like_one_device(data, tmp_path):
    """8 CPU devices (a fresh process, as a user runs it): the bank sharded like its base weights, each row's adapter
    id sharded with its row; stopped after step 1 and resumed, it follows the one-device curves."""
    flags = [*COMMON[:4], "--steps", "4", *COMMON[6:], "--adapters", adapters_flag(data, ["up", "rev"]), "--batch", "8"]
    mesh = ["--num-cpu-devices", "8", "--mesh", "data=2,fsdp=2,tp=2", "--ckpt-dir", str(tmp_path / "ckpt")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for extra in (["--stop-at", "1"], []):
        proc = subprocess.run(
            [sys.executable, os.path.join("examples", "lora_sft.py"), *flags, *mesh, *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mesh: {'data': 2, 'fsdp': 2, 'tp': 2}" in proc.stdout and "at step 1" in proc.stdout
    one = lora_sft.main(flags)
    with open(tmp_path / "ckpt" / "metrics.jsonl") as f:
        records = {r["step"]: r for r in map(json.loads, f)}
    for name in ("up", "rev"):
        np.testing.assert_allclose(
            [records[s][f"loss/{name}"] for s in range(4)],
            [one["adapter_losses"][name][s] for s in range(4)],
            rtol=1e-5,
        )
        np.testing.assert_allclose(records[4][f"eval_loss/{name}"], one["eval"][f"after/{name}"], rtol=1e-5)


@pytest.mark.parametrize("method", ["lora_fa", "vera", "dora"])
def test_methods_with_frozen_fields_or_magnitudes_train_as_a_bank(method, data, tmp_path):
    """LoRA-FA's frozen A and VeRA's frozen projections stay on the frozen side of a bank; DoRA's grouped path."""
    argv = [*COMMON, "--adapters", adapters_flag(data, ("up", "rev")), "--batch", "4", "--method", method]
    result = lora_sft.main([*argv, "--ckpt-dir", str(tmp_path / "ckpt")])
    losses = {name: [by_step[k] for k in sorted(by_step)] for name, by_step in result["adapter_losses"].items()}
    assert sorted(losses) == ["rev", "up"]
    assert all(np.isfinite(v).all() and v[-1] < v[0] for v in map(np.asarray, losses.values())), losses
