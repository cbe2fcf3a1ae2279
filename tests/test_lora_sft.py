"""examples/lora_sft.py: a (2,2,2) mesh on 8 CPU devices, resume, exports, metrics, its data and its errors."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxpeft
import jaxpeft.checkpoint
import jaxpeft.hf
import jaxpeft.linen
import jaxpeft.sharding
from examples import lora_sft, sft_data
from examples.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# In this process (one CPU device): a 1-layer tiny Llama, 8 steps of 4 rows of 16 tokens, a checkpoint at step 0 only.
TINY = ["--model", "tiny", "--data", "synthetic", "--layers", "1", "--steps", "8", "--batch", "4", "--seq-len", "16"]
TINY += ["--eval-rows", "4", "--save-every", "100", "--no-progress"]
MESH_RUN = ["--num-cpu-devices", "8", "--mesh", "data=2,fsdp=2,tp=2", "--model", "tiny", "--data", "synthetic"]
SMALL = ["--steps", "12", "--batch", "8", "--seq-len", "32", "--save-every", "4", "--no-progress", "--eval-rows", "16"]


def run_script(*args: str) -> str:
    """Runs the example as a user does (a fresh process, from the clone root); returns its output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, os.path.join("examples", "lora_sft.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def read_metrics(path: str) -> tuple[dict[int, float], dict[int, float]]:
    steps, evals = {}, {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                steps[r["step"]] = r["loss"]
            else:
                evals[r["step"]] = r["eval_loss"]
    return steps, evals


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    out = run_script(*MESH_RUN, *SMALL, "--ckpt-dir", str(d / "ckpt"), "--export-hf", str(d / "hf"))
    return d, out


def test_mesh_run_loss_falls_and_writes_everything(full_run):
    d, out = full_run
    assert "mesh: {'data': 2, 'fsdp': 2, 'tp': 2}" in out
    steps, evals = read_metrics(str(d / "ckpt" / "metrics.jsonl"))
    assert sorted(steps) == list(range(12))
    losses = [steps[i] for i in range(12)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert evals[12] < evals[-1] - 0.1, evals
    assert f"held-out loss after: {evals[12]:.4f}" in out
    # The checkpoint's last step, the method config, and an HF export that imports back onto the same model.
    assert jaxpeft.checkpoint.read_config(str(d / "ckpt")) == jaxpeft.LoraConfig(
        rank=8, alpha=16.0, targets=lora_sft.DEFAULT_TARGETS["lora"].split(",")
    )
    with jaxpeft.checkpoint.AdapterCheckpointer(
        str(d / "ckpt"), jaxpeft.checkpoint.read_config(str(d / "ckpt")), _tiny_params(), read_only=True
    ) as ckpt:
        assert ckpt.latest_step() == 11
    config_json = json.loads((d / "hf" / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "LORA" and config_json["r"] == 8
    # the random tiny base, written beside the adapter as a HF Llama directory that transformers loads offline
    assert config_json["base_model_name_or_path"] == str(d / "hf" / "base")
    cfg, adapters = jaxpeft.hf.import_adapters(str(d / "hf"), _tiny_params(), llama.hf_module_name)
    assert cfg.rank == 8
    assert sorted(p for p, _ in jaxpeft.adapter_items(adapters))[0] == "model/layers/mlp/down_proj/kernel"
    assert all(float(jnp.abs(n.b).max()) > 0 for _, n in jaxpeft.adapter_items(adapters))


def _tiny_params():
    args = lora_sft.parse_args(["--model", "tiny", "--data", "synthetic"])
    config = lora_sft.tiny_config(256, args)
    return llama.abstract_params(config)


def test_resume_continues_the_same_loss_curve(full_run, tmp_path):
    d, _ = full_run
    ckpt = str(tmp_path / "ckpt")
    out = run_script(*MESH_RUN, *SMALL, "--ckpt-dir", ckpt, "--stop-at", "5")
    assert "stopped after step 5" in out
    first, _ = read_metrics(os.path.join(ckpt, "metrics.jsonl"))
    assert sorted(first) == list(range(6))
    out = run_script(*MESH_RUN, *SMALL, "--ckpt-dir", ckpt)
    assert "resumed from" in out and "at step 5" in out
    resumed, evals = read_metrics(os.path.join(ckpt, "metrics.jsonl"))
    whole, whole_evals = read_metrics(str(d / "ckpt" / "metrics.jsonl"))
    assert sorted(resumed) == list(range(12))
    np.testing.assert_allclose([resumed[i] for i in range(12)], [whole[i] for i in range(12)], rtol=1e-5)
    np.testing.assert_allclose(evals[12], whole_evals[12], rtol=1e-5)


def test_parse_mesh():
    assert lora_sft.parse_mesh("data=2,fsdp=2,tp=2", 8) == {"data": 2, "fsdp": 2, "tp": 2}
    assert lora_sft.parse_mesh("fsdp=-1,tp=2", 8) == {"data": 1, "fsdp": 4, "tp": 2}
    assert lora_sft.parse_mesh("data=-1", 1) == {"data": 1, "fsdp": 1, "tp": 1}
    with pytest.raises(ValueError, match=r"has 4 devices but 8 are available"):
        lora_sft.parse_mesh("data=2,tp=2", 8)
    with pytest.raises(ValueError, match=r"'model=2' is not AXIS=SIZE"):
        lora_sft.parse_mesh("model=2", 2)
    with pytest.raises(ValueError, match=r"at most one -1"):
        lora_sft.parse_mesh("data=-1,tp=-1", 8)
    with pytest.raises(ValueError, match=r"not divisible by the fixed axes \(3\)"):
        lora_sft.parse_mesh("data=-1,tp=3", 8)


def test_base_specs_shard_its_llama_fsdp_and_tp_and_replicate_what_does_not_divide():
    # The script shards its base with jaxpeft.sharding.base_specs from the model's layouts (the rules are tested in
    # tests/test_base_specs.py); these are the specs of the Llama table it used to hard-code.
    config = lora_sft.tiny_config(258, lora_sft.parse_args([]))  # vocab rounded up to 320, hidden 64, kv width 32
    model = llama.LlamaForCausalLM(config)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    layouts = jaxpeft.linen.infer_layouts(model, ids)

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), lora_sft.MESH_AXES)
    specs = jaxpeft.sharding.base_specs(params, layouts, mesh=mesh)
    layers = specs["model"]["layers"]
    assert layers["self_attn"]["q_proj"]["kernel"] == P(None, "fsdp", "tp")
    assert layers["mlp"]["down_proj"]["kernel"] == P(None, "tp", "fsdp")
    assert layers["input_layernorm"]["scale"] == P()
    assert specs["model"]["embed_tokens"]["embedding"] == P("tp", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tp")

    odd = jaxpeft.sharding.base_specs(params, layouts, mesh={"data": 1, "fsdp": 2, "tp": 3})  # 3 divides no width
    assert odd["model"]["embed_tokens"]["embedding"] == P(None, "fsdp")
    assert odd["model"]["layers"]["self_attn"]["k_proj"]["kernel"] == P(None, "fsdp", None)


def test_bad_batch_is_refused_with_the_fix(capsys):
    with pytest.raises(SystemExit):
        lora_sft.parse_args(["--batch", "8", "--grad-accum", "3"])
    assert "--batch=8 is not divisible by --grad-accum=3; expected a multiple of it" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--grad-accum", "0"], "--grad-accum=0 is less than 1; expected 1 or more micro-batches per step"),
        (["--seq-len", "0"], "--seq-len=0 is less than 1; expected 1 or more tokens per row"),
        (["--batch", "0"], "--batch=0 is less than 1; expected 1 or more rows per optimizer step"),
        (["--warmup", "-3"], "--warmup=-3 is negative; expected 0 or more warm-up steps (0: none)"),
        (["--layers", "0"], "--layers=0 is less than 1; expected 1 or more decoder layers"),
        (["--max-rows", "0"], "--max-rows=0 is less than 1; expected 1 or more rows of the data"),
        (["--eval-rows", "0"], "--eval-rows=0 is less than 1"),
        (["--steps", "0"], "--steps=0 is less than 1"),
        (["--rank", "0"], "--rank=0 is less than 1; expected an adapter rank of 1 or more"),
        (["--alpha", "0"], "--alpha=0.0 is not above 0"),
        (["--dropout", "1"], "--dropout=1.0 is not below 1; expected an adapter dropout probability in [0, 1)"),
        (["--dropout", "-0.1"], "--dropout=-0.1 is negative"),
        (["--lr", "0"], "--lr=0.0 is not above 0; expected a peak learning rate above 0"),
        (["--lr", "nan"], "--lr=nan is not a finite number"),
        (["--weight-decay", "-1"], "--weight-decay=-1.0 is negative"),
        (["--clip", "-1"], "--clip=-1.0 is negative; expected a gradient-norm clip of 0 or more (0: no clipping)"),
        (["--seed", "-1"], "--seed=-1 is negative"),
        (["--save-every", "0"], "--save-every=0 is less than 1"),
        (["--stop-at", "-1"], "--stop-at=-1 is negative"),
        (["--generate", "-1"], "--generate=-1 is negative; expected 0 or more held-out prompts to answer (0: none)"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0 is less than 1"),
        (["--num-cpu-devices", "0"], "--num-cpu-devices=0 is less than 1"),
        (["--num-processes", "2", "--process-id", "2"], "--process-id=2 is not below --num-processes=2"),
        (["--steps", "10", "--warmup", "11"], "--warmup=11 is more than --steps=10"),
        (["--steps", "10", "--stop-at", "10"], "--stop-at=10 is not below --steps=10; expected a step in 0..9"),
        (["--mesh", "data=²"], "--mesh=data=²: 'data=²' is not AXIS=SIZE (size '²' is not a positive integer or -1)"),
        (["--mesh", "data=0"], "'data=0' is not AXIS=SIZE (size '0' is not a positive integer or -1)"),
        (["--mesh", "data=2,data=2"], "'data=2' is not AXIS=SIZE (axis 'data' is given twice)"),
        (["--mesh", "data2"], "'data2' is not AXIS=SIZE (no '='); expected AXIS=SIZE,..."),
        (
            ["--method", "prompt", "--num-virtual-tokens", "0"],
            "--num-virtual-tokens=0 is less than 1; expected 1 or more",
        ),
        (
            ["--method", "ia3", "--num-virtual-tokens", "4"],
            "--num-virtual-tokens=4 is a flag of prompt and prefix tuning; --method ia3 has no virtual tokens",
        ),
        (["--method", "ia3", "--dropout", "0.1"], "--dropout=0.1: --method ia3 has no dropout; leave it out"),
        (
            ["--method", "prompt", "--targets", "q_proj"],
            "--targets=q_proj: --method prompt adds virtual tokens at the "
            "input embedding table (embed_tokens) and adapts no layer; leave --targets out",
        ),
        (["--method", "pissa", "--quantize", "nf4"], "--quantize=nf4 with --method pissa: its init rewrites the base"),
        (["--method", "prefix", "--quantize", "int8"], "--quantize=int8 with --method prefix: --quantize stores the"),
        (
            ["--method", "bitfit", "--export-hf", "out"],
            "--export-hf=out with --method bitfit: Hugging Face PEFT has no BitFit format",
        ),
    ],
)
def test_numeric_flags_are_refused_by_name_value_and_range(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lora_sft.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "--mesh" in flags:
        assert "e.g. --mesh data=2,fsdp=2,tp=2" in err


def test_flags_at_the_edge_of_their_range_are_accepted():
    args = lora_sft.parse_args(
        ["--warmup", "0", "--clip", "0", "--weight-decay", "0", "--generate", "0", "--dropout", "0.5", "--seed", "0",
         "--stop-at", "0", "--steps", "1", "--batch", "1", "--seq-len", "1", "--mesh", " data = -1 , tp=1"]
    )  # fmt: skip
    assert (args.warmup, args.clip, args.stop_at) == (0, 0.0, 0)


def test_gradient_accumulation_equals_one_large_batch():
    args = lora_sft.parse_args(["--model", "tiny", "--data", "synthetic", "--seq-len", "16", "--layers", "1"])
    config = lora_sft.tiny_config(256, args)
    model = llama.LlamaForCausalLM(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    cfg = lora_sft.method_config(args)
    adapters = jaxpeft.linen.init(cfg, model, params, jnp.zeros((1, 16), jnp.int32), key=jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.01, adapters)  # B non-zero: every factor gets a gradient
    rows = sft_data.synthetic_examples(4, 16, 256, 0)
    packed = sft_data.pack_rows(rows, 16, 0)
    packed["mask"][0, 8:] = 0  # unequal token counts: the mean must be over tokens, not micro-batches
    tx = optax.sgd(1.0)
    step = jax.jit(lora_sft.make_train_step(model, tx, False))
    outs = []
    for accum in (1, 2, 4):
        batch = {k: jnp.asarray(v.reshape(accum, -1, 16)) for k, v in packed.items()}
        outs.append(step(adapters, tx.init(adapters), params, batch, jax.random.key(2)))
    for other in outs[1:]:
        np.testing.assert_allclose(other[2], outs[0][2], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(other[0]), jax.tree.leaves(outs[0][0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batches_are_a_function_of_the_step():
    a = sft_data.step_rows(10, 3, 4, seed=0)
    assert np.array_equal(a, sft_data.step_rows(10, 3, 4, seed=0))
    assert not np.array_equal(a, sft_data.step_rows(10, 3, 4, seed=1))
    # Each epoch visits every row once; a host's share is a slice of the global batch.
    seen = np.concatenate([sft_data.step_rows(10, s, 5, seed=0) for s in range(2)])
    assert sorted(seen) == list(range(10))
    assert np.array_equal(sft_data.step_rows(10, 3, 4, seed=0, rows=slice(2, 4)), a[2:4])


def test_host_rows_of_one_process_is_everything_and_host_batch_checks_the_share():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), lora_sft.MESH_AXES)
    sharding = NamedSharding(mesh, P(lora_sft.BATCH_AXES))
    assert jaxpeft.sharding.host_rows(sharding, 8) == slice(0, 8)
    assert jaxpeft.sharding.host_rows(NamedSharding(mesh, P(None, lora_sft.BATCH_AXES)), 6, axis=1) == slice(0, 6)
    rows = np.arange(24, dtype=np.int32).reshape(8, 3)
    placed = jaxpeft.sharding.host_batch({"ids": rows}, sharding, 8)
    np.testing.assert_array_equal(np.asarray(placed["ids"]), rows)
    with pytest.raises(ValueError, match=r"batch leaf 'ids' has 5 rows on axis 0; this process feeds rows 0:8 \(8\)"):
        jaxpeft.sharding.host_batch({"ids": rows[:5]}, sharding, 8)


def test_pack_rows_shifts_and_masks():
    tok = sft_data.ByteTokenizer()
    row = sft_data.pair_example(tok, "hi", "yo")
    packed = sft_data.pack_rows([row], 16, tok.pad_id)
    prompt_len = len(tok.encode(tok.chat_prompt("hi")))
    n = len(row.ids) - 1
    assert packed["inputs"][0, :n].tolist() == row.ids[:-1].tolist()
    assert packed["targets"][0, :n].tolist() == row.ids[1:].tolist()
    # Targets are the answer bytes and the end of turn, nothing of the prompt, nothing of the padding.
    assert packed["mask"][0].sum() == len("yo") + 1
    assert packed["targets"][0][packed["mask"][0] == 1].tolist() == [*b"yo", tok.eos_id]
    assert packed["mask"][0, : prompt_len - 1].sum() == 0


def test_jsonl_rows_and_errors(tmp_path):
    tok = sft_data.ByteTokenizer()
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"text": "xyz"}\n')
    rows = sft_data.file_examples(str(p), tok, 8)
    assert [int(r.mask.sum()) for r in rows] == [2, 3]
    p.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected an object with 'prompt' and 'completion'"):
        sft_data.file_examples(str(p), tok, 8)
    with pytest.raises(ValueError, match="expected 'synthetic', 'chatterbot"):
        sft_data.file_examples(str(tmp_path / "d.csv"), tok, 8)


JSONL_SHAPES = '{"prompt": "...", "completion": "..."} (loss on the completion) or {"text": "..."} (loss on all)'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "completion":}', r"d.jsonl:3: not valid JSON \(Expecting value at column 30\); expected one"),
        ('"just a string"', r"d.jsonl:3: expected a JSON object with the keys 'prompt' and 'completion', or 'text'; "
         "got a JSON string"),
        ("42", r"d.jsonl:3: expected a JSON object .* got a JSON number"),
        ("[1, 2]", r"d.jsonl:3: expected a JSON object .* got a JSON array"),
        ('{"prompt": null, "completion": "b"}', r"d.jsonl:3: 'prompt' is a JSON null \(null\); expected a string"),
        ('{"prompt": "a", "completion": 7}', r"d.jsonl:3: 'completion' is a JSON number \(7\); expected a string"),
        ('{"text": ["x"]}', r"d.jsonl:3: 'text' is a JSON array \(\[\"x\"\]\); expected a string"),
        ('{"prompt": "a"}', r"d.jsonl:3: expected an object with 'prompt' and 'completion', or 'text'; got keys"),
        ('{"prompt": "a", "completion": "b", "text": "c"}', r"d.jsonl:3: holds both 'prompt' and 'completion' and"),
    ],
)  # fmt: skip
def test_jsonl_bad_lines_are_refused_by_file_and_line(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text(f'{{"text": "fine"}}\n\n{line}\n{{"text": "fine"}}\n')  # line 2 is blank: numbers are the file's
    with pytest.raises(ValueError, match=message) as err:
        sft_data.file_examples(str(p), sft_data.ByteTokenizer(), 8)
    assert str(p) in str(err.value)
    if "JSON object" in message or "not valid JSON" in message:
        assert JSONL_SHAPES in str(err.value)


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a BOM is fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 13\)"):
        sft_data.file_examples(str(p), sft_data.ByteTokenizer(), 8)


def test_bad_data_ends_the_script_with_the_file_and_line(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine"}\n{"text": "x",}\n')
    with pytest.raises(SystemExit, match=r"d.jsonl:2: not valid JSON \(Expecting property name") as err:
        lora_sft.main([*TINY[:2], "--data", str(p), "--no-progress"])
    assert str(err.value).startswith(f"--data={p}: ")
    with pytest.raises(SystemExit):
        lora_sft.parse_args(["--data", str(tmp_path / "nope.jsonl")])
    assert (
        f"--data={tmp_path / 'nope.jsonl'} is not a file; expected an existing .jsonl or .txt"
        in capsys.readouterr().err
    )


@pytest.fixture(scope="module")
def tiny_losses():
    """The uninterrupted in-process run that the interrupted and resumed ones must reproduce."""
    return lora_sft.main(TINY)["losses"]


def interrupt_at(monkeypatch, call: int, action) -> None:
    """Runs ``action`` before the ``call``-th train step (counted from 0) of the next ``main``: the real step, loop and
    handler otherwise."""
    real = lora_sft.jit_train_step

    def jit_train_step(*args, **kwargs):
        step_fn, calls = real(*args, **kwargs), iter(range(10**6))

        def step(*xs):
            if next(calls) == call:
                action()
            return step_fn(*xs)

        return step

    monkeypatch.setattr(lora_sft, "jit_train_step", jit_train_step)


def test_interrupted_twice_then_resumed_continues_the_same_curve(tmp_path, monkeypatch, capsys, tiny_losses):
    """A KeyboardInterrupt inside step 3 saves step 2; a real SIGINT during step 5 finishes and saves step 5; a kill
    after that leaves metrics of steps never saved; the last resume logs each step once, on the uninterrupted curve."""
    ckpt = str(tmp_path / "ckpt")
    argv = [*TINY, "--ckpt-dir", ckpt]

    def raise_interrupt():
        raise KeyboardInterrupt

    interrupt_at(monkeypatch, 3, raise_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        lora_sft.main(argv)
    assert exit_info.value.code == 130
    command = " ".join(["examples/lora_sft.py", *argv])
    out = capsys.readouterr().out
    assert f"interrupted (Ctrl-C) after step 2: saved step 2 in {ckpt}; resume with: " in out
    assert out.rstrip().endswith(command)

    interrupt_at(monkeypatch, 2, lambda: signal.raise_signal(signal.SIGINT))  # a real SIGINT, the real handler
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the tests run in a background job of a shell
    with pytest.raises(SystemExit) as exit_info:
        lora_sft.main(argv)
    assert exit_info.value.code == 130
    out, err = capsys.readouterr()
    assert "resumed from" in out and "at step 2" in out
    assert "Ctrl-C: stopping after the step in progress" in err
    assert f"interrupted (Ctrl-C) after step 5: saved step 5 in {ckpt}; resume with: " in out
    assert out.rstrip().endswith(command)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back

    metrics = os.path.join(ckpt, "metrics.jsonl")
    with open(metrics, "a") as f:  # what a kill -9 after step 7 would leave: steps 6, 7 logged, never saved
        f.writelines(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (6, 7))
        f.write('{"step": 8, "lo')
    monkeypatch.undo()
    lora_sft.main(argv)
    assert "metrics: dropped 3 lines of" in capsys.readouterr().out
    with open(metrics) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [-1, *range(8), 8]  # eval before, every step once, eval after
    resumed, _ = read_metrics(metrics)
    np.testing.assert_allclose([resumed[i] for i in range(8)], [tiny_losses[i] for i in range(8)], rtol=1e-5)


def test_sigint_to_the_script_exits_130_without_a_traceback(tmp_path):
    """A real Ctrl-C to a real process: status 130, no traceback, one line saying nothing was saved and how to make
    runs resumable."""
    args = ["--model", "tiny", "--data", "synthetic", "--layers", "1", "--steps", "100000", "--batch", "4"]
    args += ["--seq-len", "16", "--eval-rows", "4", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [sys.executable, os.path.join("examples", "lora_sft.py"), *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("step     2 "):
                proc.send_signal(signal.SIGINT)
                break
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert ": nothing was saved (no --ckpt-dir). To make a run resumable, pass --ckpt-dir DIR (a checkpoint " in out
    assert out.rstrip().endswith(" ".join(["examples/lora_sft.py", *args, "--ckpt-dir", "DIR"]))


def test_resume_with_other_settings_is_refused_naming_each_flag(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(40)))
    ckpt = str(tmp_path / "ckpt")
    argv = [*TINY[:2], "--data", str(data), *TINY[4:], "--ckpt-dir", ckpt, "--generate", "0"]
    lora_sft.main([*argv, "--stop-at", "1"])
    settings = json.loads((tmp_path / "ckpt" / lora_sft.SETTINGS_FILE).read_text())["settings"]
    assert (
        settings["seed"] == 0
        and settings["lr"] == 0.01
        and settings["warmup"] == 0
        and len(settings["data_sha256"]) == 64
    )
    data.write_text(data.read_text() + '{"text": "one more"}\n')
    with pytest.raises(SystemExit) as err:
        lora_sft.main([*argv, "--seed", "1", "--dtype", "bfloat16", "--quantize", "nf4", "--rank", "4"])
    message = str(err.value)
    assert message.startswith(f"--ckpt-dir={ckpt} holds checkpoints of a run with other settings: ")
    for part in ("--dtype=float32 then, bfloat16 now", "--quantize=none then, nf4 now", "--seed=0 then, 1 now",
                 "--rank=8 then, 4 now", "the contents of the --data file (sha256 "):  # fmt: skip
        assert part in message, message
    assert message.endswith(
        "Resuming would continue on another training curve. Resume with the checkpoint's values (--dtype float32, "
        "--quantize none, --seed 0, --rank 8, the --data file as it was), or pass a new --ckpt-dir to start a new run"
    )
    data.write_text(data.read_text().rsplit('{"text"', 1)[0])
    with pytest.raises(SystemExit, match=r"other settings: --lr=0.01 then, 0.02 now\. .* values \(--lr 0.01\), or"):
        lora_sft.main([*argv, "--lr", "0.02"])  # the directory is not left locked by a refusal


def test_chatterbot_pairs_or_skip():
    try:
        pairs = sft_data.chatterbot_pairs(["trivia"])
    except FileNotFoundError as err:
        assert "pip install --no-deps chatterbot-corpus" in str(err)
        pytest.skip(str(err))
    assert len(pairs) > 100 and ("Who was the 37th President of the United States?", "Richard Nixon") in pairs
    assert all(len(q) > 1 and len(a) > 0 for q, a in pairs)  # no malformed entry split into characters
    with pytest.raises(ValueError, match="unknown chatterbot topic"):
        sft_data.chatterbot_pairs(["nope"])


def test_chatterbot_on_the_tiny_model_in_process_with_generations(tmp_path):
    pytest.importorskip("yaml")
    try:
        sft_data.chatterbot_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    result = lora_sft.main(
        ["--model", "tiny", "--data", "chatterbot:trivia", "--steps", "6", "--batch", "4", "--seq-len", "64",
         "--eval-rows", "8", "--generate", "2", "--max-new-tokens", "4", "--no-progress",
         "--metrics", str(tmp_path / "m.jsonl")]
    )  # fmt: skip
    assert result["eval"]["after"] < result["eval"]["before"]
    assert len(result["generations_before"]) == len(result["generations_after"]) == 2
    assert all(isinstance(g, str) for g in result["generations_after"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_hosts_each_reading_their_share_train_like_one(tmp_path):
    """Two processes joined by jax.distributed (2 CPU devices each, data axis across them) = one 4-device run."""
    common = [*SMALL[:8], "--steps", "4", "--eval-rows", "8", "--no-progress", "--mesh", "data=2,tp=2"]
    common += ["--model", "tiny", "--data", "synthetic"]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "examples/lora_sft.py",
                *common,
                "--num-cpu-devices",
                "2",
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                "--metrics",
                str(tmp_path / f"m{i}.jsonl"),
                "--ckpt-dir",
                str(tmp_path / "ckpt"),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert "processes: 2" in outs[0][0] and "loss" not in outs[1][0]  # process 1 prints no log
    assert not (tmp_path / "m1.jsonl").exists()  # ... and writes no metrics
    run_script(*common, "--num-cpu-devices", "4", "--metrics", str(tmp_path / "one.jsonl"))
    two, two_evals = read_metrics(str(tmp_path / "m0.jsonl"))
    one, one_evals = read_metrics(str(tmp_path / "one.jsonl"))
    assert sorted(two) == list(range(4))
    np.testing.assert_allclose([two[i] for i in range(4)], [one[i] for i in range(4)], rtol=1e-5)
    np.testing.assert_allclose(two_evals[4], one_evals[4], rtol=1e-5)
    with jaxpeft.checkpoint.AdapterCheckpointer(
        str(tmp_path / "ckpt"), jaxpeft.checkpoint.read_config(str(tmp_path / "ckpt")), _tiny_params(), read_only=True
    ) as ckpt:
        assert ckpt.latest_step() == 3


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations inside PeftModel
def test_smollm2_truncated_fine_tunes_and_its_export_runs_in_peft(tmp_path):
    """The real pretrained model (first 2 of 30 layers) through the script; PEFT runs the export to the same logits."""
    pytest.importorskip("gguf")
    pytest.importorskip("yaml")
    from examples.models import gguf

    try:
        path = gguf.smollm2_path()
        sft_data.chatterbot_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    out = tmp_path / "hf"
    result = lora_sft.main(
        ["--model", "smollm2", "--layers", "2", "--data", "chatterbot:trivia", "--steps", "4", "--batch", "4",
         "--seq-len", "48", "--eval-rows", "8", "--generate", "0", "--lr", "3e-3", "--export-hf", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert result["eval"]["after"] < result["eval"]["before"] - 0.1, result["eval"]
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config, params = gguf.load_gguf(path, num_layers=2)
    hf = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "rope_parameters")}
    torch_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf, attn_implementation="eager")).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in llama.to_hf_state_dict(params).items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: the head is the embedding
    peft_model = peft.PeftModel.from_pretrained(torch_model, str(out)).eval()
    _, adapters = jaxpeft.hf.import_adapters(str(out), params, llama.hf_module_name)
    ids = np.asarray([sft_data.ByteTokenizer().encode("The capital of France is")], np.int32) % config.vocab_size
    ours = jaxpeft.linen.apply(llama.LlamaForCausalLM(config), {"params": params}, adapters, jnp.asarray(ids))
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        with peft_model.disable_adapter():
            base = peft_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() < 2e-3 * np.abs(theirs).max()
    assert np.abs(theirs - base).max() > 1e-2  # the adapters do something


# ------------------------------------------------------------------------------------------ every method, one run

#: What each method's export says it is (PiSSA/OLoRA: converted to plain LoRA, LoRA-FA: PEFT's plain LoRA).
PEFT_TYPES = {
    "lora": "LORA", "dora": "LORA", "lora_fa": "LORA", "pissa": "LORA", "olora": "LORA", "loha": "LOHA",
    "lokr": "LOKR", "vera": "VERA", "ia3": "IA3", "ln_tuning": "LN_TUNING", "prompt": "PROMPT_TUNING",
    "prefix": "PREFIX_TUNING",
}  # fmt: skip


@pytest.fixture(scope="module")
def every_method(tmp_path_factory):
    """One process of 8 CPU devices runs each method for a step, resumes it for a second step, and exports it."""
    d = tmp_path_factory.mktemp("methods")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, os.path.join("tests", "_sft_methods_worker.py"), str(d), *lora_sft.METHODS, "lora+nf4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return d, json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_method_of_the_table_is_a_choice():
    assert set(PEFT_TYPES) | {"bitfit"} == set(lora_sft.METHODS)
    for name in lora_sft.METHODS:
        assert lora_sft.parse_args(["--method", name]).method == name


@pytest.mark.parametrize("method", sorted(PEFT_TYPES))
def test_every_method_trains_on_the_mesh_resumes_and_exports(every_method, method):
    d, report = every_method
    first, resumed = report[method]["first"], report[method]["resumed"]
    assert "result" in first, first
    assert "mesh: {'data': 2, 'fsdp': 2, 'tp': 2}" in first["out"]
    assert list(first["result"]["losses"]) == ["0"] and "stopped after step 0 (--stop-at)" in first["out"]
    assert "result" in resumed, resumed
    assert f"resumed from {d / method / 'ckpt'} at step 0" in resumed["out"]
    assert list(resumed["result"]["losses"]) == ["1"] and np.isfinite(resumed["result"]["eval"]["after"])
    steps, _ = read_metrics(str(d / method / "ckpt" / "metrics.jsonl"))
    assert sorted(steps) == [0, 1]
    flags = ["--method", method, "--layers", "1"]
    flags += ["--num-virtual-tokens", "4"] if method in lora_sft.INPUT_METHODS else []
    tiny = lora_sft.tiny_config(256, lora_sft.parse_args(flags))
    assert jaxpeft.checkpoint.read_config(str(d / method / "ckpt")) == lora_sft.method_config(
        lora_sft.parse_args(flags), tiny
    )
    hf = d / method / "hf"
    config_json = json.loads((hf / "adapter_config.json").read_text())
    assert config_json["peft_type"] == PEFT_TYPES[method]
    assert config_json["base_model_name_or_path"] == str(hf / "base")  # the random base, written beside it
    assert (hf / "base" / "config.json").exists() and (hf / "base" / "model.safetensors").exists()
    assert f"AutoPeftModelForCausalLM.from_pretrained({str(hf)!r})" in (hf / "README.md").read_text()
    if method == "dora":
        assert config_json["use_dora"] is True
    if method in ("pissa", "olora"):  # converted to plain LoRA over the original weights, rank 2r
        assert config_json["r"] == 16 and config_json["init_lora_weights"] is True


def test_qlora_on_the_mesh_shards_the_quantised_base_resumes_and_exports(every_method):
    """`--quantize nf4` on (2,2,2): the base's codes and scales are sharded like the weights (base_specs), so one
    device holds a share of the quantised base, not all of it."""
    d, report = every_method
    first, resumed = report["lora+nf4"]["first"], report["lora+nf4"]["resumed"]
    assert "result" in first and "result" in resumed, (first, resumed)
    assert np.isfinite(resumed["result"]["eval"]["after"])
    on_first, total = first["result"]["base_bytes_first_device"], first["result"]["base_bytes"]
    assert on_first < 0.5 * total, (on_first, total)  # codes and scales sharded, not replicated on every device
    assert total < 0.7 * report["lora"]["first"]["result"]["base_bytes"]  # and quantised (embeddings stay float)
    assert json.loads((d / "lora+nf4" / "hf" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_bitfit_on_a_llama_without_biases_is_refused_with_the_fix(every_method):
    _, report = every_method
    message = report["bitfit"]["first"]["exit"]
    assert message.startswith("--method bitfit with --targets all on --model tiny: `targets`='all' matched no bias"), (
        message
    )
    assert message.endswith("choose such a --model, or another --method (e.g. ln_tuning)"), message


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own deprecations inside PeftModel
@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's notes on loading (e.g. VeRA's projections)
@pytest.mark.parametrize("method", ["pissa", "lora_fa", "vera", "ln_tuning", "prompt", "prefix"])
def test_the_export_runs_in_peft_on_its_base_to_the_trained_held_out_loss(every_method, method, monkeypatch):
    """The export's own recipe (AutoPeftModelForCausalLM on the directory, offline) gives the held-out loss that the
    script measured after training: the adapters, their conversion (PiSSA) and the named base all agree."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, report = every_method
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(d / method / "hf")).eval()
    rows = sft_data.synthetic_examples(8, 16, 256, 1000)  # the script's held-out rows: --seed 0 + 1000
    batch = sft_data.pack_rows(rows, 16, 0)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(batch["inputs"].astype(np.int64))).logits.numpy()
    logits = logits[:, -16:]  # prompt tuning: PEFT's logits include the virtual tokens' positions
    ce = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(batch["targets"]))
    loss = float((ce * batch["mask"]).sum() / batch["mask"].sum())
    np.testing.assert_allclose(loss, report[method]["resumed"]["result"]["eval"]["after"], rtol=2e-4)
