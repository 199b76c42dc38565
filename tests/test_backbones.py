"""Every registered backbone honours the contract (as timm tests every model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lpft.backbones import Backbone, BackboneError, create_backbone

IMAGE_BACKBONES = [
    ("efficientnet-lite0", {"image_size": 32}),
    ("timm:resnet18", {"weights": "random", "image_size": 32}),
    ("torchvision:resnet18", {"weights": "random", "image_size": 32}),
]


@pytest.mark.parametrize("name,options", IMAGE_BACKBONES)
def test_image_backbone_contract(name, options):
    backbone = create_backbone(name, **options)
    assert isinstance(backbone, Backbone) and backbone.modality == "image"
    images = np.random.default_rng(0).integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)
    batch = backbone.preprocess(images)
    assert batch.shape == (3, 3, 32, 32)
    backbone.eval()
    with torch.no_grad():
        feats = backbone.features(batch)
    assert feats.shape == (3, backbone.feature_dim) and torch.isfinite(feats).all()
    assert backbone.trainable_parameters(), "fine-tuning needs parameters to train"
    torch.manual_seed(0)
    first = create_backbone(name, **options).fingerprint
    torch.manual_seed(0)
    assert create_backbone(name, **options).fingerprint == first, "same weights, same fingerprint"


def test_text_backbone_contract():
    backbone = create_backbone("minilm-l6")
    assert backbone.modality == "text" and backbone.feature_dim == 384
    batch = backbone.preprocess(["a short one", "a somewhat longer sentence about the weather today"])
    backbone.eval()
    with torch.no_grad():
        feats = backbone.features(batch)
        alone = backbone.features(backbone.preprocess(["a short one"]))
    assert feats.shape == (2, 384)
    # mean pooling ignores padding: the short sentence's features do not depend on its batch-mates
    torch.testing.assert_close(feats[0], alone[0], atol=1e-5, rtol=1e-4)
    assert create_backbone("minilm-l6").fingerprint == backbone.fingerprint


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
