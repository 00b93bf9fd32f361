"""`mmfast diagnose`: is a dataset imbalanced, and which method should be tried first?

It trains the config's model three ways for a short budget (plain `joint`, and each modality
alone with `unimodal`), then measures:

- each encoder's linear probe (frozen features, a fresh linear classifier: the papers' measure)
  inside the joint model and trained alone; the gap, alone minus joint, is what joint training
  cost that modality's encoder;
- the discrepancy ratio of each modality over the joint run's epochs (OGM's rho, as every run
  logs it: `train/ratio/<m>`);
- each modality's Shapley value of the joint model's fused accuracy, overall and per class
  (mmfast/valuation.py);

and writes `report.md` with PNG plots and `report.json` (`dominant`: the favoured modality or
"none", the gaps, the recommendation with its reason).

The rule (mmfast's, stated in docs/training.md; no paper defines one): the data is imbalanced
when some encoder's gap exceeds GAP_THRESHOLD; the dominant modality is then the one with the
highest mean discrepancy ratio over the joint run.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

# mmfast's choice (no published value): a probe gap above 5 points. On the embedded data at 20
# epochs the weak encoder's gap is 0.39 (audio dominant, imbalance 2.5) and both gaps are at most
# 0.011 on the balanced variant; probes of one seed move by about 0.02 between runs.
GAP_THRESHOLD = 0.05
CHANCE_MARGIN = 0.05  # a probe within this of chance (1 / classes) has learned nothing yet


def _run(out: Path, config, overrides: list, echo) -> object:
    """The trainer of one finished run in `out`: trained (or continued where it stopped), then
    with its best checkpoint loaded."""
    from .config import load_config
    from .trainer import Trainer, resume

    if (out / "summary.json").exists():
        trainer = resume(out, read_only=True)
    else:
        trainer = resume(out) if (out / "config.yaml").exists() else Trainer(load_config(config, [*overrides,
                                                                                                  f"out={out}"]))
        trainer.fit()
    trainer.load_best()
    echo(f"  {out.name}: done")
    return trainer


def recommend(dominant: str, gaps: dict, alone: dict, fused: float, untrained=()) -> dict:
    """{"methods": [...], "reason": "..."} for the measured pattern (docs/training.md). The
    methods named are the three that closed most of the weak encoder's gap in mmfast's study on
    the embedded data (docs/demo.md: boost, OPM, OLM; OGM-GE at its default alpha did not),
    ordered by whether the starved encoder is weak alone too."""
    if dominant == "none":
        worst = max(gaps, key=gaps.get)
        reason = (f"no encoder learns markedly less inside the joint model than alone (largest gap {gaps[worst]:+.3f}, "
                  f"{worst}, within {GAP_THRESHOLD}): plain joint training; a balancing method has no imbalance to "
                  f"correct here")
        if untrained:
            reason += (f". But {', '.join(untrained)} learned nothing alone in this budget (its probe is near "
                       f"chance), so starving cannot show yet: diagnose again with more --epochs")
        return {"methods": ["joint"], "reason": reason}
    starved = sorted((m for m in gaps if gaps[m] > GAP_THRESHOLD and m != dominant), key=gaps.get, reverse=True)
    weak = starved[0] if starved else max((m for m in gaps if m != dominant), key=gaps.get)
    reason = (f"{dominant} dominates joint training (the highest discrepancy ratio) and the {weak} encoder learns "
              f"{gaps[weak]:.3f} less inside the joint model than alone")
    if alone[weak] >= alone[dominant] - 0.1:
        methods = ["opm", "boost", "olm"]
        reason += (f"; alone it is nearly as good as {dominant} ({alone[weak]:.3f} against {alone[dominant]:.3f}), so "
                   f"the method that holds the dominant modality back by the measured ratio comes first (OPM drops "
                   f"its features), then those that strengthen the weaker one's own learning (sustained boosting, "
                   f"OLM)")
    else:
        methods = ["boost", "opm", "olm"]
        reason += (f"; alone it is also weaker ({alone[weak]:.3f} against {alone[dominant]:.3f}), so the method that "
                   f"gives it more learning of its own comes first (sustained boosting: adaptive classifier "
                   f"assignment), then OPM, which holds the dominant modality back, and OLM")
    if fused < max(alone.values()):
        best = max(alone, key=alone.get)
        reason += (f". The joint model's fused accuracy ({fused:.3f}) is below the {best} encoder's probe alone "
                   f"({alone[best]:.3f}): joint training loses accuracy here")
    return {"methods": methods, "reason": reason}


def diagnose(config, overrides=(), *, out="runs/diagnose", epochs: int | None = None, echo=print) -> dict:
    """Trains the three kinds of run under `out` for `epochs` each (default: the config's), writes
    report.md, report.json and the plots there, and returns the report. An interrupted diagnosis
    continues with the same arguments; other arguments on the same folder are refused."""
    from .config import load_config

    if epochs is not None and not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1):
        raise ValueError(f"--epochs must be a positive integer, got {epochs!r}")
    out = Path(out)
    overrides = [str(o) for o in overrides]
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in ("method", "out", "epochs") or key.startswith("hparams"):
            raise ValueError(f"mmfast diagnose chooses {key!r} itself (its runs: joint and each modality alone); "
                             f"leave it out of the overrides")
    cfg = load_config(config, overrides)  # (a bad config fails here, before anything is written)
    epochs = epochs or cfg.epochs
    try:  # (and a config the uni-modal runs cannot train: before the joint run has trained)
        load_config(config, [*overrides, "method=unimodal", "hparams.modality=any"])
    except ValueError as err:
        raise ValueError(f"the runs of each modality alone (method=unimodal) cannot train this config: {err}") from None
    request = {"config": str(config), "overrides": overrides, "epochs": epochs}
    marker = out / "diagnose.json"
    if marker.exists():
        if json.loads(marker.read_text()) != request:
            raise ValueError(f"{out} holds a diagnosis of other arguments ({marker}); pick another --out")
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a diagnosis folder; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(request, indent=2) + "\n")
    common = [*overrides, f"epochs={epochs}", "progress=false"]
    joint = _run(out / "joint", config, [*common, "method=joint"], echo)
    modalities = list(joint.steps.modalities)
    alone_runs = {m: _run(out / f"alone_{m}", config, [*common, "method=unimodal", f"hparams.modality={m}"], echo)
                  for m in modalities}
    split = "test" if "test" in joint.loaders else "val"
    joint_probe = joint.linear_probe(test_split=split)
    probes = {"joint": {m: joint_probe[f"probe/acc/{m}"] for m in modalities},
              "alone": {m: run.linear_probe(test_split=split)[f"probe/acc/{m}"] for m, run in alone_runs.items()}}
    gaps = {m: probes["alone"][m] - probes["joint"][m] for m in modalities}
    rows = [json.loads(line) for line in (out / "joint" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ratio = {m: [r[f"train/ratio/{m}"] for r in rows if f"train/ratio/{m}" in r] for m in modalities}
    mean_ratio = {m: statistics.fmean(v) if v else None for m, v in ratio.items()}
    shapley = joint.shapley(split, zeroing="inputs" if joint.model.fused_representation else "features")
    shapley.pop("per_sample")
    fused = joint.evaluate(split)[f"{split}/acc"]
    starved = {m for m in modalities if gaps[m] > GAP_THRESHOLD}
    imbalanced = bool(starved)
    chance = 1.0 / len(joint.classes)
    untrained = [m for m in modalities if probes["alone"][m] < chance + CHANCE_MARGIN]
    measured = {m: v for m, v in mean_ratio.items() if v is not None}
    dominant = "none"
    if imbalanced:  # the highest ratio among the encoders not starved (no ratio logged: the largest Shapley value)
        scores = measured or shapley["values"]
        dominant = max([m for m in scores if m not in starved] or list(scores), key=scores.get)
    report = {"dominant": dominant, "imbalanced": imbalanced, "gap_threshold": GAP_THRESHOLD, "gaps": gaps,
              "probes": probes, "fused_accuracy": fused, "split": split, "mean_ratio": mean_ratio, "ratio": ratio,
              "shapley": shapley, "recommendation": recommend(dominant, gaps, probes["alone"], fused, untrained),
              "untrained_alone": untrained,
              "epochs": epochs, "config": str(config), "overrides": overrides, "dataset": cfg.data.root,
              "runs": {"joint": str(out / "joint"), **{m: str(out / f"alone_{m}") for m in modalities}}}
    for trainer in (joint, *alone_runs.values()):
        trainer.close()
    plots = _plots(out, report, modalities)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report, modalities, plots))
    echo(f"dominant: {dominant}; try: {', '.join(report['recommendation']['methods'])}. Report: {out / 'report.md'}")
    return report


def _plots(out: Path, report: dict, modalities: list) -> list:
    """ratio.png, probes.png, shapley.png in `out` (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    if any(report["ratio"].values()):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for m in modalities:
            ax.plot(range(1, len(report["ratio"][m]) + 1), report["ratio"][m], label=m)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="epoch", ylabel="discrepancy ratio", title="joint training: each modality's ratio")
        ax.legend(fontsize=8)
        made.append(_save(fig, out / "ratio.png", plt))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = range(len(modalities))
    ax.bar([i - 0.2 for i in x], [report["probes"]["joint"][m] for m in modalities], 0.4, label="inside joint")
    ax.bar([i + 0.2 for i in x], [report["probes"]["alone"][m] for m in modalities], 0.4, label="trained alone")
    ax.set(xticks=list(x), xticklabels=modalities, ylabel="linear probe accuracy", title="each encoder's probe")
    ax.legend(fontsize=8)
    made.append(_save(fig, out / "probes.png", plt))
    per_class = report["shapley"]["per_class"]
    classes = list(per_class[modalities[0]])
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(classes) * len(modalities)), 3.2))
    width = 0.8 / len(modalities)
    for k, m in enumerate(modalities):
        ax.bar([i + (k - (len(modalities) - 1) / 2) * width for i in range(len(classes))],
               [per_class[m][c] or 0.0 for c in classes], width, label=m)
    ax.set(xticks=list(range(len(classes))), xticklabels=classes, ylabel="Shapley value",
           title="each modality's share of the fused accuracy, per class")
    ax.legend(fontsize=8)
    made.append(_save(fig, out / "shapley.png", plt))
    return made


def _save(fig, path: Path, plt) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def _markdown(report: dict, modalities: list, plots: list) -> str:
    rec = report["recommendation"]
    verdict = (f"**{report['dominant']} dominates**: joint training starves "
               f"{', '.join(m for m in modalities if report['gaps'][m] > GAP_THRESHOLD)}."
               if report["imbalanced"] else "**No imbalance found**: joint training starves no encoder.")
    lines = [f"# Diagnosis: {report['dataset']}", "",
             f"Config `{report['config']}` {' '.join(report['overrides'])}, {report['epochs']} epochs per run, "
             f"measured on the {report['split']} split.", "", verdict, "",
             f"**Try**: {', '.join(f'`{m}`' for m in rec['methods'])}. {rec['reason']}.", "",
             "## Each encoder inside the joint model and alone", "",
             "| modality | probe inside joint | probe alone | gap (alone - joint) | mean discrepancy ratio | Shapley value |",
             "|---|---|---|---|---|---|"]
    for m in modalities:
        ratio = report["mean_ratio"][m]
        lines.append(f"| {m} | {report['probes']['joint'][m]:.3f} | {report['probes']['alone'][m]:.3f} | "
                     f"{report['gaps'][m]:+.3f} | {'n/a' if ratio is None else f'{ratio:.2f}'} | "
                     f"{report['shapley']['values'][m]:+.3f} |")
    lines += ["", f"The joint model's fused accuracy: {report['fused_accuracy']:.3f}. An encoder is starved when its "
                  f"gap exceeds {report['gap_threshold']}; the dominant modality is then the one with the highest "
                  f"mean discrepancy ratio.", ""]
    lines += [f"![{name}]({name})" for name in plots if name != "shapley.png"]
    lines += ["", "## Shapley values of the fused accuracy", "",
              "| coalition | fused accuracy |", "|---|---|"]
    lines += [f"| {name} | {acc:.3f} |" for name, acc in report["shapley"]["coalitions"].items()]
    classes = list(report["shapley"]["per_class"][modalities[0]])
    lines += ["", "Per class:", "", "| class | " + " | ".join(modalities) + " |", "|---" * (len(modalities) + 1) + "|"]
    for c in classes:
        cells = [report["shapley"]["per_class"][m][c] for m in modalities]
        lines.append(f"| {c} | " + " | ".join("n/a" if v is None else f"{v:+.3f}" for v in cells) + " |")
    if "shapley.png" in plots:
        lines += ["", "![shapley.png](shapley.png)"]
    lines += ["", "## Runs", ""] + [f"- {name}: `{path}`" for name, path in report["runs"].items()]
    return "\n".join(lines) + "\n"
