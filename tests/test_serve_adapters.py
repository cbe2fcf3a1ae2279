"""``examples/serve_adapters.py`` on the real SmolLM2 GGUF (first 2 layers) and chatterbot topics; skipped without
the assets."""

from __future__ import annotations

import numpy as np
import pytest

from examples import sft_data


def test_serve_adapters_mixed_batch_equals_each_row_alone(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gguf")
    pytest.importorskip("yaml")
    pytest.importorskip("tokenizers")
    from examples import serve_adapters
    from examples.models import gguf

    try:
        gguf.smollm2_path()
        sft_data.chatterbot_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    result = serve_adapters.main(
        ["--layers", "2", "--steps", "2", "--new-tokens", "4", "--repeats", "1", "--topics", "food,history,sports"]
    )
    assert result["topics"] == ["food", "history", "sports"]
    assert result["equal"] == [True, True, True]  # every row decoded in the mixed batch equals it alone
    assert result["mixed"].shape == (3, 4)
    assert not np.array_equal(result["mixed"], result["base"])  # the trained adapters change what is generated
    assert not np.array_equal(result["mixed"], result["one"])  # and the rows run different adapters
    assert all(v > 0 for v in result["tokens_per_s"].values())
    out = capsys.readouterr().out
    assert "every row equals decoding it alone: yes" in out
    assert "mixed/one" in out


def test_serve_adapters_flags() -> None:
    from examples import serve_adapters

    with pytest.raises(SystemExit):
        serve_adapters.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit, match="at least two different chatterbot topics"):
        serve_adapters.main(["--topics", "food,food"])
