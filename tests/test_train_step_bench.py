"""examples/benchmarks/train_step.py: runs in-process and as a script, prints the ratio lines, writes JSON."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from examples.benchmarks import train_step

ROOT = Path(__file__).resolve().parents[1]
SHRUNK = ["--layers", "1", "--width", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "256"]
SHRUNK += ["--batch", "2", "--seq", "32", "--rank", "4", "--reps", "1"]


def test_main_times_the_chosen_modes_and_ends_with_the_ratio_line(tmp_path, capsys):
    out = tmp_path / "r.json"
    result = train_step.main(["--preset", "tiny", "--modes", "lora,ia3", *SHRUNK, "--json", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("ratio lora/floor ")
    assert float(lines[-1].split()[-1]) == pytest.approx(result["ratios"]["lora/floor"], abs=1e-3)
    assert set(result["modes"]) == {"floor", "lora", "ia3"}  # the floor is always measured
    assert result["shape"]["width"] == 64 and result["shape"]["layers"] == 1
    for row in result["modes"].values():
        assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"] and row["gflop"] > 0
        assert len(row["wall_ms"]) == 1 and row["memory"]["temp"] > 0
    assert result["modes"]["floor"]["ratio"] == 1.0
    assert json.loads(out.read_text())["ratios"] == result["ratios"]


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(SystemExit, match="qlora-fp4"):
        train_step.main(["--modes", "lora,qlora-fp4", *SHRUNK])


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs torch, transformers and peft")
def test_runs_as_a_script_from_the_clone_root_with_hf_peft(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "examples/benchmarks/train_step.py", "--modes", "lora", "--hf", "--no-compile", *SHRUNK]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-2].startswith("ratio lora/floor ") and lines[-1].startswith("ratio hf-lora/floor ")
    assert "hf-floor" in proc.stdout
