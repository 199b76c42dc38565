"""Backbone specifics: fingerprints, weights files, errors (the shared contract is in test_contracts.py)."""

from __future__ import annotations

import pytest
import torch

from lpft.backbones import BackboneError, create_backbone

def test_pretrained_weights_give_a_stable_fingerprint_that_tracks_resolution():
    a = create_backbone("efficientnet-lite0", image_size=32)
    assert a.fingerprint == create_backbone("efficientnet-lite0", image_size=32).fingerprint
    assert a.fingerprint != create_backbone("efficientnet-lite0", image_size=64).fingerprint
    assert a.fingerprint != create_backbone("efficientnet-lite0", image_size=32, weights="random").fingerprint


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18", "hf:no-such-model-anywhere"])
def test_missing_weights_say_how_to_provide_them(name):
    with pytest.raises(BackboneError, match="download"):
        create_backbone(name)


def test_local_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    source = create_backbone("timm:resnet18", weights="random")
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(path))
    loaded = create_backbone("timm:resnet18", weights=str(path))
    for (k, v), w in zip(source.net.state_dict().items(), loaded.net.state_dict().values()):
        assert torch.equal(v, w), k


def test_unknown_backbone():
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("resnet-9000")


def test_timm_transformer_follows_the_image_size():
    """A ViT's patch grid is fixed at its native size; at another --image-size it must still run, not just resize."""
    import numpy as np

    backbone = create_backbone("timm:test_vit", weights="random", image_size=64).eval()
    batch = backbone.preprocess(np.zeros((2, 40, 40, 3), dtype=np.uint8))
    assert batch.shape[-2:] == (64, 64)
    with torch.no_grad():
        assert backbone.features(batch).shape == (2, backbone.feature_dim)
