"""Evaluation metrics (the papers' metrics, docs/methods/README.md): accuracy, macro-F1 and mAP (mean over
classes of scikit-learn's average precision on softmax scores), for the fused logits and for each
modality's uni-modal estimate; and the papers' linear probe: freeze an encoder, fit a fresh linear
classifier on its training features, report its test accuracy."""
from __future__ import annotations

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
