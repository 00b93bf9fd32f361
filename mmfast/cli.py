"""The `mmfast` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _synth(args) -> int:
    from mmfast.data.synth import SynthSpec, generate

    spec = SynthSpec(clips=args.clips, classes=args.classes, dominant=args.dominant, imbalance=args.imbalance,
                     seed=args.seed, dominant_missing=args.dominant_missing, weak_missing=args.weak_missing,
                     jpeg_frames=args.jpeg_frames, text=args.text, text_amplitude=args.text_amplitude,
                     text_missing=args.text_missing)
    try:
        out = generate(args.out, spec)
    except (ValueError, FileExistsError) as exc:
        print(f"mmfast data synth: {exc}", file=sys.stderr)
        return 2
    what = (f"with text features (amplitude {spec.text_amplitude}) in the generic layout (config: embedded_text)"
            if spec.text else "in the CREMA-D layout")
    print(f"wrote {spec.clips} clips ({spec.classes} classes, {spec.dominant} dominant, imbalance "
          f"{spec.imbalance}) {what} to {out}")
    return 0


def _cache(args) -> int:
    import os

    from mmfast.config import load_config
    from mmfast.data.dali_cache import build_cache
    from mmfast.trainer import data_config, resolve_device

    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.backend != "dali":
            raise ValueError("the decoded-sample cache is read by the DALI backend (data.backend=dali)")
        if cfg.data.cache == "off":
            cfg.data.cache = "auto"  # (asking for a cache: the default folder)
        if cfg.data.synth is not None:
            from mmfast.trainer import ensure_dataset

            ensure_dataset(cfg)
        dcfg = data_config(cfg, resolve_device(cfg.device))
        dcfg.num_workers = args.workers or os.cpu_count() or 1
        report = build_cache(dcfg, args.splits, progress=not args.no_progress and sys.stderr.isatty(),
                             prune=args.prune)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mmfast data cache: {exc}", file=sys.stderr)
        return 2
    cache = report.pop("cache")
    for split, r in report.items():
        failed = f", {len(r['failed'])} failed to decode (e.g. {next(iter(r['failed'].values()))})" if r["failed"] else ""
        print(f"{split}: {r['clips']} clips, {r['written']} entries written{failed}")
    pruned = f", {cache['removed']} stale entries removed" if args.prune else ""
    print(f"cache {cache['folder']}: {cache['entries']} entries, {cache['bytes'] / 1e9:.3f} GB{pruned}")
    return 0


def _train(args) -> int:
    from mmfast.config import load_config
    from mmfast.run_dir import RunDirError
    from mmfast.trainer import NonFiniteError, Trainer, resume

    trainer = None
    out = args.resume
    try:
        if args.resume:
            if args.config:
                raise ValueError("--resume continues a run with the config saved in it; give no --config (overrides "
                                 "may change what a resume may: epochs=N, progress=false, ...)")
            trainer = resume(args.resume, args.overrides)
        else:
            if not args.config:
                raise ValueError("give --config CONFIG (a YAML file or one of the shipped configs) or --resume RUN_DIR")
            cfg = load_config(args.config, args.overrides)
            out = cfg.out
            trainer = Trainer(cfg)
        summary = trainer.fit()
    except KeyboardInterrupt:
        print(f"mmfast train: interrupted; {_resume_hint(trainer, out)}", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, NonFiniteError, RunDirError) as exc:
        print(f"mmfast train: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # (a write outside the run directory's own checks: a data folder, a plot)
        print(f"mmfast train: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not (_in_process_group() and _is_collective_failure(exc)):
            raise
        import os

        timeout = trainer.cfg.dist_timeout_s if trainer is not None else "dist_timeout_s"
        print(f"mmfast train: rank {os.environ.get('RANK', '?')}: a collective failed: another rank died, or stalled "
              f"longer than dist_timeout_s ({timeout} s); {_resume_hint(trainer, out)}. The backend said: "
              f"{str(exc).strip().splitlines()[0][:400]}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    if trainer.dist.is_main:  # (under torchrun: one summary, from rank 0)
        print(json.dumps(summary, indent=2))
    return 0


def _resume_hint(trainer, out) -> str:
    """What an interrupted run left: the checkpoint a resume continues from, or none."""
    if trainer is None or out is None:
        return "stopped before training started"
    kept = trainer.run.kept_checkpoint()
    return f"{kept}; continue with: mmfast train --resume {out}"


def _is_collective_failure(exc: RuntimeError) -> bool:
    """A collective that failed because a peer died or timed out (gloo and NCCL raise plain
    RuntimeErrors or DistBackendErrors; the text tells which)."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(s in text for s in ("gloo", "Gloo", "NCCL", "Connection reset", "Connection closed", "Timed out",
                                   "timed out", "Broken pipe"))


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _parse_missing(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--missing {text!r}: expected modality=probability pairs, e.g. audio=0.3,visual=0.1") \
                from None
        if not 0.0 <= out[name.strip()] <= 1.0:
            raise ValueError(f"--missing {text!r}: the drop probability of {name.strip()!r} must be in [0, 1], "
                             f"got {value.strip()}")
    return out


def _write_per_sample(path, rows: dict) -> None:
    """The per-sample Shapley values as CSV: clip, label, one column per modality."""
    import csv

    columns = list(rows)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*(rows[c] for c in columns)))


def _eval(args) -> int:
    from mmfast.run_dir import RunDirError
    from mmfast.trainer import NonFiniteError, resume

    if args.per_sample and not args.shapley:
        print("mmfast eval: --per-sample needs --shapley", file=sys.stderr)
        return 2
    try:
        missing = _parse_missing(args.missing) if args.missing else None
        trainer = resume(args.run_dir, read_only=True)
        trainer.load_best()
        split = "test" if "test" in trainer.loaders else "val"
        result = {"run": str(args.run_dir), "best_epoch": trainer.best["epoch"]}
        result.update(trainer.evaluate(split, missing=missing))
        if args.linear_probe:
            result.update(trainer.linear_probe(test_split=split))
        if args.shapley:
            values = trainer.shapley(split, zeroing=args.zeroing)
            per_sample = values.pop("per_sample")
            result["shapley"] = values
            if args.per_sample:
                _write_per_sample(args.per_sample, per_sample)
    except (ValueError, FileNotFoundError, RunDirError, NonFiniteError) as exc:
        print(f"mmfast eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def _diagnose(args) -> int:
    from mmfast.diagnose import diagnose
    from mmfast.run_dir import RunDirError
    from mmfast.trainer import NonFiniteError

    try:
        diagnose(args.config, args.overrides, out=args.out, epochs=args.epochs,
                 echo=lambda line: print(line, file=sys.stderr, flush=True))
    except (ValueError, FileExistsError, FileNotFoundError, RunDirError, NonFiniteError) as exc:
        print(f"mmfast diagnose: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(json.loads((Path(args.out) / "report.json").read_text()), indent=2))
    return 0


def _demo(args) -> int:
    from mmfast.demo import run_demo

    methods = None if not args.methods else "all" if args.methods == ["all"] else args.methods
    try:
        run_demo(args.out, args.data, seeds=args.seeds, dominants=args.dominant, epochs=args.epochs, clips=args.clips,
                 progress=not args.no_progress, study=args.study, methods=methods)
    except ValueError as err:
        if "--methods" not in str(err):
            raise
        print(f"mmfast demo: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    from mmfast.data.synth import SynthSpec

    parser = argparse.ArgumentParser(prog="mmfast", description="Fast balanced multimodal training.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print how the native extension was built (JSON)")
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate the embedded imbalanced audio-visual dataset (CREMA-D layout; "
                                          "--text: with text features, generic layout)")
    synth.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    synth.add_argument("--clips", type=int, default=480)
    synth.add_argument("--classes", type=int, default=6)
    synth.add_argument("--dominant", choices=["audio", "visual", "none"], default="audio",
                       help="the modality joint training favours; none: a balanced variant")
    synth.add_argument("--imbalance", type=float, default=2.5,
                       help="how much weaker the other modality's class signal is (>= 1)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--dominant-missing", type=float, default=0.3,
                       help="share of clips without a dominant-modality signature")
    synth.add_argument("--weak-missing", type=float, default=0.1,
                       help="share of other clips without a weak-modality signature")
    synth.add_argument("--jpeg-frames", action="store_true", help="also write 1-fps JPEG frame folders")
    synth.add_argument("--text", action="store_true",
                       help="add a third modality, text: pre-extracted feature sequences (.npy); the dataset is then "
                            "in the generic layout (the embedded_text config)")
    synth.add_argument("--text-amplitude", type=float, default=SynthSpec.text_amplitude,
                       help="the text signature's amplitude per step")
    synth.add_argument("--text-missing", type=float, default=SynthSpec.text_missing,
                       help="share of clips without a text signature")
    cache = data.add_parser("cache", help="decode a dataset into the decoded-sample cache ahead of training")
    cache.add_argument("--config", required=True, help="the training config (a YAML file or a shipped config); "
                                                       "its data.cache folder (off: the default folder)")
    cache.add_argument("--splits", nargs="+", help="which splits (default: all)")
    cache.add_argument("--workers", type=int, help="decoding threads (default: every core)")
    cache.add_argument("--prune", action="store_true",
                       help="also remove the folder's entries this config's clips do not have (changed files, "
                            "other recipes, other datasets)")
    cache.add_argument("--no-progress", action="store_true")
    cache.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.root=DIR data.cache=DIR")
    train = sub.add_parser("train", help="train a model with a balancing method (see README)")
    train.add_argument("--config", help="a YAML file or a shipped config: embedded, crema_d, kinetics_sounds, "
                                        "vggsound, ave")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                                                           "(RUN_DIR is where it reads and writes, whatever its "
                                                           "config says)")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method=ogm_ge epochs=2 "
                                                    "seed=1 out=runs/x data.root=DIR hparams.alpha=0.8; with "
                                                    "--resume only keys that do not change the training "
                                                    "(epochs, progress, checkpoint_every, ...)")
    evaluate = sub.add_parser("eval", help="evaluate the best checkpoint of a run")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--missing", help="drop modalities at test time, e.g. audio=0.3,visual=0.1")
    evaluate.add_argument("--linear-probe", action="store_true", help="also fit a linear probe on each encoder")
    evaluate.add_argument("--shapley", action="store_true",
                          help="also each modality's Shapley value of the fused accuracy, overall and per class")
    evaluate.add_argument("--zeroing", choices=["features", "inputs"], default="features",
                          help="how --shapley makes a modality absent: zero its pooled features (default) or its "
                               "input")
    evaluate.add_argument("--per-sample", metavar="CSV", help="with --shapley: write each sample's values here")
    diag = sub.add_parser("diagnose", help="is a dataset imbalanced, and which method to try: trains joint and "
                                           "each modality alone briefly, writes a report")
    diag.add_argument("--config", required=True, help="a YAML file or a shipped config")
    diag.add_argument("--epochs", type=int, help="epochs of each run (default: the config's)")
    diag.add_argument("--out", default="runs/diagnose", help="where the runs and the report go")
    diag.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.root=DIR")
    demo = sub.add_parser("demo", help="train every method on the embedded dataset and print the table")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--data", default="data", help="where the embedded dataset is (generated when absent)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0])
    demo.add_argument("--dominant", nargs="+", choices=["audio", "visual"], default=["audio"])
    demo.add_argument("--epochs", type=int, help="override the embedded config's epochs")
    demo.add_argument("--clips", type=int, default=480)
    demo.add_argument("--methods", nargs="+", metavar="ROW",
                      help="which rows: 'all' (the seed papers' methods, the baselines and the peers' methods "
                           "mmcosine, mbsd, cml, agm, mmpareto, pmr, mla, reconboost, gblending, amco, greedy, umt, resample, mslr, relearning, lfm) "
                           "or row labels / method names; default: "
                           "the seed papers' methods and the baselines")
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--study", action="store_true",
                      help="every row (as --methods all) and the study's comparison rows (Greedy's model without its "
                           "curation, late-heads joint, OLM's normalized factors, OPM's public-code timing); with "
                           "--methods: those rows only")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "diagnose":
        return _diagnose(args)
    if args.command == "info":
        import mmfast

        print(json.dumps(mmfast.build_info(), indent=2, sort_keys=True))
        return 0
    if args.command == "data" and args.data_command == "synth":
        return _synth(args)
    if args.command == "data" and args.data_command == "cache":
        return _cache(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
