"""Any timm image model as a backbone: pooled pre-logits features."""

from __future__ import annotations

from lpft.backbones.base import CROP_PCT, BackboneError, Block, PooledImageBackbone, load_weights_file, name_blocks
from lpft.backbones.registry import register_backbone


class TimmBackbone(PooledImageBackbone):
    """``timm.create_model(name, num_classes=0)``; weights from a local file, ``"random"`` or ``"download"``."""

    def __init__(self, model: str, weights: str | None = None, image_size: int | None = None) -> None:
        import timm

        if weights is None:
            raise BackboneError(
                f"timm:{model} has no bundled weights and nothing is downloaded unless asked. Pass "
                "weights=/path/to/model.safetensors (or a torch state dict), weights='download' to fetch "
                "the pretrained weights, or weights='random' for an untrained network."
            )
        net = _create(timm, model, weights == "download", image_size)
        if weights not in {"download", "random"}:
            state = load_weights_file(weights)
            state = {k: v for k, v in state.items() if not k.startswith(_classifier_prefixes(net))}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise BackboneError(f"{weights}: does not match timm:{model} (missing {missing[:3]}, unexpected {unexpected[:3]})")
        cfg = timm.data.resolve_data_config({}, model=net)
        super().__init__(image_size or cfg["input_size"][-1], cfg["mean"], cfg["std"])
        self.interpolation, self.crop_pct = cfg.get("interpolation", "bilinear"), cfg.get("crop_pct", CROP_PCT)
        self.name = f"timm:{model}"
        self.net = net
        self.feature_dim = int(net.num_features)
        self._identify_weights(weights)

    def blocks(self) -> list[Block]:
        """timm's own fine-grained grouping (``group_matcher``, what timm's layer decay uses), else the default."""
        from timm.models import group_parameters

        matcher = getattr(self.net, "group_matcher", None)
        try:
            groups = group_parameters(self.net, matcher(coarse=False)) if matcher is not None else None
        except NotImplementedError:
            groups = None
        if not groups:
            return super().blocks()
        named = dict(self.named_trainable_parameters())
        grouped = [[(f"net.{n}", named[f"net.{n}"]) for n in names if f"net.{n}" in named]
                   for _, names in sorted(groups.items())]
        return name_blocks([g for g in grouped if g], list(named))


def _create(timm, model: str, pretrained: bool, image_size: int | None):
    """The timm model; at a given ``image_size``, transformers with a fixed patch grid get a dynamic
    one (position embeddings interpolated), since a resize alone would not fit them. CNNs take any size."""
    if image_size is not None:
        try:
            return timm.create_model(model, pretrained=pretrained, num_classes=0, dynamic_img_size=True)
        except TypeError:  # not a patch-grid model: its constructor has no dynamic_img_size
            pass
    return timm.create_model(model, pretrained=pretrained, num_classes=0)


def _classifier_prefixes(net) -> tuple[str, ...]:
    name = net.default_cfg.get("classifier", "head")
    names = name if isinstance(name, (list, tuple)) else [name]
    return tuple(f"{n}." for n in names)


@register_backbone("timm", prefix=True)
def timm_backbone(model: str, **options) -> TimmBackbone:
    return TimmBackbone(model, **options)
