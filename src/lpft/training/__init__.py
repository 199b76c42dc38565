"""Fine-tuning: the settings, the network, the speed levers and the one training loop."""

from lpft.training.config import FinetuneConfig, auto_batch_size
from lpft.training.fastpath import FastPath, cpu_has_native_bf16, resolve_fast_path
from lpft.training.loop import FinetuneResult, StepCallback, finetune, predict_logits
from lpft.training.model import Classifier, set_batchnorm_mode

__all__ = [
    "Classifier", "FastPath", "FinetuneConfig", "FinetuneResult", "StepCallback", "auto_batch_size",
    "cpu_has_native_bf16", "finetune", "predict_logits", "resolve_fast_path", "set_batchnorm_mode",
]
