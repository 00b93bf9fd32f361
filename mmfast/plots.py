"""PNG plots of a run's per-modality curves (matplotlib, optional: without it, no plots)."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = (("val/acc", "validation accuracy (uni-modal estimates and fused)"),
          ("train/ratio", "discrepancy ratio rho per modality"),
          ("train/coeff", "OGM coefficient k per modality"),
          ("train/drop_prob", "drop probability q per modality"))


def plot_run(run_dir: str | Path) -> Path | None:
    """run_dir/curves.png from metrics.jsonl; None when matplotlib is missing or nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    panels = [(prefix, title, sorted({k for r in rows for k in r if k == prefix or k.startswith(prefix + "/")}))
              for prefix, title in PANELS]
    panels = [p for p in panels if p[2]]
    if not rows or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (prefix, title, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), label=key[len(prefix) + 1:] or "fused")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
