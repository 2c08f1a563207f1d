"""Quantization-aware LoRA fine-tuning of packed models, ending in a fully quantized model.

    lpq.finetune.finetune(quant_dir, data, out, steps=..., optim="solo", state_bits=3)

qat.py: the trainable layer (frozen codes, LoRA, learned step sizes); merge.py: back to packed
layers; solo.py: the low-bit-state optimizer; train.py: the loop, checkpoints and resume, the
distillation loss from an unquantized teacher (``distill=``, :func:`distill_loss`), and data-parallel or
sharded (``fsdp=True``: FSDP2, per-process checkpoints, merged on the main process) runs under accelerate.
"""

from .merge import merge_qat, save_merged
from .qat import QATLinear, prepare_qat, qat_layers, trainable_parameters
from .solo import SOLO
from .train import DISTILL_ALPHA, FinetuneConfig, FinetuneResult, distill_loss, end_distributed, finetune, train_qat

__all__ = ["DISTILL_ALPHA", "FinetuneConfig", "FinetuneResult", "QATLinear", "SOLO", "distill_loss", "end_distributed", "finetune",
           "merge_qat", "prepare_qat", "qat_layers", "save_merged", "train_qat", "trainable_parameters"]
