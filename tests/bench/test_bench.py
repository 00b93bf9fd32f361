"""The benchmark scripts run end to end at tiny sizes, and the figures they produce are sane:
every number finite, every time, rate and speedup positive, the fields present. (Their values
are measured in bench/, not here.)"""
import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TIMES = ("_ms", "_s", "per_s", "seconds")


def assert_sane(report, where="report"):
    """Every number finite; every time, rate and speedup positive (recursively)."""
    if isinstance(report, dict):
        for key, value in report.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert math.isfinite(value), f"{where}.{key} = {value}"
                if "speedup" in str(key) or str(key).endswith(TIMES):
                    assert value > 0, f"{where}.{key} = {value}"
            assert_sane(value, f"{where}.{key}")
    elif isinstance(report, list):
        for i, value in enumerate(report):
            if isinstance(value, float):
                assert math.isfinite(value), f"{where}[{i}] = {value}"
            assert_sane(value, f"{where}[{i}]")


def test_grad_modulation_bench_runs(tmp_path):
    out = load("grad_modulation").main(["--repeat", "1", "--json", str(tmp_path / "g.json")])
    assert out["tensors"] == 40 and out["speedup_noise"] > 0 and (tmp_path / "g.json").exists()
    assert out["speedup_noise_channels_last"] > 0 and "fused_noise_tensor_step" in out["cases"]
    assert all(case["median_ms"] > 0 for case in out["cases"].values())
    assert_sane(json.loads((tmp_path / "g.json").read_text()))


def test_scores_bench_runs(tmp_path):
    load("scores").main(["--repeat", "1", "--json", str(tmp_path / "s.json")])
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["rows"] and all(r["naive"]["median_ms"] > 0 and r["native"]["median_ms"] > 0 for r in report["rows"])
    assert_sane(report)


def test_imbalance_bench_runs(tmp_path):
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("sklearn")
    out = load("imbalance").main(["--clips", "24", "--epochs", "1", "--json", str(tmp_path / "i.json")])
    assert set(out["results"]["audio"]) == {"joint", "unimodal audio", "unimodal visual"}
    assert isinstance(out["reproduced"]["audio"], bool) and (tmp_path / "i.json").exists()
    assert_sane(json.loads((tmp_path / "i.json").read_text()))


def test_data_bench_runs(tmp_path):
    pytest.importorskip("nvidia.dali")
    load("data").main(["--clips", "24", "--epochs", "1", "--size", "32", "--batch-size", "4",
                       "--json", str(tmp_path / "d.json")])
    report = json.loads((tmp_path / "d.json").read_text())
    assert set(report["results"]) == {"naive", "dali", "dali_cached", "dali_cached_first"}
    assert all(r["clips_per_s"] > 0 for r in report["results"].values())
    assert report["speedup"] > 0 and report["cached_speedup"] > 0 and report["cached_first_pass_cost"] > -1
    assert_sane(report)


def test_step_bench_runs_and_counts_host_reads(tmp_path):
    pytest.importorskip("nvidia.dali")
    # (a few methods of each kind: a head of their own, a model of their own; every method's step
    # reads nothing on the host in the trainer's and the methods' tests)
    step = load("step")
    out = step.main(["--clips", "48", "--batch-sizes", "8", "--rounds", "1", "--steps", "1", "--epochs", "1",
                     "--epoch-encoders", "small", "--json", str(tmp_path / "s.json"),
                     "--markdown", str(tmp_path / "s.md"), "--precision", "bf16", "--methods", "olm", "boost", "greedy"])
    rows = out["step"]["8"]
    assert set(step.MMFAST_METHODS) == {"joint", "ogm", "ogm_ge", "opm", "olm", "boost", "greedy"}
    assert {f"mmfast/{m}" for m in step.MMFAST_METHODS} | {f"mmfast/joint@{f}" for f in step.OWN_HEADS.values()} <= set(rows)
    # OLM and boost: the overhead against joint training of their own model as well
    assert rows["mmfast/boost"]["same_model_baseline"] == "joint@boost" and "same_model_overhead" in rows["mmfast/olm"]
    assert rows["mmfast/greedy"]["same_model_baseline"] == "joint@sum+mmtm"
    # mmfast's steps read nothing on the host; the research code's way reads per modulated tensor
    assert all(r["host_reads_per_step"] == 0 for k, r in rows.items() if k.startswith("mmfast/"))
    assert rows["naive/joint"]["host_reads_per_step"] == 0
    assert rows["naive/ogm_ge"]["host_reads_per_step"] > rows["naive/ogm"]["host_reads_per_step"] > 0
    assert rows["mmfast/joint"]["overhead"] == 0 and rows["mmfast/ogm_ge"]["speedup_vs_naive"] > 0
    # (the epoch part's code is the same for ResNet-18: the smoke test times the small encoder only)
    assert [e["encoder"] for e in out["epoch"]] == ["small"] and out["epoch"][0]["speedup"] > 0
    # mmfast not in fp32: the epoch part times mmfast in fp32 beside it (bf16's share of the speedup)
    assert out["mmfast_precision"] == "bf16" and all(e["precision"] == "bf16" for e in out["epoch"])
    assert all(e["speedup_fp32"] > 0 and e["mmfast_fp32"]["epoch_s"] > 0 for e in out["epoch"])
    # with the decoded-sample cache: steady state, first epoch, a loader pass, in both precisions
    for e in out["epoch"]:
        assert all(e[side]["epoch_s"] > 0 for side in ("cached", "cached_fp32", "cached_first", "cached_fp32_first"))
        assert e["cached"]["data_only_s"] > 0 and e["cached_speedup_fp32"] > 0 and e["first_epoch_slowdown"] > -1
    text = (tmp_path / "s.md").read_text()
    assert f"{out['machine']['cores']} cores, {out['machine']['vector_isa']}," in text  # (figures name the machine)
    assert "| ogm_ge |" in text and "(vs joint@late)" in text and "| joint@boost |" in text
    assert "mmfast in bf16, naive in fp32" in text
    assert f"| small | 64 | 32 | {out['epoch'][0]['clips']} | " in text and "| bf16 |" in text
    assert_sane(json.loads((tmp_path / "s.json").read_text()))


def test_all_benchmarks_write_one_dated_results_file(tmp_path):
    import datetime

    bench_all = load("all")
    reports = bench_all.main(["--quick", "--only", "grad_modulation", "scores", "--out", str(tmp_path)])
    assert set(reports) == {"grad_modulation", "scores"}
    (markdown,) = tmp_path.glob("*.md")
    assert markdown.name.startswith(datetime.date.today().isoformat() + "-")
    merged = json.loads(markdown.with_suffix(".json").read_text())
    assert set(merged["benchmarks"]) == {"grad_modulation", "scores"} and "machine" in merged
    assert_sane(merged)
    text = markdown.read_text()
    assert "Fused gradient modulation" in text and "| 2 | 64 | 6 |" in text and merged["machine"]["cpu"] in text
    name = bench_all.results_name({"cpu": "Intel(R) Xeon(R) Platinum 8480C @ 2.0GHz", "vector_isa": "avx512",
                                   "gpu": None}, datetime.date(2026, 1, 2))
    assert name == "2026-01-02-intel-xeon-platinum-avx512"


def test_step_bench_refuses_the_epoch_part_without_dali(capsys):
    with pytest.raises(SystemExit):
        load("step").main(["--data-backend", "naive", "--epochs", "1"])
    assert "--data-backend naive needs --epochs 0" in capsys.readouterr().err
