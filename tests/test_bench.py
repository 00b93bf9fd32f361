"""The benchmark scripts run end to end (tiny sizes; their numbers are measured in bench/, not here)."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grad_modulation_bench_runs(tmp_path):
    out = load("grad_modulation").main(["--repeat", "1", "--json", str(tmp_path / "g.json")])
    assert out["tensors"] == 40 and out["speedup_noise"] > 0 and (tmp_path / "g.json").exists()
    assert out["speedup_noise_channels_last"] > 0 and "fused_noise_tensor_step" in out["cases"]


def test_scores_bench_runs(tmp_path):
    load("scores").main(["--repeat", "1", "--json", str(tmp_path / "s.json")])
    assert (tmp_path / "s.json").exists()


def test_imbalance_bench_runs(tmp_path):
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("sklearn")
    out = load("imbalance").main(["--clips", "24", "--epochs", "1", "--json", str(tmp_path / "i.json")])
    assert set(out["results"]["audio"]) == {"joint", "unimodal audio", "unimodal visual"}
    assert isinstance(out["reproduced"]["audio"], bool) and (tmp_path / "i.json").exists()


def test_data_bench_runs(tmp_path):
    pytest.importorskip("nvidia.dali")
    load("data").main(["--clips", "24", "--epochs", "1", "--size", "32", "--batch-size", "4",
                       "--json", str(tmp_path / "d.json")])
    assert (tmp_path / "d.json").exists()
