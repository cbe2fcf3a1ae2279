"""examples/why_peft.py end to end on tiny settings: the table, the plots, the accounting and the spectra."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the plots need matplotlib: pip install -e '.[examples]'")

from examples import why_peft as wp

TINY = ["--steps", "25", "--pretrain-steps", "40", "--quick", "--hidden", "48,24", "--timing-rounds", "3"]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("why_peft")
    res = wp.main(["--data", "synthetic", "--out", str(out), *TINY])
    res["out"] = str(out)
    return res


def _rows(results: dict, setting: str) -> dict[str, dict]:
    return {r["method"]: r for r in results["rows"] if r["setting"] == setting}


def test_table_has_every_setting_and_method(results):
    assert [(r["setting"], r["method"]) for r in results["rows"]] == [
        (s, m) for s in ("narrow", "large") for m in wp.METHODS
    ]
    for setting in ("narrow", "large"):
        for method in wp.METHODS:
            assert f"| {setting} | {method} |" in results["table"]
    for r in results["rows"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["step_ms"] > 0 and r["checkpoint_bytes"] > 0
    # The tiny synthetic task is learnable: adapting beats chance (5 classes) by a wide margin.
    assert _rows(results, "narrow")["full"]["test_acc"] > 0.5


def test_plots_and_json_written(results):
    for name in ("learning_curves.png", "spectra.png"):
        path = os.path.join(results["out"], name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert os.path.getsize(path) > 5000, name
    with open(os.path.join(results["out"], "results.json")) as f:
        saved = json.load(f)
    assert saved["table"] == results["table"] and len(saved["rows"]) == 2 * len(wp.METHODS)


@pytest.mark.parametrize("setting", ["narrow", "large"])
def test_trainable_params_and_optimizer_bytes_ordered(results, setting):
    rows = _rows(results, setting)
    order = ["head", "lora-r1", "lora-r4", "lora-r16", "full"]
    params = [rows[m]["trainable_params"] for m in order]
    opt = [rows[m]["optimizer_bytes"] for m in order]
    assert params == sorted(params) and len(set(params)) == len(params), params
    assert opt == sorted(opt) and len(set(opt)) == len(opt), opt
    # Adam keeps two float32 moments per trainable parameter, plus two int32 step counters.
    assert opt == [8 * n + 8 for n in params]
    # LoRA r on kernels (fan_in, fan_out) adds r * (fan_in + fan_out) parameters per target over the head alone.
    hidden, inputs = (48, 24), 12 * 12
    per_rank = (inputs + hidden[0]) + (hidden[0] + hidden[1])
    for r in wp.RANKS:
        assert rows[f"lora-r{r}"]["trainable_params"] - rows["head"]["trainable_params"] == r * per_rank
    assert rows["full"]["trainable_percent"] == 100.0
    assert rows["full"]["checkpoint_bytes"] > rows["lora-r1"]["checkpoint_bytes"]


@pytest.mark.parametrize("setting", ["narrow", "large"])
def test_energy_fractions_in_unit_interval_and_increase_with_rank(results, setting):
    spec = results["spectra"][setting]
    for energy in [spec["pooled"], *(layer["energy"] for layer in spec["layers"].values())]:
        values = [energy[str(r)] for r in wp.RANKS]
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in values), values
        assert values == sorted(values) and values[0] < values[-1], values
    full = _rows(results, setting)["full"]
    assert full["energy"] == spec["pooled"]
    assert all(r["energy"] is None for r in results["rows"] if r["method"] != "full")


def test_verdicts_are_judged_from_the_numbers(results):
    assert set(results["hypotheses"]) == {
        "lora_matches_full_on_narrow",
        "lora_behind_full_on_large",
        "update_more_concentrated_on_narrow",
    }
    for v in results["hypotheses"].values():
        assert v["verdict"] in {"confirmed", "partly", "refuted"}
        assert v["verdict"] == wp._verdict(v["held"])
    gaps = wp.paired_gaps(
        {
            ("s", "full"): np.array([1, 1, 1, 0], bool),
            ("s", "lora-r1"): np.array([0, 1, 1, 0], bool),
        }
    )
    assert gaps["s"]["lora-r1"][0] == pytest.approx(25.0)


def test_missing_data_names_both_install_commands(monkeypatch):
    monkeypatch.setattr(wp, "FASHION_DIR", "/nonexistent/fashion-mnist")
    monkeypatch.setattr(wp, "mnist5k_path", lambda: None)
    with pytest.raises(wp.DataMissing) as err:
        wp.load_data("auto")
    assert wp.INSTALL_FASHION in str(err.value) and wp.INSTALL_MNIST5K in str(err.value)
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        wp.main(["--data", "fashion"])


def test_real_fashion_mnist_files_read():
    if not os.path.exists(os.path.join(wp.FASHION_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST not installed: {wp.INSTALL_FASHION}")
    data = wp.load_fashion()
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert np.bincount(data.test_y).tolist() == [1000] * 10
    assert data.train_x.min() >= 0.0 and data.train_x.max() <= 1.0


def test_real_mnist5k_file_read():
    path = wp.mnist5k_path()
    if path is None:
        pytest.skip(f"MNIST 5k not installed: {wp.INSTALL_MNIST5K}")
    data = wp.load_mnist5k(path)
    assert data.train_x.shape == (4000, 784) and data.test_x.shape == (1000, 784)
    assert sorted(set(data.train_y.tolist())) == list(range(10))


def test_tasks_split_and_relabel():
    data = wp.make_synthetic(seed=1)
    tasks = wp.make_tasks(data, pretrain_rows=600, train_rows=400, val_rows=200, seed=1)
    assert [len(tasks[t].train[1]) for t in ("source", "narrow", "large")] == [600, 400, 400]
    for task in tasks.values():
        for x, y in (task.train, task.val, task.test):
            assert x.shape == (len(y), data.side**2) and set(np.unique(y)) <= set(range(5))
    source_test = data.test_x[np.isin(data.test_y, wp.SOURCE)]
    np.testing.assert_array_equal(tasks["narrow"].test[0], wp.narrow_shift(source_test, data.side))
    assert not np.array_equal(tasks["narrow"].test[0], source_test)
    large_test = data.test_x[np.isin(data.test_y, wp.TARGET)]
    np.testing.assert_array_equal(np.sort(tasks["large"].test[0], axis=1), np.sort(large_test, axis=1))
    assert not np.array_equal(tasks["large"].test[0], large_test)  # permuted
    np.testing.assert_array_equal(tasks["large"].test[1], data.test_y[np.isin(data.test_y, wp.TARGET)] - 5)


def test_plot_titles_state_the_finding_rank_by_rank():
    def titles(held: dict[str, bool]) -> tuple[str, str]:
        hypotheses = {"lora_matches_full_on_narrow": {"held": held}, "lora_behind_full_on_large": {"held": held}}
        results = {"args": {"tol": 1.0}, "hypotheses": hypotheses}
        return wp.finding(results, "narrow"), wp.finding(results, "large")

    assert titles({"lora-r1": False, "lora-r4": True, "lora-r16": True}) == (
        "narrow shift: LoRA r=4, 16 match full fine-tuning (within 1 pp); r=1 trails it by more",
        "large drift: LoRA r=4, 16 fall behind full fine-tuning (by > 1 pp and 2 SE); r=1 stays close",
    )
    assert titles(dict.fromkeys(("lora-r1", "lora-r4", "lora-r16"), False)) == (
        "narrow shift: LoRA r=1, 4, 16 trail full fine-tuning by more than 1 pp",
        "large drift: LoRA r=1, 4, 16 stay within 1 pp (or 2 SE) of full fine-tuning",
    )
    assert titles({"lora-r1": True, "lora-r4": False})[0] == (
        "narrow shift: LoRA r=1 matches full fine-tuning (within 1 pp); r=4 trails it by more"
    )
