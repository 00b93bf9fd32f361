"""Data loading throughput: the DALI pipeline (without and with the decoded-sample cache) vs the
naive loader, on the embedded dataset.

All read the same split with the same recipe and the same number of CPU workers (DataLoader
worker processes for the naive loader, DALI CPU threads for DALI), in one run. One warm-up epoch
each (worker start-up, DALI pipeline build; the cached loader's fills its cache), then timed
epochs; clips/s is the median. The DALI sides run as in mmfast's CPU training, with freed
memory kept for reuse (mmfast.cpu_memory; set after the naive side). The cached loader's first pass (an empty cache: decoding every
frame of each clip, writing the entries) is timed apart, on a fresh cache each time.

    python bench/data.py [--root DIR] [--clips N] [--workers W] [--frames T] [--size S] [--json OUT]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from mmfast.cpu_memory import retain_freed_memory  # noqa: E402
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
        results, first = {}, []
        sides = {"naive": ("naive", cfg), "dali": ("dali", cfg),
                 "dali_cached": ("dali", replace(cfg, cache=str(Path(tmp) / "cache")))}
        for side, (backend, side_cfg) in sides.items():
            if backend == "dali":  # (after the naive side, which keeps glibc's defaults as the research code does)
                retain_freed_memory()  # as mmfast's trainer does in a CPU run (mmfast/cpu_memory.py)
            loader = build_loader(side_cfg, "train", backend=backend)
            epoch_rate(loader)  # warm-up (the cached side: the pass that fills its cache)
            rates = [epoch_rate(loader) for _ in range(args.epochs)]
            results[side] = {"clips_per_s": statistics.median(rates), "epochs": rates, "clips": len(loader.clips)}
            print(f"{side:>11}: {results[side]['clips_per_s']:8.1f} clips/s  "
                  f"({len(loader.clips)} clips, {args.frames} frames at {args.size}px + 257x188 spectrogram, "
                  f"{args.workers} workers, device {cfg.resolved_device})")
            del loader
        for r in range(args.epochs):  # the cached loader's first pass: an empty cache each time
            loader = build_loader(replace(cfg, cache=str(Path(tmp) / f"cache_first{r}")), "train", backend="dali")
            first.append(epoch_rate(loader))
            del loader
        results["dali_cached_first"] = {"clips_per_s": statistics.median(first), "epochs": first,
                                        "clips": results["dali"]["clips"]}
        print(f"cached, first pass: {results['dali_cached_first']['clips_per_s']:8.1f} clips/s (decoding and writing)")
    speedup = results["dali"]["clips_per_s"] / results["naive"]["clips_per_s"]
    cached = results["dali_cached"]["clips_per_s"] / results["naive"]["clips_per_s"]
    first_cost = results["dali"]["clips_per_s"] / results["dali_cached_first"]["clips_per_s"] - 1
    print(f"DALI vs naive: {speedup:.2f}x; DALI from the cache vs naive: {cached:.1f}x; the cache's first pass "
          f"{100 * first_cost:+.0f}% against an uncached DALI pass")
    write_json(args.json, {"benchmark": "data", "machine": machine(), "workers": args.workers,
                           "frames": args.frames, "size": args.size, "device": cfg.resolved_device, "results": results,
                           "speedup": speedup, "cached_speedup": cached, "cached_first_pass_cost": first_cost})


if __name__ == "__main__":
    main()
