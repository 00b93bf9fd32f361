"""End-to-end speed against the research code's way (bench/naive), side by side in one run.

1. Training-step throughput (samples/s) of every method through mmfast's trainer step, and its
   balancing overhead over plain joint training, overhead = t_method / t_joint - 1; the same for
   the naive baseline's methods (joint, ogm, ogm_ge, opm) against naive joint. Same model (the
   embedded config's small encoders), same batch (one decoded batch, reused), fp32; each
   configuration timed `--steps` steps at a time; per round joint, method, joint, method, ...,
   each method against the mean of the two joint timings beside it (robust to a machine whose
   speed drifts); medians over `--rounds` rounds. Host reads per step (Tensor.item / tolist / __bool__
   / __float__ / __int__ / numpy calls) counted over one step of each.
2. End-to-end epoch time including data loading: the naive way (the naive loader: PIL and
   librosa in DataLoader workers; NaiveStep) against mmfast (DALI, the trainer's step) with
   OGM-GE, on the small encoder (data dominates) and on ResNet-18 (compute dominates); median of
   `--epochs` epochs after a warm-up epoch, the two sides alternating.
3. On a GPU only: every method's step under torch.cuda.set_sync_debug_mode("error"), and the
   balancing ops of a step captured in a CUDA graph (cuda_checks).

    python bench/step.py [--batch-sizes 16 64] [--rounds 5] [--steps 5] [--epochs 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from naive import NaiveStep, naive_epoch  # noqa: E402

from mmfast.config import load_config  # noqa: E402
from mmfast.data import generate  # noqa: E402
from mmfast.trainer import Trainer  # noqa: E402

MMFAST_METHODS = {"joint": {}, "ogm": {}, "ogm_ge": {}, "ogm_star": {}, "opm": {}, "moddrop": {"probs": {"audio": 0.3}},
                  "opm_ogm": {}, "olm": {}, "boost": {}, "unimodal": {"modality": "visual"}}
NAIVE_METHODS = ("joint", "ogm", "ogm_ge", "opm")
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


@contextlib.contextmanager
def count_host_reads():
    """Counts calls of the Tensor methods that read a value on the host (restored on exit)."""
    counts = {"total": 0}
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counter(name, original):
        def counted(self, *args, **kwargs):
            counts["total"] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, counter(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def make_trainer(root, out, method, batch_size, hparams=None, *overrides):
    hp = [f"hparams.{k}={v!r}".replace("'", "") for k, v in (hparams or {}).items()]
    cfg = load_config("embedded", [f"data.root={root}", f"out={out}", f"method={method}", f"data.batch_size={batch_size}",
                                   "progress=false", "epochs=1000", *hp, *overrides])
    trainer = Trainer(cfg)
    trainer.prepare()
    trainer.model.train()
    trainer.balancer.start_epoch(0)
    return trainer


def naive_for(trainer, method, seed=0):
    """NaiveStep on a copy of a concat-fusion trainer's model with the same optimizer settings."""
    model = copy.deepcopy(trainer.model)
    o = trainer.cfg.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    gen = torch.Generator(device=trainer.device).manual_seed(seed)
    model.train()
    return NaiveStep(model, opt, method, generator=gen)


def step_benchmark(root, tmp, batch_sizes, rounds, steps):
    results = {}
    for B in batch_sizes:
        runners = {}
        joint = make_trainer(root, tmp / f"joint{B}", "joint", B)
        batch = next(iter(joint.loaders["train"].batches()))
        assert len(batch["label"]) == B, f"the dataset's first batch has {len(batch['label'])} clips, not {B}"
        device_batch = {k: v.to(joint.device) for k, v in batch.items()}
        for method, hp in MMFAST_METHODS.items():
            trainer = joint if method == "joint" else make_trainer(root, tmp / f"{method}{B}", method, B, hp)
            runners[("mmfast", method)] = lambda t=trainer: t.train_step(batch)
        for method in NAIVE_METHODS:
            naive = naive_for(joint, method)
            runners[("naive", method)] = lambda n=naive: n(device_batch)
        for run in runners.values():  # warm-up (first-call costs, allocator)
            run()
            run()
        reads = {}
        for key, run in runners.items():
            with count_host_reads() as counts:
                run()
            reads[key] = counts["total"]
        def timed(run):
            start = time.perf_counter()
            for _ in range(steps):
                run()
            return (time.perf_counter() - start) / steps

        # Interleaved: per round and side, joint, method 1, joint, method 2, ..., joint. Each
        # method's overhead in a round is against the mean of the joint runs beside it, so a
        # machine whose speed drifts (shared cores, clocks) moves both alike; median of rounds.
        samples = {key: [] for key in runners}
        ratios = {key: [] for key in runners}
        for _ in range(rounds):
            for side in ("mmfast", "naive"):
                methods = [m for s, m in runners if s == side and m != "joint"]
                before = timed(runners[(side, "joint")])
                samples[(side, "joint")].append(before)
                for method in methods:
                    t = timed(runners[(side, method)])
                    after = timed(runners[(side, "joint")])
                    samples[(side, method)].append(t)
                    samples[(side, "joint")].append(after)
                    ratios[(side, method)].append(t / ((before + after) / 2))
                    before = after
        rows = {}
        for (side, method), times in samples.items():
            t = statistics.median(times)
            overhead = statistics.median(ratios[(side, method)]) - 1 if method != "joint" else 0.0
            rows[f"{side}/{method}"] = {"side": side, "method": method, "step_ms": t * 1e3,
                                        "samples_per_s": B / t, "overhead": overhead,
                                        "host_reads_per_step": reads[(side, method)], "samples_ms": [x * 1e3 for x in times]}
        for method in NAIVE_METHODS:
            rows[f"mmfast/{method}"]["speedup_vs_naive"] = rows[f"naive/{method}"]["step_ms"] / rows[f"mmfast/{method}"]["step_ms"]
        results[str(B)] = rows
        for key, r in rows.items():
            extra = f"  {r['speedup_vs_naive']:.2f}x vs naive" if "speedup_vs_naive" in r else ""
            print(f"B={B:<3} {key:<16} {r['step_ms']:8.2f} ms  {r['samples_per_s']:8.1f} samples/s  overhead "
                  f"{100 * r['overhead']:+6.1f}%  host reads {r['host_reads_per_step']:3d}{extra}")
    return results


def epoch_benchmark(root, tmp, encoder, size, batch_size, epochs, method="ogm_ge"):
    """Seconds per training epoch, data loading included: naive loader + NaiveStep vs DALI + mmfast."""
    common = [f"model.encoder={encoder}", f"data.size={size}"]
    mm = make_trainer(root, tmp / f"epoch_mm_{encoder}", method, batch_size, None, *common)
    naive_cfg = load_config("embedded", [f"data.root={root}", f"out={tmp / f'epoch_nv_{encoder}'}", f"method={method}",
                                         f"data.batch_size={batch_size}", "progress=false", "data.backend=naive",
                                         *common])
    from mmfast.data import build_loader
    from mmfast.trainer import data_config

    naive_loader = build_loader(data_config(naive_cfg, mm.device), "train", "naive")
    naive = naive_for(mm, method)

    def mmfast_epoch():
        start = time.perf_counter()
        mm.batch_in_epoch = 0
        mm.train_epoch()
        mm.epoch += 1
        return time.perf_counter() - start

    def naive_run():
        start = time.perf_counter()
        naive_epoch(naive, naive_loader, mm.device)
        return time.perf_counter() - start

    mmfast_epoch(), naive_run()  # warm-up: workers, pipelines
    times = {"naive": [], "mmfast": []}
    for _ in range(epochs):
        times["naive"].append(naive_run())
        times["mmfast"].append(mmfast_epoch())
    clips = len(naive_loader.clips)
    out = {side: {"epoch_s": statistics.median(t), "clips_per_s": clips / statistics.median(t), "epochs_s": t}
           for side, t in times.items()}
    out["speedup"] = out["naive"]["epoch_s"] / out["mmfast"]["epoch_s"]
    out.update(encoder=encoder, size=size, batch_size=batch_size, clips=clips, method=method)
    print(f"epoch {encoder} {size}px B={batch_size} ({clips} clips, {method}): naive {out['naive']['epoch_s']:.2f} s, "
          f"mmfast {out['mmfast']['epoch_s']:.2f} s: {out['speedup']:.2f}x")
    return out


def cuda_checks(root, tmp, batch_size, steps=5):
    """On a GPU: (1) every method's trainer step under torch.cuda.set_sync_debug_mode("error")
    (a host synchronisation raises); (2) the balancing ops of an OGM-GE step (balance_stats,
    then grad_modulate_ with the device step counter) captured in a CUDA graph and replayed,
    against the same ops launched eagerly."""
    from mmfast.ops import balance_stats, grad_modulate_
    from mmfast.methods import select_encoder_params

    out = {"sync_free": {}}
    for method, hp in MMFAST_METHODS.items():
        trainer = make_trainer(root, tmp / f"cuda_{method}", method, batch_size, hp, "device=cuda")
        batch = {k: v.cuda() for k, v in next(iter(trainer.loaders["train"].batches())).items()}
        trainer.train_step(batch)  # (first calls: allocations, Triton compilation)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                trainer.train_step(batch)
            out["sync_free"][method] = True
        except RuntimeError as err:
            out["sync_free"][method] = f"synchronised: {err}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # CUDA graph of the balancing ops on an OGM-GE trainer's real gradients
    trainer = make_trainer(root, tmp / "cuda_graph", "ogm_ge", batch_size, None, "device=cuda")
    batch = {k: v.cuda() for k, v in next(iter(trainer.loaders["train"].batches())).items()}
    inputs, labels = trainer._inputs(batch)
    fused, unimodal, _ = trainer._forward(inputs)
    torch.nn.functional.cross_entropy(fused, labels).backward()
    params, index = select_encoder_params(dict(trainer.model.encoders.items()), "conv")
    grads = [p.grad for p in params]
    logits = unimodal.detach().float()
    step = torch.zeros((), dtype=torch.int64, device="cuda")

    def balancing():
        st = balance_stats(logits, labels)
        grad_modulate_(grads, st.coeffs, index, noise=True, seed=0, step=step, increment_step=True)

    for _ in range(3):
        balancing()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        balancing()
    from common import time_fn

    dev = torch.device("cuda")
    out["balancing_eager"] = time_fn(balancing, dev)
    out["balancing_graph"] = time_fn(graph.replay, dev)
    out["graph_speedup"] = out["balancing_eager"]["median_ms"] / out["balancing_graph"]["median_ms"]
    print(f"CUDA: sync-free steps {out['sync_free']}; balancing ops eager "
          f"{out['balancing_eager']['median_ms']:.3f} ms, CUDA graph {out['balancing_graph']['median_ms']:.3f} ms")
    return out


def markdown(report) -> str:
    lines = [f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
             f"{report['machine']['torch']}, GPU {report['machine']['gpu']}", ""]
    for B, rows in report["step"].items():
        lines += [f"training step, batch {B} (median of {report['rounds']} rounds of {report['steps']} steps)", "",
                  "| method | mmfast ms | samples/s | overhead | host reads | naive ms | overhead | host reads | speedup |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in MMFAST_METHODS:
            m = rows[f"mmfast/{method}"]
            n = rows.get(f"naive/{method}")
            naive_cells = (f"{n['step_ms']:.1f} | {100 * n['overhead']:+.1f}% | {n['host_reads_per_step']} | "
                           f"{m['speedup_vs_naive']:.2f}x" if n else "| | |")
            lines.append(f"| {method} | {m['step_ms']:.1f} | {m['samples_per_s']:.0f} | {100 * m['overhead']:+.1f}% | "
                         f"{m['host_reads_per_step']} | {naive_cells} |")
        lines.append("")
    if report.get("cuda"):
        c = report["cuda"]
        lines += [f"CUDA: steps free of host synchronisation: {c['sync_free']}; balancing ops of an OGM-GE step "
                  f"eager {c['balancing_eager']['median_ms']:.3f} ms, replayed CUDA graph "
                  f"{c['balancing_graph']['median_ms']:.3f} ms ({c['graph_speedup']:.2f}x)", ""]
    if report.get("epoch"):
        lines += ["epoch including data loading", "", "| encoder | px | batch | clips | naive s | mmfast s | speedup |",
                  "|---|---|---|---|---|---|---|"]
        for e in report["epoch"]:
            lines.append(f"| {e['encoder']} | {e['size']} | {e['batch_size']} | {e['clips']} | {e['naive']['epoch_s']:.2f} | "
                         f"{e['mmfast']['epoch_s']:.2f} | {e['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per side (0: skip the epoch part)")
    parser.add_argument("--clips", type=int, default=480, help="clips of the generated embedded dataset")
    parser.add_argument("--resnet-size", type=int, default=112, help="frame size of the ResNet-18 epoch")
    parser.add_argument("--resnet-clips", type=int, default=64, help="clips of the ResNet-18 epoch's dataset")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--markdown", help="write the tables to this markdown file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = generate(tmp / "cremad", clips=args.clips, seed=0)
        report = {"benchmark": "step", "machine": machine(), "rounds": args.rounds, "steps": args.steps,
                  "step": step_benchmark(root, tmp, args.batch_sizes, args.rounds, args.steps), "epoch": []}
        if args.epochs:
            report["epoch"].append(epoch_benchmark(root, tmp, "small", 64, 32, args.epochs))
            # (ResNet-18 on 2 CPU cores takes about 0.5 s a clip: a smaller dataset of its own)
            small_root = generate(tmp / "cremad_resnet", clips=args.resnet_clips, seed=0)
            report["epoch"].append(epoch_benchmark(small_root, tmp, "resnet18", args.resnet_size, 16, args.epochs))
        if torch.cuda.is_available():
            report["cuda"] = cuda_checks(root, tmp, args.batch_sizes[0])
    write_json(args.json, report)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(report))
        print(f"wrote {args.markdown}")
    return report


if __name__ == "__main__":
    main()
