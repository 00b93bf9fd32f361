"""A run's evaluation: the ``Evaluator`` (its evaluation passes: a split's metrics, the model's
outputs for the methods that ask, the encoders' features and linear probes), and the papers'
metrics: accuracy, macro-F1 and mAP (mean over classes of scikit-learn's average precision on
softmax scores) for the fused logits and each modality's uni-modal logits, and the linear probe
(freeze an encoder, fit a fresh linear classifier on its training features, report its test
accuracy; docs/methods/README.md)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """acc, f1 (macro) and map of logits [N, C] against labels [N] (host tensors)."""
    from sklearn.metrics import average_precision_score, f1_score

    logits = logits.float()
    y = labels.numpy()
    pred = logits.argmax(dim=1).numpy()
    probs = torch.softmax(logits, dim=1).numpy()
    present = [c for c in range(num_classes) if (y == c).any()]  # AP is undefined for absent classes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = [average_precision_score(y == c, probs[:, c]) for c in present]
        f1 = f1_score(y, pred, average="macro", labels=list(range(num_classes)), zero_division=0)
    return {"acc": float((pred == y).mean()), "f1": float(f1), "map": float(np.mean(ap)) if ap else float("nan")}


def linear_probe_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                          test_labels: torch.Tensor, *, seed: int = 0) -> float:
    """Test accuracy of a logistic-regression probe fit on standardised frozen training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probe.fit(train_features.double().numpy(), train_labels.numpy())
    return float(probe.score(test_features.double().numpy(), test_labels.numpy()))


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient, parameter or model output; the message names where."""


class Evaluator:
    """The evaluation passes of a run: metrics of a split, the model's outputs on every sample
    of a split (handed to the methods that ask), the encoders' features and the linear probes.
    It runs the model through the step runner's inputs, autocast and forward (mmfast/steps.py),
    over the run's evaluation loaders; in a distributed run each rank evaluates its shard of
    every batch and the rows are gathered (the same on every rank and as one process has them).
    `context()` says where the run stands, for error messages; `make_loader(split)`: an
    evaluation loader of a split (evaluation transforms). ``balancer`` is set once built (the
    modalities a method leaves out are not encoded)."""

    def __init__(self, model, steps, loaders: dict, *, classes, dist, seed: int, context, make_loader):
        self.model, self.steps, self.loaders = model, steps, loaders
        self.classes, self.dist, self.seed = list(classes), dist, seed
        self.context, self.make_loader = context, make_loader
        self.modalities = list(steps.modalities)
        self.device = steps.device
        self.balancer = None

    def add_loader(self, name: str, loader) -> None:
        """An evaluation loader; in a distributed run each rank decodes its shard of every batch."""
        if self.dist.enabled:
            loader.set_shard(self.dist.rank, self.dist.world_size)
        self.loaders[name] = loader

    def evaluation_split(self, split: str) -> str:
        """The loader to evaluate `split` with: its own (val, test), or for the training split a
        loader of its clips through evaluation transforms ("train_eval", built on first use)."""
        if split in self.loaders and split != "train":
            return split
        name = f"{split}_eval"
        if name not in self.loaders:
            self.add_loader(name, self.make_loader(split))
        return name

    @torch.no_grad()
    def evaluate(self, split: str, *, missing: dict[str, float] | None = None, seed: int = 0) -> dict[str, float]:
        """Fused and per-modality accuracy, macro-F1 and mAP on `split`, over every sample that can
        be read: `{split}/samples` counts them, `{split}/skipped` counts clips left out under
        on_error="skip" (when reading the list and probing, or decoding this pass) and
        `{split}/skipped_clips` names them. `missing` drops each modality's features with the
        given probability (missing-modality evaluation)."""
        import torch.nn.functional as F

        fused, unimodal, labels = self.outputs(split, missing=missing, seed=seed)
        if not (torch.isfinite(fused).all() and torch.isfinite(unimodal).all()):
            raise NonFiniteError(f"the model's outputs on split {split!r} are non-finite ({self.context()})")
        C = len(self.classes)
        out = {f"{split}/{k}": v for k, v in classification_metrics(fused, labels, C).items()}
        out[f"{split}/loss"] = float(F.cross_entropy(fused, labels))
        for m, name in enumerate(self.modalities):
            for k, v in classification_metrics(unimodal[m], labels, C).items():
                out[f"{split}/{k}/{name}"] = v
            out[f"{split}/loss/{name}"] = float(F.cross_entropy(unimodal[m], labels))
        out[f"{split}/samples"] = len(labels)
        loader = self.loaders[split]
        decode_skips = [n for names in self.dist.gather_objects(loader.last_epoch_skipped.names) for n in names]
        skipped = loader.skipped_at_build.names + decode_skips  # (the same probe on every rank: built once)
        out[f"{split}/skipped"] = len(skipped)
        if skipped:
            out[f"{split}/skipped_clips"] = skipped
        return out

    @torch.no_grad()
    def outputs(self, split: str, *, missing: dict[str, float] | None = None, seed: int = 0, features: bool = False,
                index: bool = False):
        """(fused [N, C], unimodal [M, N, C], labels [N]) of the model on every readable sample of
        `split`, in the split's order (float32; gathered over the ranks of a distributed run).
        `missing`: as in evaluate. `features`: one more item, the M encoders' features [N, d_m];
        `index`: then one more, each row's clip position in the split [N]."""
        from .ops import feature_drop

        loader = self.loaders[split]
        self.model.eval()
        fused_all, uni_all, labels_all = [], [], []
        drop = None
        if missing:
            if self.model.fused_representation:
                raise ValueError(f"missing-modality evaluation drops pooled features; fusion {self.steps.fusion!r} "
                                 f"fuses inside the encoders")
            unknown = sorted(set(missing) - set(self.modalities))
            if unknown:
                raise ValueError(f"missing-modality evaluation names {unknown}, not modalities {self.modalities}")
            for name, prob in missing.items():
                if not (isinstance(prob, (int, float)) and 0.0 <= prob <= 1.0):
                    raise ValueError(f"missing-modality evaluation: the drop probability of {name!r} must be in "
                                     f"[0, 1], got {prob!r}")
            probs = torch.tensor([float(missing.get(m, 0.0)) for m in self.modalities], device=self.device)
            gen = torch.Generator(device=self.device).manual_seed(seed)
        index_all, features_all = [], []
        skip = self.balancer.unused_modalities if self.balancer is not None else ()
        for batch in loader:
            inputs, labels = self.steps.inputs(batch)
            if missing:  # (a distributed run: the global batch's draws, this rank's shard of them)
                shard = loader.batch_shard(loader.position - 1) if self.dist.enabled else None
                drop = lambda f, shard=shard: feature_drop(f, probs, generator=gen, shard=shard).features  # noqa: E731
            step_drop = drop
            if features:  # (the encoders' features on their way to the drop: no second encoding)
                step_drop = lambda f, then=drop: (features_all.append([x.float() for x in f]),  # noqa: E731
                                                  f if then is None else then(f))[1]
            with self.steps.autocast():
                fused, unimodal, _, _ = self.steps.forward(inputs, skip=skip, drop=step_drop, measure_dropped=True)
            fused_all.append(fused.float())
            uni_all.append(unimodal.float().transpose(0, 1))  # [B, M, C]: samples first
            labels_all.append(labels)
            index_all.append(batch["index"])
        columns = [fused_all, uni_all, labels_all, [i.to(self.device) for i in index_all]]
        if features:  # (one column per modality: each gathered like the logits)
            columns += [[f[m] for f in features_all] for m in range(len(self.modalities))]
        fused, unimodal, labels, rows, *feats = self.gather_rows(split, index_all, *columns)
        return (fused, unimodal.transpose(0, 1), labels) + ((feats,) if features else ()) + ((rows,) if index else ())

    @torch.no_grad()
    def coalition_outputs(self, split: str, zeroing: str = "features"):
        """(fused [2^M, N, C], labels [N], clip index [N]) on every readable sample of `split`: the
        fused logits of each coalition of modalities (mmfast/valuation.py: row k holds the
        modalities of bitmask k, the others absent), from one pass that decodes each clip once.
        zeroing="features": each batch is encoded once and the head runs on every coalition's
        features; "inputs": each encoder also encodes zeros (independent encoders), or the
        whole model runs on every coalition's inputs (encoders that exchange features)."""
        from .valuation import ZEROINGS, coalition_logits, coalition_masks

        if zeroing not in ZEROINGS:
            raise ValueError(f"zeroing must be one of {ZEROINGS}, got {zeroing!r}")
        if zeroing == "features" and self.model.fused_representation:
            raise ValueError(f"fusion {self.steps.fusion!r} fuses inside the encoders: its features cannot be "
                             f"zeroed one modality at a time; value the modalities with zeroing='inputs'")
        loader = self.loaders[split]
        self.model.eval()
        M = len(self.modalities)
        K = 2 ** M
        subsets = [tuple(m for m, p in zip(self.modalities, row) if p) for row in coalition_masks(M).tolist()]
        skip = self.balancer.unused_modalities if self.balancer is not None else ()
        fused_all, labels_all, index_all = [], [], []
        for batch in loader:
            inputs, labels = self.steps.inputs(batch)
            B = labels.shape[0]
            with self.steps.autocast():
                if zeroing == "inputs" and self.model.exchanges_features:  # (the whole model per coalition)
                    fused = self.steps.rerun(inputs, subsets)
                else:
                    present = self.model.encode(inputs, skip=skip)
                    # (zeroed inputs: the modalities' tensors; a features modality's mask stays)
                    absent = (None if zeroing == "features" else
                              self.model.encode({k: torch.zeros_like(x) if k in self.modalities else x
                                                 for k, x in inputs.items()}, skip=skip))
                    # (every coalition's features as one batch [K * B, d_m]: one head call)
                    fused = coalition_logits(self.model.head, present, absent, chunk=B)
            fused_all.append(fused.float().view(K, B, -1).transpose(0, 1))  # [B, K, C]: samples first
            labels_all.append(labels)
            index_all.append(batch["index"])
        fused, labels, index = self.gather_rows(split, index_all, fused_all, labels_all,
                                                [i.to(self.device) for i in index_all])
        return fused.transpose(0, 1), labels, index

    def shapley(self, split: str, zeroing: str = "features") -> dict:
        """Each modality's Shapley value of the fused accuracy on `split`, overall and per class,
        the accuracy of every coalition, and each sample's values (mmfast/valuation.py)."""
        from .valuation import class_values, coalition_masks, coalition_name, sample_values, shapley_values, \
            split_values

        loader_name = self.evaluation_split(split)  # (the training split through evaluation transforms)
        fused, labels, index = self.coalition_outputs(loader_name, zeroing)
        if not torch.isfinite(fused).all():
            raise NonFiniteError(f"the model's outputs on split {split!r} are non-finite ({self.context()})")
        names = self.modalities
        overall = split_values(fused, labels)
        per_class = shapley_values(class_values(fused, labels, len(self.classes)))
        per_sample = shapley_values(sample_values(fused, labels))
        masks = coalition_masks(len(names))
        return {"split": split, "zeroing": zeroing, "samples": len(labels),
                "coalitions": {coalition_name(mask, names): float(v) for mask, v in zip(masks, overall)},
                "values": dict(zip(names, shapley_values(overall).tolist())),
                "per_class": {name: {c: (None if math.isnan(v) else v) for c, v in zip(self.classes, row.tolist())}
                              for name, row in zip(names, per_class)},
                "per_sample": {"clip": [self.loaders[loader_name].clips[i].clip_id for i in index.tolist()],
                               "label": labels.tolist(),
                               **{name: row.tolist() for name, row in zip(names, per_sample)}}}

    @torch.no_grad()
    def encoder_features(self, split: str):
        """Frozen features of every encoder on `split` (evaluation transforms), and the labels."""
        self.model.eval()
        feats = {name: [] for name in self.modalities}
        labels, index = [], []
        for batch in self.loaders[split]:
            inputs, y = self.steps.inputs(batch)
            for name, f in zip(self.modalities, self.model.encode(inputs)):
                feats[name].append(f.float())
            labels.append(y)
            index.append(batch["index"])
        *features, labels = self.gather_rows(split, index, *feats.values(), labels)
        return dict(zip(feats, features)), labels

    def linear_probe(self, train_split: str = "train", test_split: str = "test") -> dict[str, float]:
        """The papers' linear probe of each encoder (frozen features, fresh linear classifier)."""
        train_x, train_y = self.encoder_features(self.evaluation_split(train_split))
        test_x, test_y = self.encoder_features(test_split)
        return {f"probe/acc/{name}": linear_probe_accuracy(train_x[name], train_y, test_x[name], test_y, seed=self.seed)
                for name in self.modalities}

    def gather_rows(self, split: str, index: list, *columns: list) -> list:
        """An evaluation pass's rows (per-batch device tensors, samples along dim 0) on the host:
        with every rank's rows in a distributed run, in the split's order (clip index), as one
        process has them."""
        cat = lambda parts: torch.cat(parts) if parts else None  # noqa: E731
        if self.dist.enabled:  # (gathered on the device: NCCL moves device tensors only)
            order = self.dist.gather_rows(cat([i.to(self.device) for i in index]))
            order = None if order is None else torch.argsort(order)
            columns = [self.dist.gather_rows(cat(c)) for c in columns]
            columns = [c if c is None else c[order] for c in columns]
        else:
            columns = [cat(c) for c in columns]
        if columns[0] is None:
            loader = self.loaders[split]
            raise RuntimeError(f"split {split!r}: no clip could be decoded in this pass "
                               f"({loader.last_epoch_skipped.summary()})")
        return [c.cpu() for c in columns]
