"""The `mmfast` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _synth(args) -> int:
    from mmfast.data.synth import SynthSpec, generate

    spec = SynthSpec(clips=args.clips, classes=args.classes, dominant=args.dominant, imbalance=args.imbalance,
                     seed=args.seed, jpeg_frames=args.jpeg_frames)
    try:
        out = generate(args.out, spec)
    except (ValueError, FileExistsError) as exc:
        print(f"mmfast data synth: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {spec.clips} clips ({spec.classes} classes, {spec.dominant} dominant, imbalance "
          f"{spec.imbalance}) in the CREMA-D layout to {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmfast", description="Fast balanced multimodal training.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print how the native extension was built (JSON)")
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the embedded imbalanced audio-visual dataset (CREMA-D layout)")
    synth.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    synth.add_argument("--clips", type=int, default=480)
    synth.add_argument("--classes", type=int, default=6)
    synth.add_argument("--dominant", choices=["audio", "visual"], default="audio")
    synth.add_argument("--imbalance", type=float, default=2.5,
                       help="how much weaker the other modality's class signal is (>= 1)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--jpeg-frames", action="store_true", help="also write 1-fps JPEG frame folders")
    args = parser.parse_args(argv)
    if args.command == "info":
        import mmfast

        print(json.dumps(mmfast.build_info(), indent=2, sort_keys=True))
        return 0
    if args.command == "data" and args.data_command == "synth":
        return _synth(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
