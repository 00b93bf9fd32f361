"""Does the embedded dataset reproduce modality imbalance? Joint vs uni-modal training, measured
with linear probes (reference semantics section 8: freeze the encoder, fit a fresh linear
classifier on its features, report its test accuracy).

    1. features: every clip of every split through the evaluation transforms (DALI), once;
    2. joint: an audio and a visual encoder, concatenated features, one linear head, cross
       entropy on the fused logits (plain joint training, no balancing);
    3. alone: each encoder with its own linear head, trained on its modality only;
    4. probes: logistic regression on the frozen encoders' train features, test accuracy.

The weak modality's encoder is worse inside the joint model than alone when the dataset works.

    python bench/imbalance.py [--root DIR] [--clips 480] [--epochs 15] [--dominant audio] [--json OUT]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from mmfast.data import DataConfig, FrameRecipe, build_loader, generate  # noqa: E402
from mmfast.data.synth import SIZE  # noqa: E402
from mmfast.estimators import ConcatHead  # noqa: E402
from mmfast.models import SmallConvEncoder  # noqa: E402

MODALITIES = ("audio", "visual")
LR = 0.01


def load_split(cfg, split):
    batches = list(build_loader(cfg, split, backend="dali", train=False))
    audio = torch.cat([b["audio"] for b in batches]).unsqueeze(1)  # [N, 1, 257, 188]
    visual = torch.cat([b["visual"] for b in batches])[:, 0]  # one frame: [N, 3, H, W]
    return {"audio": audio, "visual": visual}, torch.cat([b["label"] for b in batches])


def make_encoders(seed):
    torch.manual_seed(seed)
    return {"audio": SmallConvEncoder(1), "visual": SmallConvEncoder(3)}


def train(encoders, head_fn, data, labels, epochs, batch_size, seed):
    params = [p for e in encoders.values() for p in e.parameters()] + list(head_fn.parameters())
    # SGD with momentum, as the published recipes train: Adam would rescale the small gradients
    # that the dominant modality leaves the weak one, hiding the imbalance.
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for e in encoders.values():
        e.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            feats = [encoders[m](data[m][idx]) for m in encoders]
            logits = head_fn(feats)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def features(encoder, x, batch_size=128):
    encoder.eval()
    return torch.cat([encoder(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def probe_accuracy(encoder, train_x, train_y, test_x, test_y):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features(encoder, train_x))
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(features(encoder, train_x)), train_y.numpy())
    return float(clf.score(scaler.transform(features(encoder, test_x)), test_y.numpy()))


class _Fused(nn.Module):
    def __init__(self, dims, classes):
        super().__init__()
        self.head = ConcatHead(dims, classes)

    def forward(self, feats):
        return self.head(feats)[0]


class _Single(nn.Module):
    def __init__(self, dim, classes):
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, feats):
        return self.fc(feats[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="a dataset in the CREMA-D layout (default: generate the embedded one)")
    parser.add_argument("--clips", type=int, default=480)
    parser.add_argument("--dominant", choices=MODALITIES, default="audio")
    parser.add_argument("--imbalance", type=float, default=2.5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or generate(Path(tmp) / "cremad", clips=args.clips, seed=args.seed, dominant=args.dominant,
                                     imbalance=args.imbalance)
        cfg = DataConfig(root=str(root), frames=FrameRecipe(num_frames=1, size=SIZE), batch_size=64, num_workers=2)
        train_x, train_y = load_split(cfg, "train")
        test_x, test_y = load_split(cfg, "test")
        classes = int(max(train_y.max(), test_y.max())) + 1
    results = {}
    joint = make_encoders(args.seed)
    fused = _Fused([joint[m].out_dim for m in MODALITIES], classes)
    train(joint, fused, train_x, train_y, args.epochs, args.batch_size, args.seed)
    with torch.no_grad():
        for e in joint.values():
            e.eval()
        logits = fused([joint[m](test_x[m]) for m in MODALITIES])
    results["joint_fused_test_accuracy"] = float((logits.argmax(1) == test_y).float().mean())
    for m in MODALITIES:
        alone = make_encoders(args.seed)
        single = _Single(alone[m].out_dim, classes)
        train({m: alone[m]}, single, train_x, train_y, args.epochs, args.batch_size, args.seed)
        untrained = make_encoders(args.seed + 1)[m]
        results[m] = {
            "probe_joint": probe_accuracy(joint[m], train_x[m], train_y, test_x[m], test_y),
            "probe_alone": probe_accuracy(alone[m], train_x[m], train_y, test_x[m], test_y),
            "probe_untrained": probe_accuracy(untrained, train_x[m], train_y, test_x[m], test_y),
        }
    weak = "visual" if args.dominant == "audio" else "audio"
    results["weak_modality"] = weak
    results["imbalance_reproduced"] = results[weak]["probe_joint"] < results[weak]["probe_alone"]
    seconds = time.perf_counter() - start
    print(f"embedded dataset: {len(train_y)} train / {len(test_y)} test clips, {classes} classes, "
          f"{args.dominant} dominant (imbalance {args.imbalance}), {args.epochs} epochs, {seconds:.0f} s")
    print(f"joint model, fused test accuracy: {results['joint_fused_test_accuracy']:.3f}")
    print(f"{'linear probe':<14}{'in joint':>10}{'alone':>10}{'untrained':>11}")
    for m in MODALITIES:
        r = results[m]
        print(f"{m:<14}{r['probe_joint']:>10.3f}{r['probe_alone']:>10.3f}{r['probe_untrained']:>11.3f}")
    print(f"weak modality ({weak}) worse inside the joint model than alone: {results['imbalance_reproduced']}")
    write_json(args.json, {"benchmark": "imbalance", "machine": machine(), "args": vars(args), "seconds": seconds,
                           "results": results})
    return results


if __name__ == "__main__":
    main()
