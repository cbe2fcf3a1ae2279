"""examples/lora_sft.py: a (2,2,2) mesh on 8 CPU devices, resume, exports, metrics, its data and its errors."""

import json
import os
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
from examples import lora_sft, sft_data
from examples.models import llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    assert config_json["base_model_name_or_path"] == "jaxpeft/tiny-llama"
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


def test_base_spec_shards_fsdp_and_tp_and_replicates_what_does_not_divide():
    mesh = Mesh(np.array(jax.devices()[:1] * 1).reshape(1, 1, 1), lora_sft.MESH_AXES)
    assert lora_sft.base_spec("model/layers/self_attn/q_proj/kernel", (2, 64, 64), mesh) == P(None, "fsdp", "tp")
    assert lora_sft.base_spec("model/layers/mlp/down_proj/kernel", (2, 128, 64), mesh) == P(None, "tp", "fsdp")
    assert lora_sft.base_spec("model/layers/input_layernorm/scale", (2, 64), mesh) == P()

    fake = type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 2, "tp": 4}})()  # divisibility needs only .shape
    assert lora_sft.base_spec("model/embed_tokens/embedding", (258, 64), fake) == P(None, "fsdp")


def test_bad_batch_is_refused_with_the_fix(capsys):
    with pytest.raises(SystemExit):
        lora_sft.parse_args(["--batch", "8", "--grad-accum", "3"])
    assert "--batch 8 is not divisible by --grad-accum 3" in capsys.readouterr().err


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


def test_host_rows_of_one_process_is_everything():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), lora_sft.MESH_AXES)
    assert lora_sft.host_rows(NamedSharding(mesh, P(lora_sft.BATCH_AXES)), 8) == slice(0, 8)


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
