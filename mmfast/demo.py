"""``mmfast demo``: the main job. Generates the embedded dataset if absent, trains every method on
it through the one trainer, and prints a table: fused test accuracy, each encoder's linear-probe
accuracy, the dominant modality's mean discrepancy ratio, wall time. With several seeds or both
dominance directions it reports mean and spread over seeds. Finished runs are reused (a
summary.json in their folder), so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

MODALITIES = ("audio", "visual")


def peer_runs(dominant: str) -> list[tuple[str, str, dict, tuple]]:
    """The peers' methods at their defaults (each on its own default head). MSLR has no default
    rates (the paper tunes each modality alone): the demo halves the dominant modality's; ReLearning
    re-initialises every 5 epochs instead of 20 (its 90 epochs' schedule in the demo's 20), LFM's
    weight curve spans the demo's 20 epochs instead of 200, and its learned schedule runs with the
    official settings."""
    runs = [(name, name, {}, ()) for name in ("mmcosine", "mbsd", "cml", "agm", "mmpareto", "pmr", "mla", "reconboost",
                                              "gblending", "amco", "greedy", "umt", "resample")]
    runs.append((f"mslr ({dominant} x0.5)", "mslr", {"lr_scales": {dominant: 0.5}}, ()))
    # (the official schedules scaled to the demo's 20 epochs: ReLearning's every 20 of 90 epochs,
    # LFM's weight curve over 200)
    runs.append(("relearning (every 5)", "relearning", {"interval": 5}, ()))
    runs.append(("lfm (curve over 20)", "lfm", {"curve_epochs": 20}, ()))
    runs.append(("lfm (learned)", "lfm", {"schedule": "learned"}, ()))
    runs.append(("resample (modality)", "resample", {"level": "modality"}, ()))
    return runs


def demo_runs(dominant: str, study: bool = False, peers: bool = False) -> list[tuple[str, str, dict, tuple]]:
    """(label, method, hyper-parameters, config overrides) of the demo's runs: the seed papers'
    methods and the baselines; `peers` (or `study`) adds the peers' methods (peer_runs); `study`
    adds the study's comparisons: the late-heads joint baseline (OLM's architecture without its
    modulation), OLM's tempered rebalancing factors, OPM with the public code's timing and p_exe."""
    runs = [("joint", "joint", {}, ())]
    runs += [(f"unimodal {m}", "unimodal", {"modality": m}, ()) for m in MODALITIES]
    runs += [(name, name, {}, ()) for name in ("ogm", "ogm_ge", "opm", "opm_ogm")]
    runs.append(("moddrop", "moddrop", {"probs": {dominant: 0.3}}, ()))
    # OLM-Conv (late heads on the small encoders) and sustained boosting, ACA every 2 epochs
    # (T = epochs / 10, as the paper's recipes, for the config's 20 epochs).
    runs += [("olm", "olm", {}, ()), ("boost", "boost", {"interval": 2}, ())]
    if peers or study:
        runs += peer_runs(dominant)
    if study:
        # (Greedy's model without its curation: the sum head and MMTM blocks after stages 2-4)
        runs += [("joint (sum, MMTM)", "joint", {}, ("model.fusion=sum", "model.mmtm=[2, 3, 4]"))]
        runs += [("joint (late heads)", "joint", {}, ("model.fusion=late",)),
                 ("olm (normalized λ)", "olm", {"lambda_form": "normalized"}, ()),
                 ("opm (code timing)", "opm", {"timing": "current", "p_exe": 0.7}, ())]
    return runs


def boost_fusions(trainer) -> dict[str, float]:
    """Test accuracy of a trained boost model under each late fusion of its modalities' summed
    logits: omega-weighted, equal, fixed 0.4 / 0.6 (the public code's), and weights fitted on
    the validation split (mmfast.methods.boost.fit_fusion_weights)."""
    import torch

    from .methods.boost import CODE_FUSION_WEIGHTS, fit_fusion_weights

    _, val_uni, val_y = trainer.outputs("val")
    _, test_uni, test_y = trainer.outputs("test")
    fitted = fit_fusion_weights(val_uni, val_y).tolist()

    def acc(weights):
        fused = (torch.tensor(weights, dtype=test_uni.dtype).view(-1, 1, 1) * test_uni).sum(dim=0)
        return float((fused.argmax(dim=1) == test_y).float().mean())

    return {"fused_omega": acc(trainer.model.fusion.omega.float().tolist()), "fused_equal": acc([1.0, 1.0]),
            "fused_fixed": acc(list(CODE_FUSION_WEIGHTS)), "fused_val_fitted": acc(fitted),
            "val_fitted_w_audio": fitted[0]}


def _run_one(run_dir: Path, data_root: Path, method: str, hparams: dict, seed: int, epochs: int | None,
             progress: bool, overrides: tuple = ()) -> dict:
    from .config import load_config
    from .trainer import Trainer, resume

    row_file = run_dir / "demo_row.json"
    if row_file.exists():
        return json.loads(row_file.read_text())
    start = time.perf_counter()
    if (run_dir / "config.yaml").exists():  # (an interrupted demo continues each run where it stopped)
        trainer = resume(run_dir)
    else:
        overrides = [f"method={method}", f"seed={seed}", f"out={run_dir}", f"data.root={data_root}",
                     f"progress={str(progress).lower()}", *overrides]
        overrides += [f"hparams.{k}={json.dumps(v)}" for k, v in hparams.items()]
        if epochs is not None:
            overrides.append(f"epochs={epochs}")
        trainer = Trainer(load_config("embedded", overrides))
    summary = trainer.fit()
    probe = trainer.linear_probe()
    extra = boost_fusions(trainer) if method == "boost" else {}
    epochs_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row = {"fused": summary["test/acc"], **{m: probe[f"probe/acc/{m}"] for m in MODALITIES},
           # (None where no step measured: a method that trains the modalities in turn, MLA)
           **{f"ratio_{m}": statistics.fmean(r[f"train/ratio/{m}"] for r in epochs_rows)
              if all(f"train/ratio/{m}" in r for r in epochs_rows) else None for m in MODALITIES},
           "seconds": time.perf_counter() - start, "best_epoch": summary["best_epoch"], "precision": summary["precision"],
           **{f"drop_{m}": statistics.fmean(r.get(f"train/dropped_step/{m}", 0.0) for r in epochs_rows) for m in MODALITIES},
           **extra}
    row_file.write_text(json.dumps(row, indent=2) + "\n")
    return row


def _cell(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def run_demo(out: str | Path = "runs/demo", data_root: str | Path = "data", *, seeds=(0,), dominants=("audio",),
             epochs: int | None = None, clips: int = 480, imbalance: float = 2.5, methods=None, progress: bool = True,
             study: bool = False, echo=print) -> dict:
    """Runs the demo's methods for every seed and dominance direction; returns {dominant: {label:
    [row per seed]}}. `methods`: None (the seed papers' methods and the baselines), "all" (and
    the peers' methods), or a list of row labels or method names; `study`: every row, with the
    study's comparison rows."""
    if methods is not None and methods != "all":
        known = {label for d in dominants for label, method, _, _ in demo_runs(d, True)} | \
                {method for d in dominants for _, method, _, _ in demo_runs(d, True)}
        unknown = sorted(set(methods) - known)
        if unknown:
            raise ValueError(f"mmfast demo --methods: unknown {unknown}; the rows are {sorted(known)} (or: all)")
    from .data import generate

    out, data_root = Path(out), Path(data_root)
    started = time.perf_counter()
    results: dict = {}
    for dominant in dominants:
        root = data_root / f"embedded_{dominant}"
        if not (root / "classes.txt").exists():
            echo(f"generating the embedded dataset ({dominant} dominant) in {root}")
            generate(root, clips=clips, dominant=dominant, imbalance=imbalance, seed=0)
        for label, method, hparams, overrides in demo_runs(dominant, study, peers=methods is not None):
            if methods not in (None, "all") and label not in methods and method not in methods:
                continue
            for seed in seeds:
                folder = "".join(c if c.isalnum() or c in "-_" else "_" for c in label.replace("λ", "lambda"))
                run_dir = out / f"{dominant}_dominant" / f"seed{seed}" / folder
                row = _run_one(run_dir, root, method, hparams, seed, epochs, progress, overrides)
                results.setdefault(dominant, {}).setdefault(label, []).append(row)
                echo(f"{dominant} dominant, seed {seed}, {label:<16} fused {row['fused']:.3f}  probes audio "
                     f"{row['audio']:.3f} visual {row['visual']:.3f}  ({row['seconds']:.0f} s)")
    table = format_table(results, seeds) + boost_table(results, seeds)
    echo(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"seeds": list(seeds), "results": results}, indent=2) + "\n")
    (out / "demo.md").write_text(table + "\n")
    echo(f"total {time.perf_counter() - started:.0f} s; tables in {out / 'demo.md'}, runs and plots under {out}")
    return results


def boost_table(results: dict, seeds) -> str:
    """The boost rows' test accuracy under each late fusion (boost_fusions), where present."""
    lines = []
    for dominant, rows in results.items():
        runs = [r for r in rows.get("boost", []) if "fused_equal" in r]
        if not runs:
            continue
        lines += [f"\nboost's late fusion, {dominant} dominant, seeds {', '.join(map(str, seeds))}: test accuracy",
                  "| omega-weighted | equal | fixed 0.4 / 0.6 | fitted on val |", "|---|---|---|---|",
                  "| " + " | ".join(_cell([r[k] for r in runs]) for k in ("fused_omega", "fused_equal", "fused_fixed",
                                                                        "fused_val_fitted")) + " |"]
    return "\n".join(lines)


def format_table(results: dict, seeds) -> str:
    lines = []
    for dominant, rows in results.items():
        weak = "visual" if dominant == "audio" else "audio"
        # (precision=auto trains in bf16 on machines with bf16 units: the table says which)
        precision = "/".join(sorted({r.get("precision", "fp32") for runs in rows.values() for r in runs}))
        lines += [f"\n{dominant} dominant (weak: {weak}), seeds {', '.join(map(str, seeds))}, {precision}: test "
                  f"accuracy; probes are linear classifiers on each frozen encoder",
                  f"| method | fused | {weak} probe (weak) | {dominant} probe | mean rho {dominant} | wall time |",
                  "|---|---|---|---|---|---|"]
        for label, runs in rows.items():
            get = lambda key: [r[key] for r in runs]  # noqa: E731
            fused = "n/a" if label.startswith("unimodal") else _cell(get("fused"))
            ratio = get(f"ratio_{dominant}")
            ratio = "n/a" if None in ratio else _cell(ratio, 2)
            lines.append(f"| {label} | {fused} | {_cell(get(weak))} | {_cell(get(dominant))} | "
                         f"{ratio} | {statistics.fmean(get('seconds')):.0f} s |")
    return "\n".join(lines)
