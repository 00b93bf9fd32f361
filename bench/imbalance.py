"""Does the embedded dataset reproduce modality imbalance? Plain joint training against each
encoder trained alone, through the trainer (`mmfast demo`'s joint and unimodal runs), measured
with linear probes (the papers' uni-modal measure: freeze the encoder, fit a fresh linear
classifier on its features, report its test accuracy). The weak modality's encoder is worse
inside the joint model than alone when the dataset works.

    python bench/imbalance.py [--dominant audio visual] [--seeds 0] [--epochs 30] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from mmfast.demo import run_demo  # noqa: E402

RUNS = ("joint", "unimodal audio", "unimodal visual")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dominant", nargs="+", choices=["audio", "visual"], default=["audio"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--clips", type=int, default=480)
    parser.add_argument("--imbalance", type=float, default=2.5)
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        results = run_demo(out / "runs", out / "data", seeds=args.seeds, dominants=args.dominant, epochs=args.epochs,
                           clips=args.clips, imbalance=args.imbalance, methods=RUNS, progress=False)
    report = {"benchmark": "imbalance", "machine": machine(), "results": results, "reproduced": {}}
    for dominant, rows in results.items():
        weak = "visual" if dominant == "audio" else "audio"
        joint = [r[weak] for r in rows["joint"]]
        alone = [r[weak] for r in rows[f"unimodal {weak}"]]
        report["reproduced"][dominant] = sum(joint) / len(joint) < sum(alone) / len(alone)
        print(f"{dominant} dominant: weak ({weak}) probe in joint {sum(joint) / len(joint):.3f} vs alone "
              f"{sum(alone) / len(alone):.3f}: imbalance {'reproduced' if report['reproduced'][dominant] else 'NOT reproduced'}")
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
