"""LoRA: low-rank adapters (through the ``peft`` library) and the head train; every pretrained weight stays frozen.

Each adapted linear layer ``W`` computes ``W x + (alpha / rank) B A dropout(x)``, ``A`` random,
``B`` zero, so training starts from the pretrained network exactly (Hu et al., "LoRA: Low-Rank
Adaptation of Large Language Models", ICLR 2022). Adapted layers: a text encoder's attention
layers that PEFT targets by default for its model type (query and value for BERT-style
encoders, e.g. ``minilm-l6``), or the fused ``qkv`` projections of a timm ViT (``timm:vit_*``).

``head="lp"`` starts from the linear probe's head, fitted on cached features of the *pretrained*
backbone: LP-FT's idea applied to adapters. After training the adapters are merged into the
weights, so the saved model has the pretrained architecture and reloads like an FT run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lpft.backbones.base import Backbone
from lpft.backbones.hf_text import HFTextEncoder
from lpft.backbones.timm_backbone import TimmBackbone
from lpft.config import setting
from lpft.data.task import Task
from lpft.errors import BackboneError, ConfigError
from lpft.methods.base import MethodResult, register_method
from lpft.methods.finetuning import HeadChoiceConfig, HeadChoiceFineTuning
from lpft.training import Classifier, FastPath, FinetuneConfig
from lpft.training.config import PAPER_FINETUNE
from lpft.training.loop import optimizer_for

log = logging.getLogger(__name__)

ADAPTER = "default"  # peft's name for the one adapter a model carries
SUPPORTED = ("text encoders whose model type PEFT has LoRA targets for (minilm-l6, hf:<path> with e.g. bert, roberta, "
             "xlm-roberta, electra, deberta-v2: their attention query/value layers) and timm ViTs (timm:vit_*: their "
             "attention qkv layers)")


@dataclass
class LoRAConfig(HeadChoiceConfig):
    """FT's loop settings plus the adapters' shape; AdamW and a higher learning-rate grid than full FT.

    Only the adapters and the head train, starting from the pretrained function, so LoRA takes
    higher learning rates than full fine-tuning with AdamW would.
    """

    optimizer: str = setting("adamw", "optimiser", choices=("sgd", "adamw"))
    rank: int = setting(8, "LoRA rank r: each adapted layer adds B A, with A of r x inputs and B of outputs x r",
                        minimum=1)
    alpha: float = setting(16.0, "LoRA alpha (peft's lora_alpha): the adapters' update is scaled by alpha / rank",
                           above=0.0)
    dropout: float = setting(0.1, "dropout on the adapters' input (peft's lora_dropout), in [0, 1)", minimum=0.0)

    default_grid: ClassVar[dict[str, Any]] = {
        **PAPER_FINETUNE, "optimizer": "adamw", "lr": [1e-4, 3e-4, 1e-3, 3e-3], "rank": [4, 8, 16],
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout >= 1.0:
            raise ConfigError(f"dropout ({type(self).__name__}) must be < 1, got {self.dropout!r}")


def lora_targets(backbone: Backbone) -> tuple[str, list[str] | str]:
    """The backbone attribute holding the network to adapt, and the module names (or pattern) LoRA targets there.

    Raises :class:`BackboneError` naming what LoRA supports for any other backbone (a CNN, a
    torchvision ViT whose attention has no separate linear layers, an unknown text model).
    """
    if isinstance(backbone, HFTextEncoder):
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        model_type = backbone.encoder.config.model_type
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if targets is None:
            raise BackboneError(f"LoRA cannot adapt {backbone.name!r}: PEFT has no LoRA targets for model type "
                                f"{model_type!r}. LoRA supports {SUPPORTED}.")
        return "encoder", targets
    if isinstance(backbone, TimmBackbone):
        from timm.layers import Attention
        from timm.models.vision_transformer import VisionTransformer

        # timm's ViT Attention calls self.qkv(x), so an adapter wrapped around qkv is on the forward path
        if isinstance(backbone.net, VisionTransformer) and any(
                isinstance(m, Attention) and isinstance(m.qkv, nn.Linear) for m in backbone.net.modules()):
            return "net", ["qkv"]
    raise BackboneError(f"LoRA cannot adapt {backbone.name!r}; it supports {SUPPORTED}. "
                        "Choose one of those backbones, or use --method ft / lpft.")


@register_method("lora", label="LoRA")
class LoRA(HeadChoiceFineTuning):
    """Inject LoRA adapters into a copy of the backbone; train adapters and head with FT's loop."""

    config_class = LoRAConfig
    config: LoRAConfig

    def initial_model(self, task: Task, backbone: Backbone, device: torch.device) -> tuple[Classifier, dict]:
        """FT's start (a deep copy of ``backbone`` and the head), then adapters injected into that copy only."""
        _require_peft()
        from peft import LoraConfig, LoraModel

        attribute, targets = lora_targets(backbone)  # before the LP stage: an unsupported backbone fails at once
        model, selected = super().initial_model(task, backbone, device)
        peft_config = LoraConfig(r=self.config.rank, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                                 target_modules=targets, bias="none")
        torch.manual_seed(self.config.seed)  # the adapters' random A, reproducibly
        # the tuner wraps the network in place of it, so merge_and_unload can find it after training
        setattr(model.backbone, attribute, LoraModel(getattr(model.backbone, attribute), peft_config, ADAPTER))
        adapters = sum(p.numel() for p in adapter_parameters(model))
        log.info("LoRA: rank %d, alpha %g on %s of %s: %d adapter parameters (%.2f%% of the backbone)",
                 self.config.rank, self.config.alpha, targets, backbone.name, adapters,
                 100 * adapters / sum(p.numel() for p in backbone.parameters()))
        return model, selected

    def make_optimizer(self, model: Classifier, config: FinetuneConfig, fast: FastPath) -> torch.optim.Optimizer:
        """The configured optimiser over the adapters and the head only: every pretrained weight stays frozen."""
        return optimizer_for(config, fast, adapter_parameters(model) + list(model.head.parameters()))

    def fit(self, task: Task, backbone: Backbone, device: torch.device) -> MethodResult:
        """FT's fit from the adapted copy; the returned model has the adapters merged into its weights."""
        result = super().fit(task, backbone, device)
        result.diagnostics["adapter_parameters"] = sum(p.numel() for p in adapter_parameters(result.model))
        merge_adapters(result.model)
        for p, source in zip(result.model.backbone.parameters(), backbone.parameters(), strict=True):
            p.requires_grad_(source.requires_grad)  # peft froze the copy's weights; the merged one is as given
        return result


def merge_adapters(model: Classifier) -> None:
    """Fold the trained adapters into the weights (``W + (alpha / rank) B A``) and remove them, in place.

    The model then has the pretrained backbone's architecture, so a saved run reloads and
    predicts without peft; its logits equal the adapted model's up to float rounding.
    """
    from peft import LoraModel

    for name, child in list(model.backbone.named_children()):
        if isinstance(child, LoraModel):
            setattr(model.backbone, name, child.merge_and_unload())


def _require_peft() -> None:
    """A clear error, with the install command, when peft is missing (it is an optional dependency)."""
    try:
        import peft  # noqa: F401
    except ImportError as exc:
        raise ConfigError("method lora needs the package `peft`: pip install \"lpft[lora]\" (or pip install peft)") from exc


def adapter_parameters(model: Classifier) -> list[nn.Parameter]:
    """The LoRA parameters of ``model``'s backbone: peft leaves only those trainable after injection."""
    return [p for p in model.backbone.parameters() if p.requires_grad]
