"""What the peers' papers claim, on the embedded data: against joint training of the same data,
seed and schedule, the weak modality's encoder learns more (its linear probe) and the fused
prediction is better. Direction only, seeds fixed, the demo's dataset and schedule in fp32 (the
precision every CPU trains in). Only the methods whose effect the demo's study shows on
every seed on this data are asserted here (docs/demo.md has every method's three-seed numbers)."""
import pytest

from mmfast.config import load_config
from mmfast.data import generate
from mmfast.trainer import Trainer

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")

# method -> (hyper-parameters, the claims checked): "probe" the weak modality's linear probe,
# "fused" the fused test accuracy, each above joint's.
# (MMPareto, MSLR, ReconBoost and the others change direction with the training seed on this data
# in the study, or show no effect: a fixed-seed test of them would assert an accident.)
CLAIMS = {
    "mbsd": ({}, ("probe", "fused")),
    "mla": ({}, ("probe", "fused")),
    "resample": ({}, ("probe", "fused")),  # (the sample level: copies keeping the low-contributing modality)
}


@pytest.fixture(scope="module")
def audio_dominant(tmp_path_factory):
    """The demo's dataset (audio dominant), 480 clips."""
    return generate(tmp_path_factory.mktemp("behaviour") / "embedded_audio", clips=480, dominant="audio",
                    imbalance=2.5, seed=0)


def train(root, out, method, hparams=()):
    cfg = load_config("embedded", [f"data.root={root}", f"out={out}", f"method={method}", "seed=0", "precision=fp32",
                                   "progress=false", "data.num_workers=1", *hparams])
    trainer = Trainer(cfg)
    summary = trainer.fit()
    return {"fused": summary["test/acc"], "probe": trainer.linear_probe()["probe/acc/visual"]}


@pytest.fixture(scope="module")
def joint(audio_dominant, tmp_path_factory):
    return train(audio_dominant, tmp_path_factory.mktemp("joint") / "run", "joint")


@pytest.mark.parametrize("method", sorted(CLAIMS))
def test_the_weak_modality_learns_more_than_under_joint_training(audio_dominant, joint, tmp_path, method):
    hparams, claims = CLAIMS[method]
    got = train(audio_dominant, tmp_path / "run", method, [f"hparams.{k}={v}" for k, v in hparams.items()])
    for claim in claims:
        assert got[claim] > joint[claim], (method, claim, got, joint)
