"""`mmfast demo` end to end on a tiny embedded dataset (one epoch per method): every method runs
through the trainer, the table and files are written, and a second call reuses finished runs."""
import json

import pytest

from mmfast.demo import demo_runs, run_demo
from mmfast.trainer import resolve_device, resolve_precision

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")


def test_demo_trains_every_method_and_writes_the_table(tmp_path):
    printed = []
    results = run_demo(tmp_path / "runs", tmp_path / "data", epochs=1, clips=30, progress=False, echo=printed.append)
    labels = [label for label, *_ in demo_runs("audio")]
    assert list(results["audio"]) == labels
    assert {"joint", "unimodal audio", "unimodal visual", "ogm", "ogm_ge", "opm", "opm_ogm", "moddrop", "olm",
            "boost"} == set(labels)
    for label, rows in results["audio"].items():
        row = rows[0]
        assert 0 <= row["fused"] <= 1 and 0 <= row["audio"] <= 1 and 0 <= row["visual"] <= 1, label
        assert row["ratio_audio"] > 0
    table = (tmp_path / "runs" / "demo.md").read_text()
    assert "| ogm_ge |" in table and "visual probe (weak)" in table
    precision = resolve_precision("auto", resolve_device("auto"))  # the embedded config's precision=auto
    assert {rows[0]["precision"] for rows in results["audio"].values()} == {precision}
    assert f"seeds 0, {precision}: test accuracy" in table
    assert json.loads((tmp_path / "runs" / "demo.json").read_text())["results"] == results
    again = run_demo(tmp_path / "runs", tmp_path / "data", epochs=1, clips=30, progress=False, echo=printed.append)
    assert again == results  # finished runs are reused, not trained again
    boost = results["audio"]["boost"][0]
    for key in ("fused_omega", "fused_equal", "fused_fixed", "fused_val_fitted"):
        assert 0 <= boost[key] <= 1, key
    assert "boost's late fusion, audio dominant" in table
    # (its own fusion, fitted on the validation split of its best epoch: the trainer's test accuracy,
    # to one clip: the trainer mixes the logits in its precision, bf16 on some machines)
    test_clips = json.loads((tmp_path / "runs" / "audio_dominant" / "seed0" / "boost" / "summary.json").read_text())[
        "test/samples"]
    assert boost["fused_val_fitted"] == pytest.approx(boost["fused"], abs=1.01 / test_clips)
    assert results["audio"]["joint"][0]["drop_visual"] == 0 and 0 <= results["audio"]["opm"][0]["drop_audio"] <= 1


def test_the_study_adds_its_comparison_rows():
    labels = [label for label, *_ in demo_runs("audio", study=True)]
    assert labels[-3:] == ["joint (late heads)", "olm (normalized λ)", "opm (code timing)"]
    assert dict((label, over) for label, _, _, over in demo_runs("visual", study=True))["joint (late heads)"] == (
        "model.fusion=late",)


def test_the_peers_methods_run_with_methods_all_and_in_the_study(tmp_path):
    peers = ["mmcosine", "mbsd", "cml", "agm", "mmpareto", "pmr", "mla", "reconboost", "gblending", "amco", "greedy",
             "umt", "resample", "mslr (audio x0.5)",
             "relearning (every 5)", "lfm (curve over 20)", "lfm (learned)", "resample (modality)"]
    assert [label for label, *_ in demo_runs("audio", peers=True)][-len(peers):] == peers
    assert set(peers) <= {label for label, *_ in demo_runs("audio", study=True)}
    assert not set(peers) & {label for label, *_ in demo_runs("audio")}  # (the default demo: the seed papers' methods)
    printed = []
    results = run_demo(tmp_path / "runs", tmp_path / "data", epochs=1, clips=30, progress=False, echo=printed.append,
                       methods=["joint", *(p.split()[0] for p in peers)])
    assert list(results["audio"]) == ["joint", *peers]
    for label, rows in results["audio"].items():
        assert 0 <= rows[0]["fused"] <= 1 and 0 <= rows[0]["visual"] <= 1, label
    table = (tmp_path / "runs" / "demo.md").read_text()
    assert "| mslr (audio x0.5) |" in table and "| agm |" in table
    with pytest.raises(ValueError, match=r"unknown \['agn'\]"):
        run_demo(tmp_path / "runs", tmp_path / "data", epochs=1, clips=30, progress=False, methods=["agn"])
