"""One process of a test launch (tests/test_distributed.py): trains the embedded config with the
overrides of each run of a spec file in turn, as torchrun would start it (RANK / WORLD_SIZE /
MASTER_* in the environment), and writes what each step computed (the balancer's metrics) and
the final model, per run. The process group, made by the first run, serves them all.

    python tests/dist_worker.py SPEC.json   (SPEC: {"runs": [run, ...]})
"""
import gc
import json
import sys

import torch
import torch.distributed as dist

from mmfast.config import load_config
from mmfast.trainer import Trainer, resume


def main(spec_path: str) -> None:
    for run in json.loads(open(spec_path).read())["runs"]:
        train_and_record(run)
        gc.collect()  # (the trainer's cycle through recorded_step: its loaders' workers go now)
        print(f"run done: {run['records']}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def train_and_record(spec: dict) -> None:
    trainer = resume(spec["out"]) if spec.get("resume") else Trainer(load_config("embedded", spec["overrides"]))
    records = []
    step = trainer.train_step

    def recorded_step(batch, **kw):
        step(batch, **kw)
        records.append({k: v.tolist() for k, v in trainer.balancer.metrics.items()})  # (a test's host reads)

    trainer.train_step = recorded_step
    if spec["max_steps"]:
        trainer.fit(max_steps=spec["max_steps"])
    rank = trainer.dist.rank
    record = {"steps": records, "world_size": trainer.dist.world_size,
              "assignments": getattr(trainer.balancer.methods[0], "assignments", None),
              "cache": {split: {"decoded": loader.cached.decoded, "reads": loader.cached.store.reads}
                        for split, loader in trainer.loaders.items() if getattr(loader, "cached", None)}}
    if spec.get("evaluate"):  # evaluation of the same weights: sharded per rank, gathered
        record["evaluate"] = {"val": trainer.evaluate("val"), "test": trainer.evaluate("test"), "test_missing": trainer.evaluate("test", missing={"audio": 0.5},
                                                                                               seed=1),
                              "probe": trainer.linear_probe(),
                              "decoded": {split: sum(len(b["label"]) for b in trainer.loaders[split])
                                          for split in ("val", "test")}}
    with open(f"{spec['records']}.{rank}.json", "w") as f:
        json.dump(record, f)
    torch.save(trainer.model.state_dict(), f"{spec['records']}.{rank}.pt")
    trainer.close()  # (the run directory's lock)


if __name__ == "__main__":
    main(sys.argv[1])
