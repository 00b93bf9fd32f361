"""Data loading throughput: the DALI pipeline vs the naive loader, on the embedded dataset.

Both read the same split with the same recipe and the same number of CPU workers (DataLoader
worker processes for the naive loader, DALI CPU threads for DALI), in one run. One warm-up epoch
each (worker start-up, DALI pipeline build), then timed epochs; clips/s is the median.

    python bench/data.py [--root DIR] [--clips N] [--workers W] [--frames T] [--size S] [--json OUT]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from mmfast.data import DataConfig, FrameRecipe, build_loader, generate  # noqa: E402


def epoch_rate(loader) -> float:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["label"])
    return n / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="a dataset in the CREMA-D layout (default: generate the embedded one)")
    parser.add_argument("--clips", type=int, default=480)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames", type=int, default=1, help="frames per clip (CREMA-D recipe: 1)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or generate(Path(tmp) / "cremad", clips=args.clips, seed=0)
        cfg = DataConfig(root=str(root), frames=FrameRecipe(num_frames=args.frames, size=args.size),
                         batch_size=args.batch_size, num_workers=args.workers)
        results = {}
        for backend in ("naive", "dali"):
            loader = build_loader(cfg, "train", backend=backend)
            epoch_rate(loader)  # warm-up
            rates = [epoch_rate(loader) for _ in range(args.epochs)]
            results[backend] = {"clips_per_s": statistics.median(rates), "epochs": rates, "clips": len(loader.clips)}
            print(f"{backend:>6}: {results[backend]['clips_per_s']:8.1f} clips/s  "
                  f"({len(loader.clips)} clips, {args.frames} frames at {args.size}px + 257x188 spectrogram, "
                  f"{args.workers} workers, device {cfg.resolved_device})")
    speedup = results["dali"]["clips_per_s"] / results["naive"]["clips_per_s"]
    print(f"DALI vs naive: {speedup:.2f}x")
    write_json(args.json, {"benchmark": "data", "machine": machine(), "workers": args.workers,
                           "frames": args.frames, "size": args.size, "device": cfg.resolved_device, "results": results,
                           "speedup": speedup})


if __name__ == "__main__":
    main()
