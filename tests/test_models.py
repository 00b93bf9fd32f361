import torch

from mmfast.models import resnet18_encoder


def test_resnet18_encoder_shape_and_size(gen):
    enc = resnet18_encoder(3)
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in its 1000-way classifier.
    assert sum(p.numel() for p in enc.parameters()) == 11_689_512 - 513_000
    assert sum(1 for p in enc.parameters() if p.dim() == 4) == 20
    x = torch.randn(2, 3, 64, 96, generator=gen)
    assert enc(x).shape == (2, 512, 2, 3)
    audio = resnet18_encoder(1)
    assert audio(torch.randn(1, 1, 257, 188, generator=gen)).shape == (1, 512, 9, 6)
