"""examples/benchmarks/train_step.py: runs in-process and as a script, prints the ratio lines, writes JSON."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
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


def test_hf_without_the_interop_extra_fails_before_compiling_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    monkeypatch.setattr(train_step, "jax_runner", lambda *a, **k: pytest.fail("compiled before the check"))
    with pytest.raises(
        SystemExit, match=r'needs peft \(the interop extra\): \.venv/bin/pip install -e "\.\[interop\]"'
    ):
        train_step.main(["--modes", "lora", "--hf", *SHRUNK])


def test_perf_targets_takes_the_median_of_fresh_runs_and_checks_each_target(tmp_path, capsys):
    from examples.benchmarks import perf_targets

    out = tmp_path / "t.json"
    shrunk = SHRUNK[:-2]  # without its --reps 1
    result = perf_targets.main(
        [
            "--preset",
            "tiny",
            "--runs",
            "2",
            "--reps",
            "1",
            "--modes",
            "lora,dora",
            "--no-hf",
            "--out",
            str(out),
            *shrunk,
        ]
    )
    assert len(result["runs"]) == 2 and result["runs"][0]["shape"]["width"] == 64
    per_run = sorted(r["ratios"]["lora/floor"] for r in result["runs"])
    assert result["median_ratios"]["lora/floor"] == pytest.approx(sum(per_run) / 2)  # median of two: their mean
    t = result["targets"]
    assert t["lora/floor"]["limit"] == 1.05 and t["lora/floor"]["met"] == (t["lora/floor"]["value"] <= 1.05)
    assert t["qlora-nf4/floor"]["met"] is None  # not among the modes: unmeasured, not passed
    assert "target lora/floor:" in capsys.readouterr().out
    assert json.loads(out.read_text())["targets"] == json.loads(json.dumps(t))


def test_perf_target_check_compares_against_hf_and_the_limits():
    from examples.benchmarks.perf_targets import check

    t = check("tiny", {"lora/floor": 1.04, "hf-lora/floor": 1.06, "dora/lora": 1.2})
    assert t["lora/floor"]["met"] and t["lora/floor below hf-lora/floor"]["met"] and not t["dora/lora"]["met"]
    g = check("tinyllama", {"lora/floor": 1.07, "hf-lora/lora speed": 2.0, "hf-lora-compiled/lora speed": 1.7})
    assert g["lora/floor"]["met"] and not g["hf-lora/lora speed"]["met"] and g["hf-lora-compiled/lora speed"]["met"]
    assert g["lora/floor peak memory"]["met"] is None


def test_lora_overhead_ablation_variants_compute_what_they_claim():
    from examples.benchmarks import lora_overhead as lo

    small = {"tokens": 16, "width": 8, "ffn": 12, "layers": 2, "rank": 2}
    full = lo.build("lora", **small)()
    siblings = lo.build("lora-siblings", **small)()  # the fused down-projection: the same gradients
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(siblings), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    dx_only = lo.build("lora-dx", **small)()
    np.testing.assert_allclose(dx_only[1], full[1], rtol=1e-5, atol=1e-6)  # the same input gradient
    assert all(not np.any(np.asarray(t)) for t in jax.tree.leaves(dx_only[0]))  # and no factor gradient
    db = lo.build("lora-db", **small)()
    np.testing.assert_allclose(db[0]["q"][1], full[0]["q"][1], rtol=1e-5, atol=1e-6)  # B's gradient is LoRA's
    floor = lo.build("floor", **small)()
    assert not np.allclose(floor, full[1])  # the adapters change the input gradient
    ratios = lo.main(["--reps", "1", *[f"--{k}={v}" for k, v in small.items()]])
    assert set(ratios) == set(lo.VARIANTS) and ratios["floor"] == 1.0
