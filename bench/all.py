"""Every benchmark in one run (`make bench`): one JSON with each benchmark's report and one
markdown file with their tables, both under bench/results/ by default.

    python bench/all.py [--out bench/results] [--quick]   # writes bench/results/<date>-<machine>.{md,json}

--quick runs each benchmark at tiny sizes (a smoke run: its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import re
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, machine, write_json  # noqa: E402

import data as data_bench  # noqa: E402
import grad_modulation  # noqa: E402
import imbalance  # noqa: E402
import scores  # noqa: E402
import step  # noqa: E402

QUICK = {"grad_modulation": ["--repeat", "1"], "scores": ["--repeat", "1"],
         "data": ["--clips", "24", "--epochs", "1", "--size", "32", "--batch-size", "4"],
         "imbalance": ["--clips", "24", "--epochs", "1"],
         "step": ["--clips", "48", "--batch-sizes", "8", "--rounds", "1", "--steps", "1", "--epochs", "1",
                  "--resnet-size", "32", "--resnet-clips", "24"]}
BENCHMARKS = {"grad_modulation": grad_modulation.main, "scores": scores.main, "data": data_bench.main,
              "imbalance": imbalance.main, "step": step.main}


def tables(reports: dict) -> str:
    out = [f"# mmfast benchmarks\n\nmachine: {describe(machine())}\n"]
    g = reports.get("grad_modulation")
    if g:
        out += ["## Fused gradient modulation (40 ResNet-18 conv gradients)\n", "| case | median ms |", "|---|---|"]
        out += [f"| {name} | {case['median_ms']:.2f} |" for name, case in g["cases"].items()]
        out += [f"\nspeedup with noise {g['speedup_noise']:.2f}x, channels_last {g['speedup_noise_channels_last']:.2f}x, "
                f"scale only {g['speedup_scale']:.2f}x\n"]
    s = reports.get("scores")
    if s:
        out += ["## Scores, ratios, coefficients (per step)\n", "| M | B | C | naive ms | C++ ms | speedup |",
                "|---|---|---|---|---|---|"]
        out += [f"| {r['M']} | {r['B']} | {r['C']} | {r['naive']['median_ms']:.3f} | {r['native']['median_ms']:.3f} | "
                f"{r['speedup_native']:.0f}x |" for r in s["rows"]]
        out.append("")
    d = reports.get("data")
    if d:
        out += ["## Data loading (training split)\n", "| loader | clips/s |", "|---|---|"]
        out += [f"| {name} | {r['clips_per_s']:.0f} |" for name, r in d["results"].items()]
        out += [f"\nDALI vs naive: {d['speedup']:.2f}x; DALI from the decoded-sample cache vs naive: "
                f"{d['cached_speedup']:.1f}x; the cache's first pass {100 * d['cached_first_pass_cost']:+.0f}% against "
                f"an uncached DALI pass\n"]
    st = reports.get("step")
    if st:
        out += ["## Training step and epoch, mmfast vs the research code's way\n", step.markdown(st)]
    i = reports.get("imbalance")
    if i:
        out += ["## Imbalance reproduced (weak encoder's probe, joint vs alone)\n"]
        out += [f"- {dom} dominant: {'reproduced' if ok else 'not reproduced'}" for dom, ok in i["reproduced"].items()]
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    args = parser.parse_args(argv)
    out = Path(args.out)
    reports = {}
    for name, run in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        path = out / f"{name}.json"
        result = run([*(QUICK[name] if args.quick else []), "--json", str(path)])
        reports[name] = result if isinstance(result, dict) else json.loads(path.read_text())
    stem = results_name(machine())
    write_json(str(out / f"{stem}.json"), {"machine": machine(), "benchmarks": reports})
    (out / f"{stem}.md").write_text(tables(reports))
    print(f"wrote {out / stem}.md")
    return reports


def results_name(info: dict, today: datetime.date | None = None) -> str:
    """A dated results file's stem: <YYYY-MM-DD>-<cpu>-<vector isa>[-<gpu>] (the history of the
    figures is these files, one per run of make bench)."""
    slug = lambda text: re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")  # noqa: E731
    cpu = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu\b|@.*", "", info["cpu"], flags=re.I)
    parts = [(today or datetime.date.today()).isoformat(), "-".join(slug(cpu).split("-")[:3]), slug(info["vector_isa"])]
    if info.get("gpu"):
        parts.append(slug(info["gpu"]))
    return "-".join(p for p in parts if p)


if __name__ == "__main__":
    main()
