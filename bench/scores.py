"""Per-step modality discrepancy measurement: the research code's loop vs mmfast.

For every (M, B, C) in the grid, one run times side by side:
  naive       the public research code's way: a Python loop over samples, each taking the softmax
              of the batch and picking its true-class probability; ratios and coefficients with
              Python control flow on tensors (host synchronisations) and .item() per coefficient;
  native      mmfast.ops.balance_stats on CPU tensors: the extension's C++ kernels (the default);
  torch       mmfast.ops.balance_stats(backend="torch"): the vectorised PyTorch path;
  triton      mmfast.ops.balance_stats on CUDA tensors (only where a GPU is present), against the
              naive loop on the same CUDA tensors.

    python bench/scores.py [--repeat N] [--json OUT]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, time_fn, write_json  # noqa: E402

from mmfast.ops import balance_stats  # noqa: E402

ALPHA = 0.8


def naive_balance(logits, labels):
    """M-modality generalisation of the OGM-GE reference loop (ratio, reference form). As in the
    public code, the softmax of the whole batch is taken inside the per-sample comprehension:
    score = sum([softmax(out)[i][label[i]] for i in range(out.size(0))])."""
    M = logits.shape[0]
    scores = []
    for m in range(M):
        out = logits[m]
        scores.append(sum([F.softmax(out, dim=1)[i][labels[i]] for i in range(out.size(0))]))
    coeffs = []
    for m in range(M):
        ratio = sum(scores[m] / scores[j] for j in range(M) if j != m) / (M - 1)
        if ratio > 1:  # bool() of a tensor: a host synchronisation
            coeffs.append((1 - torch.tanh(ALPHA * F.relu(ratio))).item())
        else:
            coeffs.append(1.0)
    return coeffs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'M':>2}{'B':>5}{'C':>5}{'naive ms':>10}{'native ms':>11}{'speedup':>9}{'torch ms':>10}{'speedup':>9}"
          + (f"{'triton ms':>11}{'vs naive':>10}" if gpu else ""))
    for M in (2, 3):
        for B in (64, 256):
            for C in (6, 31, 309):
                logits = 3 * torch.randn(M, B, C, generator=gen)
                labels = torch.randint(0, C, (B,), generator=gen)
                cpu = torch.device("cpu")
                naive = time_fn(lambda: naive_balance(logits, labels), cpu, repeat=args.repeat)
                native = time_fn(lambda: balance_stats(logits, labels, alpha=ALPHA, form="reference"),
                                 cpu, repeat=args.repeat)
                vec = time_fn(lambda: balance_stats(logits, labels, alpha=ALPHA, form="reference", backend="torch"),
                              cpu, repeat=args.repeat)
                row = {"M": M, "B": B, "C": C, "naive": naive, "native": native, "torch": vec,
                       "speedup_native": naive["median_ms"] / native["median_ms"],
                       "speedup_torch": naive["median_ms"] / vec["median_ms"]}
                line = (f"{M:>2}{B:>5}{C:>5}{naive['median_ms']:>10.3f}{native['median_ms']:>11.3f}"
                        f"{row['speedup_native']:>8.1f}x{vec['median_ms']:>10.3f}{row['speedup_torch']:>8.1f}x")
                if gpu:
                    lg, lb = logits.cuda(), labels.cuda()
                    naive_gpu = time_fn(lambda: naive_balance(lg, lb), torch.device("cuda"), repeat=args.repeat)
                    tri = time_fn(lambda: balance_stats(lg, lb, alpha=ALPHA, form="reference"), torch.device("cuda"),
                                  repeat=args.repeat)
                    row.update(naive_cuda=naive_gpu, triton=tri,
                               speedup_triton=naive_gpu["median_ms"] / tri["median_ms"])
                    line += f"{tri['median_ms']:>11.3f}{row['speedup_triton']:>9.1f}x"
                print(line)
                rows.append(row)
    summary = {}
    for path in ("native", "torch"):
        at64 = [r[f"speedup_{path}"] for r in rows if r["B"] == 64]
        summary[f"min_speedup_{path}_B64"] = min(at64)
        summary[f"geomean_speedup_{path}"] = math.exp(sum(math.log(r[f"speedup_{path}"]) for r in rows) / len(rows))
        print(f"{path} vs naive: min {summary[f'min_speedup_{path}_B64']:.1f}x at B=64, "
              f"geometric mean {summary[f'geomean_speedup_{path}']:.1f}x over the grid")
    write_json(args.json, {"benchmark": "scores", "machine": machine(), "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
