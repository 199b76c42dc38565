"""WiSE-FT (Wortsman et al., CVPR 2022): the weight-space ensemble of the start and the tuned model.

``theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_tuned``, where ``theta_0`` is the
pretrained backbone with the linear probe's head (the role the zero-shot model plays in the
paper) and ``theta_tuned`` is what FT or LP-FT (``tune``) reaches on the same task. The network
is trained once; every alpha of a fixed grid is then scored on every evaluated split, alpha is
chosen on ID-validation accuracy alone, and the whole curve is recorded with the run in
``diagnostics["wise_curve"]``. See docs/methods.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from lpft.backbones.base import Backbone
from lpft.config import setting
from lpft.data.splits import ID_VAL
from lpft.data.task import Task
from lpft.data.loader import SplitData
from lpft.methods.base import Method, MethodResult, register_method
from lpft.methods.finetuning import FineTuning, LinearProbeThenFineTune, LPFTConfig
from lpft.methods.linear_probe import fit_linear_probe
from lpft.training import Classifier, predict_logits, resolve_fast_path

log = logging.getLogger(__name__)

# the methods that can produce theta_tuned, by their registered names
TUNED_BY: dict[str, type[FineTuning]] = {"lpft": LinearProbeThenFineTune, "ft": FineTuning}
AlphaCallback = Callable[[float, dict[str, np.ndarray]], None]  # (alpha, logits per split), for tests and diagnostics


@dataclass
class WiseFTConfig(LPFTConfig):
    """FT's settings for the tuned run, which method tunes, and the grid of alphas.

    The default sweep grid is LP-FT's (the paper's protocol at 10x lower learning rates), as
    ``tune`` defaults to LP-FT; with ``tune: ft`` a spec should give FT's learning rates
    (``PAPER_FINETUNE["lr"]``).
    """

    tune: str = setting("lpft", "WiSE-FT: the method that produces theta_tuned, interpolated towards from the LP start",
                        choices=tuple(TUNED_BY))
    alpha_steps: int = setting(10, "WiSE-FT alpha grid: i / alpha_steps for i = 0..alpha_steps (10: 0, 0.1, ..., 1)",
                               minimum=1)

    default_grid: ClassVar[dict[str, Any]] = LPFTConfig.default_grid

    def alphas(self) -> list[float]:
        """The grid, ascending, from theta_0 (0) to theta_tuned (1)."""
        return [i / self.alpha_steps for i in range(self.alpha_steps + 1)]


def interpolate(
    start: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * start + alpha * tuned`` for every floating-point entry of two state dicts.

    That covers parameters and float buffers (BatchNorm's running mean and variance); other
    entries (integer buffers such as ``num_batches_tracked``) are taken from ``tuned``. The
    result is on ``tuned``'s devices and dtypes, and exact at both ends (``torch.lerp``).
    """
    if start.keys() != tuned.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(start.keys() ^ tuned.keys())[:5]}")
    out = {}
    for key, end in tuned.items():
        if end.is_floating_point():
            dtype = torch.promote_types(end.dtype, torch.float32)  # half-precision entries mix in fp32
            out[key] = torch.lerp(start[key].to(end.device, dtype), end.to(dtype), alpha).to(end.dtype)
        else:
            out[key] = end
    return out


@register_method("wise-ft", label="WiSE-FT")
class WiseFT(Method):
    """Tune once (FT or LP-FT), then pick the interpolation with the LP start that is best on ID validation."""

    config_class = WiseFTConfig
    config: WiseFTConfig
    after_alpha: AlphaCallback | None = None  # sees every alpha's logits on every split

    def tuned_method(self) -> FineTuning:
        """The FT or LP-FT method that produces theta_tuned, with this config's fine-tuning settings."""
        cls = TUNED_BY[self.config.tune]
        settings = cls.config_class.settings()
        return cls(cls.config_class(**{k: v for k, v in self.config.to_dict().items() if k in settings}))

    def fit(self, task: Task, backbone: Backbone, device: torch.device) -> MethodResult:
        """Fit the probe (theta_0's head), tune once, score every alpha on every split, keep the best on id_val."""
        probe, _ = fit_linear_probe(task, backbone, device)
        start = Classifier(backbone, task.num_classes)  # theta_0: the given backbone itself, only read
        start.set_head(probe.coef_, probe.intercept_)
        tuned = self.tuned_method().fit(task, backbone, device)
        assert tuned.model is not None, "FT and LP-FT return their network"
        model = tuned.model
        start_state = start.state_dict()
        tuned_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

        fast = resolve_fast_path(self.config, model.backbone, device)  # the tuned run's autocast and layout
        evals = {key: SplitData(model.backbone, split) for key, split in task.eval_splits()}
        curve: list[dict[str, Any]] = []
        best: dict[str, Any] = {}
        logits: dict[str, np.ndarray] = {}
        for alpha in self.config.alphas():
            model.load_state_dict(interpolate(start_state, tuned_state, alpha))
            scores = {k: predict_logits(model, d, device, self.config.eval_batch_size, fast) for k, d in evals.items()}
            accuracy = {k: float((v.argmax(1) == evals[k].split.labels).mean()) for k, v in scores.items()}
            curve.append({"alpha": alpha, "accuracy": accuracy})
            log.info("WiSE-FT alpha %.3g: %s", alpha, "  ".join(f"{k} {a:.4f}" for k, a in accuracy.items()))
            if self.after_alpha is not None:
                self.after_alpha(alpha, scores)
            # ID validation alone decides; strict, so a tie keeps the smaller alpha (nearer theta_0)
            if not best or accuracy[ID_VAL] > best["accuracy"][ID_VAL]:
                best, logits = curve[-1], scores
        alpha = best["alpha"]
        model.load_state_dict(interpolate(start_state, tuned_state, alpha))
        model.eval()
        log.info("WiSE-FT: alpha %.3g chosen on %s (accuracy %.4f; theta_0 %.4f, %s %.4f)", alpha, ID_VAL,
                 best["accuracy"][ID_VAL], curve[0]["accuracy"][ID_VAL], self.config.tune,
                 curve[-1]["accuracy"][ID_VAL])
        return MethodResult(
            logits=logits,
            selected={"alpha": alpha, "epoch": tuned.selected["epoch"], "lp_C": float(probe.best_C_)},
            history=tuned_history(tuned.history),
            model=model,
            tuned_backbone=alpha > 0,
            diagnostics={**tuned.diagnostics, "wise_curve": curve},
        )


def tuned_history(history: list[dict]) -> list[dict]:
    """The tuned run's per-epoch rows, their ``epoch`` renamed ``tuned_epoch``.

    Selection rules read rows keyed ``epoch`` as a trial's own candidates; an epoch of the
    tuned run is not a WiSE-FT model, so under that key a report would show the tuned run's
    accuracies as WiSE-FT's. Renamed, a rule sees the run's one result (as for LP).
    """
    return [{"tuned_epoch": row["epoch"], **{k: v for k, v in row.items() if k != "epoch"}} for row in history]
