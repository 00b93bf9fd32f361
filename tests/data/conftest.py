"""The data tests' dataset: the embedded dataset, small, generated once per module."""
import pytest

from mmfast.data import generate

@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("synth") / "cremad", clips=24, seed=5, jpeg_frames=True)
