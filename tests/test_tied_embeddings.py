"""Tied word embeddings between HF PEFT and jaxpeft: untied loads, exact imports, and the refusal in between.

PEFT 0.21 adapts a tied model's output head along with its embedding only with ``ensure_weight_tying=True``; by
default it adapts the embedding lookup alone and the head keeps the original table. ``jaxpeft.linen`` applies an
embedding adapter to ``nn.Embed.attend`` (the example Llama's tied head) as well, so the default file is imported
into an untied copy of the model (``untie_embeddings=True``: the head gets a copy of the table) or refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft
import jaxpeft.hf as hf
import jaxpeft.linen
from examples.models import llama

pytestmark = [
    # PEFT's own notices: it saves the embedding it adapts, probes a deprecated transformers API, and warns that
    # ensure_weight_tying is off on a tied model (the very case these tests import).
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True` and a tied layer:UserWarning"),
]

TOL = 1e-4
IDS = np.random.default_rng(0).integers(1, 60, (2, 9)).astype(np.int64)
REFUSED = (
    r"the adapter file adapts the word embedding 'model\.embed_tokens' without `ensure_weight_tying`: PEFT applied "
    r"it to the embedding lookup only, and the output head tied to that table kept the original weight\. This model "
    r"computes its logits with the same table \('model/embed_tokens/embedding'; {why}\), so jaxpeft would change the "
    r"head too .* Fix: load the base model with an untied head holding its own copy of the table \(examples/models: "
    r"llama\.load_hf_checkpoint\(\.\.\., untie_embeddings=True\) or gguf\.load_gguf\(\.\.\., untie_embeddings=True\)\)"
)


def _logits(config: llama.LlamaConfig, params: Any, adapters: Any = None) -> np.ndarray:
    model = llama.LlamaForCausalLM(config)
    if adapters is None:
        return np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    return np.asarray(jaxpeft.linen.apply(model, {"params": params}, adapters, jnp.asarray(IDS)))


def _diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(ours - theirs)))


# ----------------------------------------------------------------------------------------------- untied loads


def test_untied_copies_the_table_and_keeps_the_logits() -> None:
    config = llama.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    params = llama.LlamaForCausalLM(config).init(jax.random.key(0), jnp.asarray(IDS))["params"]
    config_u, params_u = llama.untied(config, params)
    assert config_u == dataclasses.replace(config, tie_word_embeddings=False) and "lm_head" not in params
    table = params["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(params_u["lm_head"]["kernel"], table.T)
    assert params_u["model"] is params["model"]  # the rest is shared, not copied
    np.testing.assert_allclose(_logits(config_u, params_u), _logits(config, params), rtol=0, atol=1e-5)
    # Abstract params give the abstract head; an untied model is returned as it is.
    _, shapes = llama.untied(config, llama.abstract_params(config))
    assert shapes["lm_head"]["kernel"] == jax.ShapeDtypeStruct((32, 64), jnp.float32)
    again = llama.untied(config_u, params_u)
    assert again[0] is config_u and again[1]["lm_head"] is params_u["lm_head"]


def test_gguf_loader_unties_on_request(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from examples.models import gguf as gguf_loader
    from tests.test_gguf import _hf_tensors, _write_gguf

    path = _write_gguf(tmp_path / "tied.gguf", _hf_tensors(tied=True))
    config, params = gguf_loader.load_gguf(path)
    config_u, params_u = gguf_loader.load_gguf(path, untie_embeddings=True)
    assert config.tie_word_embeddings and not config_u.tie_word_embeddings
    assert config_u == dataclasses.replace(config, tie_word_embeddings=False)
    np.testing.assert_array_equal(params_u["lm_head"]["kernel"], params["model"]["embed_tokens"]["embedding"].T)
    ids = IDS % config.vocab_size
    ours = llama.LlamaForCausalLM(config_u).apply({"params": params_u}, jnp.asarray(ids))
    np.testing.assert_allclose(
        ours, llama.LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids)), atol=1e-5
    )


# ----------------------------------------------------------------------------------------------- PEFT files


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny tied torch Llama, and our Llama loaded from its checkpoint tied and untied (same logits)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from tests._tiny_llama import tiny_llama_pair

    directory = tmp_path_factory.mktemp("tied")
    torch_model, model, params = tiny_llama_pair(directory, tied=True)
    config_u, params_u = llama.load_hf_checkpoint(directory, untie_embeddings=True)
    assert model.config.tie_word_embeddings and "lm_head" not in params
    assert not config_u.tie_word_embeddings and sorted(params_u) == ["lm_head", "model"]
    with torch.no_grad():
        base = torch_model(torch.tensor(IDS)).logits.numpy()
    assert _diff(_logits(model.config, params), base) < TOL
    assert _diff(_logits(config_u, params_u), base) < TOL
    return {"torch": torch_model, "tied": (model.config, params), "untied": (config_u, params_u)}


def _peft_adapter(tied_llama: dict[str, Any], directory: Path, **lora: Any) -> np.ndarray:
    """A PEFT LoRA on the tied torch model with random factors (a trained adapter's size), saved; its logits."""
    import peft
    import torch

    torch.manual_seed(9)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora)
    model = peft.get_peft_model(copy.deepcopy(tied_llama["torch"]), cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # init_lora_weights=False draws N(0, 1) factors
                p.mul_(0.3)
            elif "modules_to_save" in name:  # the trained copy of a saved module
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(directory)
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_default_tying_imports_exactly_into_untied_params(tied_llama: dict[str, Any], tmp_path: Path, task_type):
    """PEFT's default (no ensure_weight_tying): the lookup is adapted, the head is not; the untied copy does that."""
    theirs = _peft_adapter(tied_llama, tmp_path, target_modules=["embed_tokens", "q_proj"], task_type=task_type)
    assert json.loads((tmp_path / hf.CONFIG_NAME).read_text())["ensure_weight_tying"] is False
    config, params = tied_llama["untied"]
    _, adapters = hf.import_adapters(tmp_path, params, llama.hf_module_name, tie_word_embeddings=False)
    assert sorted(adapters) == ["model"]  # nothing on lm_head: PEFT left the tied head alone
    ours = _logits(config, params, adapters)
    moved = _diff(_logits(config, params), theirs)
    # What the import did before: the same adapter on the tied model, where it also changes the head.
    tied_config, tied_params = tied_llama["tied"]
    _, forced = hf.import_adapters(tmp_path, tied_params, llama.hf_module_name, tie_word_embeddings=False)
    wrong = _logits(tied_config, tied_params, forced)
    agree = float(np.mean(wrong.argmax(-1) == theirs.argmax(-1)))
    print(
        f"PEFT default tying, untied import: max |logit diff| {_diff(ours, theirs):.2e} (adapter moved logits by "
        f"{moved:.2f}); the same file on the tied model: {_diff(wrong, theirs):.2f}, top-1 agreement {agree:.0%}"
    )
    assert moved > 1e-2 and _diff(ours, theirs) < TOL
    assert _diff(wrong, theirs) > 0.1  # the tied head makes a real difference, so the check above proves something
    # The untied config says so itself; inference agrees (there is a head of its own).
    hf.import_adapters(tmp_path, params, llama.hf_module_name, tie_word_embeddings=config.tie_word_embeddings)
    hf.import_adapters(tmp_path, params, llama.hf_module_name)


def test_default_tying_is_refused_for_a_tied_model(tied_llama: dict[str, Any], tmp_path: Path) -> None:
    config, params = tied_llama["tied"]
    _peft_adapter(tied_llama, tmp_path / "plain", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(ValueError, match=REFUSED.format(why=r"`tie_word_embeddings`=True")):
        hf.import_adapters(
            tmp_path / "plain", params, llama.hf_module_name, tie_word_embeddings=config.tie_word_embeddings
        )
    # A causal LM whose params hold no head of their own computes its logits with the table: inferred.
    _peft_adapter(tied_llama, tmp_path / "lm", target_modules=["embed_tokens", "q_proj"], task_type="CAUSAL_LM")
    why = r"tied, inferred from `task_type`='CAUSAL_LM' and no other parameter spanning the vocabulary of 64: .*"
    with pytest.raises(ValueError, match=REFUSED.format(why=why)):
        hf.import_adapters(tmp_path / "lm", params, llama.hf_module_name)
    with pytest.raises(TypeError, match=r"`tie_word_embeddings`='yes'; expected True, False or None"):
        hf.import_adapters(tmp_path / "lm", params, llama.hf_module_name, tie_word_embeddings="yes")
    # Without the embedding nothing is tied: accepted either way.
    _peft_adapter(tied_llama, tmp_path / "q", target_modules=["q_proj"], task_type="CAUSAL_LM")
    hf.import_adapters(tmp_path / "q", params, llama.hf_module_name, tie_word_embeddings=True)


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_ensure_weight_tying_imports_exactly(tied_llama: dict[str, Any], tmp_path: Path, kind: str) -> None:
    """With ensure_weight_tying PEFT adapts the head too: exact on the tied model (attend) and the untied copy."""
    theirs = _peft_adapter(
        tied_llama, tmp_path, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True, task_type="CAUSAL_LM"
    )
    config, params = tied_llama[kind]
    _, adapters = hf.import_adapters(
        tmp_path, params, llama.hf_module_name, tie_word_embeddings=config.tie_word_embeddings
    )
    # Tied: the head's copy of the factors is dropped (attend applies the embedding's); untied: it adapts lm_head.
    assert ("lm_head" in adapters) == (kind == "untied")
    ours = _logits(config, params, adapters)
    print(f"PEFT ensure_weight_tying, {kind} import: max |logit diff| {_diff(ours, theirs):.2e}")
    assert _diff(_logits(config, params), theirs) > 1e-2 and _diff(ours, theirs) < TOL


def test_saved_embedding_copy_follows_the_same_rule(tied_llama: dict[str, Any], tmp_path: Path) -> None:
    """modules_to_save: PEFT runs the trained copy for the lookup only; the head keeps the original table."""
    theirs = _peft_adapter(tied_llama, tmp_path, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    config, params = tied_llama["untied"]
    like = {"model.embed_tokens": params["model"]["embed_tokens"]}
    _, adapters, saved = hf.import_adapters(tmp_path, params, llama.hf_module_name, modules_to_save=like)
    trained = {**params, "model": {**params["model"], "embed_tokens": saved["model.embed_tokens"]}}
    ours = _logits(config, trained, adapters)
    print(f"PEFT modules_to_save embedding, untied import: max |logit diff| {_diff(ours, theirs):.2e}")
    assert _diff(_logits(config, params, adapters), theirs) > 1e-2 and _diff(ours, theirs) < TOL
    tied_params = tied_llama["tied"][1]
    with pytest.raises(ValueError, match=r"saves a trained copy \(modules_to_save\) of the word embedding"):
        hf.import_adapters(tmp_path, tied_params, llama.hf_module_name, modules_to_save=like, tie_word_embeddings=True)


# ----------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_peft_embedding_adapter(tmp_path: Path) -> None:
    """The real tied model (first 2 blocks of SmolLM2-135M from its GGUF): PEFT's default file imports exactly into
    the untied load and is refused for the tied one."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("gguf")
    from safetensors.numpy import save_file

    from examples.models import gguf as gguf_loader

    try:
        reader = gguf_loader.read_gguf(gguf_loader.smollm2_path())
    except FileNotFoundError:
        pytest.skip(f"SmolLM2 asset missing; install it with: {gguf_loader.SMOLLM2_INSTALL}")
    config, params = gguf_loader.load_gguf(reader, num_layers=2)
    config_u, params_u = gguf_loader.load_gguf(reader, num_layers=2, untie_embeddings=True)
    assert config.tie_word_embeddings and "lm_head" in params_u
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file(llama.to_hf_state_dict(params), str(base / "model.safetensors"))
    torch_model = transformers.LlamaForCausalLM.from_pretrained(base, attn_implementation="eager").eval()
    assert torch_model.lm_head.weight is torch_model.model.embed_tokens.weight
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(torch_model, lora).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.05)
        theirs = peft_model(torch.tensor(IDS)).logits.numpy()
    peft_model.save_pretrained(tmp_path / "adapter")
    _, adapters = hf.import_adapters(tmp_path / "adapter", params_u, llama.hf_module_name)
    ours = _logits(config_u, params_u, adapters)
    _, forced = hf.import_adapters(tmp_path / "adapter", params, llama.hf_module_name, tie_word_embeddings=False)
    wrong = _logits(config, params, forced)
    agree = float(np.mean(wrong.argmax(-1) == theirs.argmax(-1)))
    print(
        f"SmolLM2 (2 blocks) PEFT default tying: untied import max |logit diff| {_diff(ours, theirs):.2e} (adapter "
        f"moved logits by {_diff(_logits(config, params), theirs):.2f}); tied import {_diff(wrong, theirs):.2f}, "
        f"top-1 agreement {agree:.0%}"
    )
    assert _diff(ours, theirs) < 1e-3 * max(1.0, float(np.abs(theirs).max()))
    with pytest.raises(ValueError, match=REFUSED.format(why=r"`tie_word_embeddings`=True")):
        hf.import_adapters(tmp_path / "adapter", params, llama.hf_module_name, tie_word_embeddings=True)
