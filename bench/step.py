"""End-to-end speed against the research code's way (bench/naive), side by side in one run.

1. Training-step throughput (samples/s) of every method through mmfast's trainer step, and its
   balancing overhead over plain joint training, overhead = t_method / t_joint - 1; the same for
   the naive baseline's methods (joint, ogm, ogm_ge, opm) against naive joint. Same model (the
   embedded config's small encoders), same batch (one decoded batch, reused); the naive side in
   fp32, mmfast in the config's precision=auto (bf16 where the machine computes in bf16
   natively, else fp32; --precision to choose). Timing: one
   step at a time, joint and the method alternating (j m j m ... j), each method step against
   the mean of the two joint steps beside it (a machine whose speed drifts moves both alike);
   `--rounds` rounds of `--steps` pairs per comparison, the comparisons' rounds interleaved;
   medians. OLM and boost train a model with heads of their own (late heads; boosted
   classifiers): their rows also give the overhead against joint training of that same model
   (rows joint@late, joint@boost), the cost of the balancing itself. Host reads per step
   (mmfast.diagnostics.count_host_reads) counted over one step of each.
2. End-to-end epoch time including data loading: the naive way (the naive loader: PIL and
   librosa in DataLoader workers; NaiveStep; in a process of its own, which keeps glibc's
   default malloc behaviour, as the research code's does) against mmfast (DALI, the trainer's step) with
   OGM-GE, on the small encoder and on ResNet-18 (compute dominates); median of `--epochs`
   epochs after a warm-up epoch, the two sides alternating; and a pass of each loader alone
   (decoding only), which says how much of each epoch is data. Where mmfast's precision is not
   fp32, mmfast in fp32 runs alongside, which separates bf16's share of the speedup.
3. On a GPU only: every method's step under torch.cuda.set_sync_debug_mode("error"), and the
   balancing ops of a step captured in a CUDA graph (cuda_checks).

    python bench/step.py [--batch-sizes 16 64] [--rounds 4] [--steps 6] [--epochs 2] [--precision auto]
                         [--json OUT]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe, machine, write_json  # noqa: E402
from naive import NaiveStep, naive_epoch  # noqa: E402

from mmfast.config import load_config  # noqa: E402
from mmfast.data import generate  # noqa: E402
from mmfast.diagnostics import count_host_reads  # noqa: E402
from mmfast.trainer import Trainer, resolve_device, resolve_precision  # noqa: E402

# ogm, ogm_ge and opm as the public code runs them (its form and alpha; its OPM timing and p_exe),
# the recipe NaiveStep follows: both sides of each comparison do the same work.
CODE_OGM = {"form": "reference", "alpha": 0.8}
MMFAST_METHODS = {"joint": {}, "ogm": CODE_OGM, "ogm_ge": CODE_OGM, "ogm_star": {},
                  "opm": {"timing": "current", "p_exe": 0.7}, "moddrop": {"probs": {"audio": 0.3}},
                  "opm_ogm": {}, "olm": {}, "boost": {}, "unimodal": {"modality": "visual"},
                  "mmcosine": {}, "mbsd": {}, "cml": {}, "agm": {}, "mmpareto": {}, "pmr": {},
                  "mslr": {"lr_scales": {"audio": 0.5}}, "mla": {}, "reconboost": {}, "gblending": {},
                  "relearning": {}, "lfm": {}, "amco": {}, "greedy": {},
                  "umt": {"teacher_epochs": 1}, "resample": {}}  # (umt: its teachers' training before the steps, not timed)
NAIVE_METHODS = ("joint", "ogm", "ogm_ge", "opm")
# Methods whose model has heads of its own (trainable per-modality classifiers): their
# balancing overhead is against plain joint training of that same model (model.fusion), beside
# the overhead against joint training of the concat-fusion model every other method uses.
OWN_HEADS = {"olm": "late", "boost": "boost", "mmcosine": "cosine", "mmpareto": "late", "mslr": "sum", "mla": "shared",
             "reconboost": "ensemble", "gblending": "late", "lfm": "sum", "amco": "amco", "greedy": "sum+mmtm"}
# Same-model baselines that are more than a head: their config overrides.
MODEL_OVERRIDES = {"sum+mmtm": ["model.fusion=sum", "model.mmtm=[2, 3, 4]"]}  # (greedy's model: MMTM blocks)


def select_methods(names) -> None:
    """Keep only these methods' rows (and joint's, and the methods the naive side runs), with the
    same-model baselines they need (the rows this script's tables and JSON hold)."""
    global MMFAST_METHODS, OWN_HEADS
    keep = {"joint", *NAIVE_METHODS, *names}
    MMFAST_METHODS = {m: hp for m, hp in MMFAST_METHODS.items() if m in keep}
    OWN_HEADS = {m: fusion for m, fusion in OWN_HEADS.items() if m in MMFAST_METHODS}


def make_trainer(root, out, method, batch_size, hparams=None, *overrides):
    hp = [f"hparams.{k}={v!r}".replace("'", "") for k, v in (hparams or {}).items()]
    cfg = load_config("embedded", [f"data.root={root}", f"out={out}", f"method={method}", f"data.batch_size={batch_size}",
                                   "progress=false", "epochs=1000", "data.cache=off", *hp, *overrides])
    trainer = Trainer(cfg)
    trainer.prepare()
    trainer.model.train()
    trainer.balancer.start_epoch(0, batches=len(trainer.loaders["train"]))
    return trainer


def naive_for(trainer, method, seed=0):
    """NaiveStep on a copy of a concat-fusion trainer's model with the same optimizer settings."""
    model = copy.deepcopy(trainer.model)
    o = trainer.cfg.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    gen = torch.Generator(device=trainer.device).manual_seed(seed)
    model.train()
    return NaiveStep(model, opt, method, generator=gen)


def alternated(baseline, method, pairs):
    """Times `baseline` and `method` one step at a time, alternating b m b m ... b; each method
    step against the mean of the two baseline steps beside it, so a machine whose speed drifts
    (shared cores, clocks) moves both alike. Returns (baseline times, method times, ratios)."""
    def timed(run):
        start = time.perf_counter()
        run()
        if torch.cuda.is_initialized():  # (a GPU step has only been launched: wait for it)
            torch.cuda.synchronize()
        return time.perf_counter() - start

    base, times, ratios = [timed(baseline)], [], []
    for _ in range(pairs):
        t = timed(method)
        after = timed(baseline)
        times.append(t)
        ratios.append(t / ((base[-1] + after) / 2))
        base.append(after)
    return base, times, ratios


def step_benchmark(root, tmp, batch_sizes, rounds, steps, common=()):
    """`common`: config overrides of every trainer (data.backend=naive where DALI is missing)."""
    results = {}
    for B in batch_sizes:
        runners = {}
        joint = make_trainer(root, tmp / f"joint{B}", "joint", B, None, *common)
        batch = next(iter(joint.loaders["train"].batches()))
        assert len(batch["label"]) == B, f"the dataset's first batch has {len(batch['label'])} clips, not {B}"
        device_batch = {k: v.to(joint.device) for k, v in batch.items()}
        for method, hp in MMFAST_METHODS.items():
            trainer = joint if method == "joint" else make_trainer(root, tmp / f"{method}{B}", method, B, hp, *common)
            runners[("mmfast", method)] = lambda t=trainer: t.train_step(device_batch)
        for fusion in dict.fromkeys(OWN_HEADS.values()):
            model = MODEL_OVERRIDES.get(fusion, [f"model.fusion={fusion}"])
            trainer = make_trainer(root, tmp / f"joint_{fusion}{B}", "joint", B, None, *model, *common)
            runners[("mmfast", f"joint@{fusion}")] = lambda t=trainer: t.train_step(device_batch)
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
            reads[key] = sum(counts.values())
        # Each comparison: rounds x steps pairs, one step at a time (alternated); the rounds of
        # all comparisons interleave, so each is spread over the whole run.
        comparisons = [(side, "joint", method) for side, method in runners if method != "joint"]
        comparisons += [("mmfast", f"joint@{fusion}", method) for method, fusion in OWN_HEADS.items()]
        samples = {key: [] for key in runners}
        ratios = {c: [] for c in comparisons}
        for _ in range(rounds):
            for side, base, method in comparisons:
                b, t, r = alternated(runners[(side, base)], runners[(side, method)], steps)
                samples[(side, base)] += b
                samples[(side, method)] += t
                ratios[(side, base, method)] += r
        rows = {}
        for (side, method), times in samples.items():
            t = statistics.median(times)
            overhead = statistics.median(ratios[(side, "joint", method)]) - 1 if method != "joint" else 0.0
            rows[f"{side}/{method}"] = {"side": side, "method": method, "step_ms": t * 1e3,
                                        "samples_per_s": B / t, "overhead": overhead,
                                        "host_reads_per_step": reads[(side, method)], "samples_ms": [x * 1e3 for x in times]}
        for method, fusion in OWN_HEADS.items():
            row = rows[f"mmfast/{method}"]
            row["same_model_baseline"] = f"joint@{fusion}"
            row["same_model_overhead"] = statistics.median(ratios[("mmfast", f"joint@{fusion}", method)]) - 1
        for method in NAIVE_METHODS:
            rows[f"mmfast/{method}"]["speedup_vs_naive"] = rows[f"naive/{method}"]["step_ms"] / rows[f"mmfast/{method}"]["step_ms"]
        results[str(B)] = rows
        for key, r in rows.items():
            extra = f"  {r['speedup_vs_naive']:.2f}x vs naive" if "speedup_vs_naive" in r else ""
            if "same_model_overhead" in r:
                extra += f"  {100 * r['same_model_overhead']:+.1f}% vs {r['same_model_baseline']}"
            print(f"B={B:<3} {key:<16} {r['step_ms']:8.2f} ms  {r['samples_per_s']:8.1f} samples/s  overhead "
                  f"{100 * r['overhead']:+6.1f}%  host reads {r['host_reads_per_step']:3d}{extra}")
    return results


def _timed_pass(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _drain(loader) -> None:  # a pass of a loader alone: what an epoch spends decoding
    for _ in loader:
        pass


def serve_naive_epochs(spec: dict) -> None:
    """The naive side of the epoch benchmark, in a process of its own (`--serve-naive-epochs
    SPEC`): mmfast's trainers make their whole process keep freed memory (mmfast/cpu_memory.py),
    which the research code's process does not do. Builds the same model (same seed) and the
    naive loader, then answers each stdin line "epoch" (a training epoch) or "data" (a loader
    pass) with "RESULT seconds" on stdout, until "stop"."""
    from mmfast.data import build_loader
    from mmfast.trainer import data_config

    root, out = Path(spec["root"]), Path(spec["out"])
    source = make_trainer(root, out / "model", spec["method"], spec["batch_size"], None, *spec["common"],
                          "retain_freed_memory=false")
    naive_cfg = load_config("embedded", [f"data.root={root}", f"out={out / 'naive'}", f"method={spec['method']}",
                                         f"data.batch_size={spec['batch_size']}", "progress=false", "data.backend=naive",
                                         *spec["common"]])
    loader = build_loader(data_config(naive_cfg, source.device), "train", "naive")
    naive = naive_for(source, spec["method"])
    naive_epoch(naive, loader, source.device)  # warm-up: workers
    print(f"RESULT {len(loader.clips)}", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "stop":
            break
        run = {"epoch": lambda: naive_epoch(naive, loader, source.device), "data": lambda: _drain(loader)}[command]
        print(f"RESULT {_timed_pass(run)}", flush=True)


class _NaiveEpochs:
    """The parent's handle on a serve_naive_epochs process."""

    def __init__(self, spec: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-naive-epochs", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.clips = int(self._result())

    def _result(self) -> float:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return float(line.split()[1])
        raise RuntimeError(f"the naive epoch process ended (exit code {self.proc.wait()})")

    def run(self, command: str) -> float:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._result()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        self.proc.wait()


def epoch_benchmark(root, tmp, encoder, size, batch_size, epochs, method="ogm_ge", precision="auto"):
    """Seconds per training epoch, data loading included: naive loader + NaiveStep (in a process
    of its own) vs DALI + mmfast without the decoded-sample cache (and mmfast in fp32, where
    `precision` resolves to another), and with it: its steady state (every clip read from the
    cache) and its first epoch (a fresh cache folder and trainer each time: decoding, writing and
    training at once)."""
    common = [f"model.encoder={encoder}", f"data.size={size}"]

    def trainer(name, *extra):
        return make_trainer(root, tmp / f"epoch_{name}_{encoder}", method, batch_size, None, *common, *extra)

    mm = trainer("mm", f"precision={precision}", "data.cache=off")
    sides = {"mmfast": mm}
    if mm.precision != "fp32":
        sides["mmfast_fp32"] = trainer("mm32", "precision=fp32", "data.cache=off")
    cached = {"cached": (f"precision={precision}",)}
    if mm.precision != "fp32":
        cached["cached_fp32"] = ("precision=fp32",)
    for side, extra in cached.items():
        sides[side] = trainer(side, *extra, f"data.cache={tmp / f'cache_{side}_{encoder}'}")
    naive = _NaiveEpochs({"root": str(root), "out": str(tmp / f"epoch_nv_{encoder}"), "method": method,
                          "batch_size": batch_size, "common": common})

    def mmfast_epoch(t):
        t.batch_in_epoch = 0
        t.train_epoch()
        t.epoch += 1

    def first_epoch(side, r):  # (building the trainer is not timed: probing the clips, the model)
        t = trainer(f"{side}_first{r}", *cached[side], f"data.cache={tmp / f'cache_{side}_{encoder}_first{r}'}")
        try:
            return _timed_pass(lambda: mmfast_epoch(t))
        finally:
            t.close()
            del t
            gc.collect()  # (the trainer's pipelines and buffers go now, not during a later timing)

    try:
        for t in sides.values():  # warm-up: pipelines (and the cached sides' caches)
            mmfast_epoch(t)
        times = {"naive": [], **{side: [] for side in sides}, **{f"{side}_first": [] for side in cached}}
        data = {"naive": [], "mmfast": [], "cached": []}
        for r in range(epochs):
            times["naive"].append(naive.run("epoch"))
            for side, t in sides.items():
                times[side].append(_timed_pass(lambda t=t: mmfast_epoch(t)))
            for side in cached:
                times[f"{side}_first"].append(first_epoch(side, r))
            data["naive"].append(naive.run("data"))
            data["mmfast"].append(_timed_pass(lambda: _drain(mm.loaders["train"])))
            data["cached"].append(_timed_pass(lambda: _drain(sides["cached"].loaders["train"])))
    finally:
        naive.close()
    clips = naive.clips
    out = {side: {"epoch_s": statistics.median(t), "clips_per_s": clips / statistics.median(t), "epochs_s": t}
           for side, t in times.items()}
    for side, source in data.items():
        out[side]["data_only_s"] = statistics.median(source)
    fp32 = {"mmfast": "mmfast_fp32" if "mmfast_fp32" in out else "mmfast",
            "cached": "cached_fp32" if "cached_fp32" in out else "cached"}
    naive_s = out["naive"]["epoch_s"]
    out["speedup"] = naive_s / out["mmfast"]["epoch_s"]
    out["speedup_fp32"] = naive_s / out[fp32["mmfast"]]["epoch_s"]
    out["cached_speedup"] = naive_s / out["cached"]["epoch_s"]
    out["cached_speedup_fp32"] = naive_s / out[fp32["cached"]]["epoch_s"]
    # the first cached epoch against an uncached one, same precision
    out["first_epoch_slowdown"] = out["cached_first"]["epoch_s"] / out["mmfast"]["epoch_s"] - 1
    out["first_epoch_slowdown_fp32"] = (out[f"{fp32['cached']}_first"]["epoch_s"] /
                                        out[fp32["mmfast"]]["epoch_s"] - 1)
    out["precision"] = mm.precision
    out["data_speedup"] = out["naive"]["data_only_s"] / out["mmfast"]["data_only_s"]
    out["cached_data_speedup"] = out["naive"]["data_only_s"] / out["cached"]["data_only_s"]
    out.update(encoder=encoder, size=size, batch_size=batch_size, clips=clips, method=method)
    print(f"epoch {encoder} {size}px B={batch_size} ({clips} clips, {method}, mmfast in {mm.precision}): naive "
          f"{naive_s:.2f} s; mmfast uncached {out['mmfast']['epoch_s']:.2f} s ({out['speedup']:.2f}x), cached "
          f"{out['cached']['epoch_s']:.2f} s ({out['cached_speedup']:.2f}x), first cached epoch "
          f"{out['cached_first']['epoch_s']:.2f} s ({100 * out['first_epoch_slowdown']:+.1f}% vs uncached); in fp32: "
          f"uncached {out['speedup_fp32']:.2f}x, cached {out['cached_speedup_fp32']:.2f}x, first "
          f"{100 * out['first_epoch_slowdown_fp32']:+.1f}%; the loaders alone: naive {out['naive']['data_only_s']:.2f} s, "
          f"uncached {out['mmfast']['data_only_s']:.2f} s ({out['data_speedup']:.2f}x), cached "
          f"{out['cached']['data_only_s']:.3f} s ({out['cached_data_speedup']:.1f}x)")
    for t in sides.values():
        t.close()
    return out


def cuda_checks(root, tmp, batch_size, steps=5, common=()):
    """On a GPU: (1) every method's trainer step under torch.cuda.set_sync_debug_mode("error")
    (a host synchronisation raises); (2) the balancing ops of an OGM-GE step (balance_stats,
    then grad_modulate_ with the device step counter) captured in a CUDA graph and replayed,
    against the same ops launched eagerly."""
    from mmfast.ops import balance_stats, grad_modulate_
    from mmfast.methods import select_encoder_params

    out = {"sync_free": {}}
    for method, hp in MMFAST_METHODS.items():
        trainer = make_trainer(root, tmp / f"cuda_{method}", method, batch_size, hp, "device=cuda", *common)
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
    trainer = make_trainer(root, tmp / "cuda_graph", "ogm_ge", batch_size, None, "device=cuda", *common)
    batch = {k: v.cuda() for k, v in next(iter(trainer.loaders["train"].batches())).items()}
    inputs, labels = trainer._inputs(batch)
    fused, unimodal, _, _ = trainer._forward(inputs)
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
    lines = [f"machine: {describe(report['machine'])}", ""]
    for B, rows in report["step"].items():
        lines += [f"training step, batch {B}, {report.get('device', 'cpu')}, mmfast in "
                  f"{report.get('mmfast_precision', 'fp32')}, naive in fp32 (medians of {report['rounds']} rounds of "
                  f"{report['steps']} alternated step pairs per comparison)", "",
                  "| method | mmfast ms | samples/s | overhead | same-model overhead | host reads | naive ms | overhead "
                  "| host reads | speedup |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method in [*MMFAST_METHODS, *(f"joint@{f}" for f in dict.fromkeys(OWN_HEADS.values()))]:
            m = rows[f"mmfast/{method}"]
            n = rows.get(f"naive/{method}")
            naive_cells = (f"{n['step_ms']:.1f} | {100 * n['overhead']:+.1f}% | {n['host_reads_per_step']} | "
                           f"{m['speedup_vs_naive']:.2f}x" if n else "| | |")
            same = (f"{100 * m['same_model_overhead']:+.1f}% (vs {m['same_model_baseline']})"
                    if "same_model_overhead" in m else "")
            lines.append(f"| {method} | {m['step_ms']:.1f} | {m['samples_per_s']:.0f} | {100 * m['overhead']:+.1f}% | "
                         f"{same} | {m['host_reads_per_step']} | {naive_cells} |")
        lines.append("")
    if report.get("cuda"):
        c = report["cuda"]
        lines += [f"CUDA: steps free of host synchronisation: {c['sync_free']}; balancing ops of an OGM-GE step "
                  f"eager {c['balancing_eager']['median_ms']:.3f} ms, replayed CUDA graph "
                  f"{c['balancing_graph']['median_ms']:.3f} ms ({c['graph_speedup']:.2f}x)", ""]
    if report.get("epoch"):
        lines += ["epoch including data loading: the naive way (fp32) against mmfast without and with the decoded-sample "
                  "cache (steady state: every clip read from it; first epoch: a fresh cache, decoded, written and "
                  "trained at once), in mmfast's precision and in fp32; and a pass of each loader alone", "",
                  "| encoder | px | batch | clips | precision | naive s | uncached s | speedup | cached s | speedup | "
                  "first cached epoch s | vs uncached | fp32: uncached | cached | first epoch | naive loader s | "
                  "uncached loader s | cached loader s | cached loader speedup |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in report["epoch"]:
            lines.append(f"| {e['encoder']} | {e['size']} | {e['batch_size']} | {e['clips']} | {e.get('precision', 'fp32')} "
                         f"| {e['naive']['epoch_s']:.2f} | {e['mmfast']['epoch_s']:.2f} | {e['speedup']:.2f}x | "
                         f"{e['cached']['epoch_s']:.2f} | {e['cached_speedup']:.2f}x | {e['cached_first']['epoch_s']:.2f} "
                         f"| {100 * e['first_epoch_slowdown']:+.1f}% | {e['speedup_fp32']:.2f}x | "
                         f"{e['cached_speedup_fp32']:.2f}x | {100 * e['first_epoch_slowdown_fp32']:+.1f}% | "
                         f"{e['naive']['data_only_s']:.2f} | {e['mmfast']['data_only_s']:.2f} | "
                         f"{e['cached']['data_only_s']:.3f} | {e['cached_data_speedup']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6,
                        help="alternated step pairs per comparison and round")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per side (0: skip the epoch part)")
    parser.add_argument("--clips", type=int, default=480, help="clips of the generated embedded dataset")
    parser.add_argument("--epoch-encoders", nargs="+", choices=["small", "resnet18"], default=["small", "resnet18"],
                        help="the encoders the epoch part times (default: both)")
    parser.add_argument("--resnet-size", type=int, default=112, help="frame size of the ResNet-18 epoch")
    parser.add_argument("--resnet-clips", type=int, default=64, help="clips of the ResNet-18 epoch's dataset")
    parser.add_argument("--data-backend", choices=["dali", "naive"], default="dali",
                        help="the loader that decodes the step benchmark's batch (naive: where DALI is not "
                             "installed, e.g. a lent GPU machine; the epoch part needs DALI)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="mmfast's precision (the embedded config's: auto, bf16 where the machine computes in "
                             "bf16 natively); the naive baseline is fp32")
    parser.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="time only these methods' steps (with joint and the naive side's methods; default: every "
                             "method)")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--markdown", help="write the tables to this markdown file")
    parser.add_argument("--serve-naive-epochs", metavar="SPEC", help=argparse.SUPPRESS)  # (epoch_benchmark's child)
    args = parser.parse_args(argv)
    if args.serve_naive_epochs:
        return serve_naive_epochs(json.loads(args.serve_naive_epochs))
    if args.epochs and args.data_backend != "dali":
        parser.error("the epoch part compares DALI with the naive loader: --data-backend naive needs --epochs 0")
    if args.methods:
        unknown = sorted(set(args.methods) - set(MMFAST_METHODS))
        if unknown:
            parser.error(f"--methods: unknown {unknown}; the rows are {sorted(MMFAST_METHODS)}")
        select_methods(args.methods)
    common = (f"data.backend={args.data_backend}", f"precision={args.precision}")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = generate(tmp / "cremad", clips=args.clips, seed=0)
        report = {"benchmark": "step", "machine": machine(), "rounds": args.rounds, "steps": args.steps,
                  "data_backend": args.data_backend, "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "mmfast_precision": resolve_precision(args.precision, resolve_device("auto")),
                  "step": step_benchmark(root, tmp, args.batch_sizes, args.rounds, args.steps, common), "epoch": []}
        if args.epochs and "small" in args.epoch_encoders:
            report["epoch"].append(epoch_benchmark(root, tmp, "small", 64, 32, args.epochs, precision=args.precision))
        if args.epochs and "resnet18" in args.epoch_encoders:
            # (ResNet-18 on 2 CPU cores takes about 0.5 s a clip: a smaller dataset of its own)
            small_root = generate(tmp / "cremad_resnet", clips=args.resnet_clips, seed=0)
            report["epoch"].append(epoch_benchmark(small_root, tmp, "resnet18", args.resnet_size, 16, args.epochs,
                                                   precision=args.precision))
        if torch.cuda.is_available():
            report["cuda"] = cuda_checks(root, tmp, args.batch_sizes[0], common=common)
    write_json(args.json, report)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(report))
        print(f"wrote {args.markdown}")
    return report


if __name__ == "__main__":
    main()
