"""Recovery training for V:N:M-sparsified models (paper sections 3 and 4.3).

``recover_(model, data, method="fixed" | "srste" | "three_stage", teacher=dense)``
is the one-call entry point; the building blocks (``fix_masks_``, ``srste_``,
``lora_``, ``update_masks_``, ``merge_``, ``ThreeStageSchedule``) serve custom
training loops; ``AugmentedBatches`` feeds distillation new variations of its training text.
``recover_`` also trains models sharded with FSDP2 (``fully_shard``) with fixed masks (``distributed.py``:
shard-wise masks, ``torch.distributed.checkpoint`` checkpoints).
"""

from .augment import AugmentConfig, AugmentedBatches
from .data import length_bucketed_batches
from .distributed import SHARDED_METHODS
from .lora import LoRAHandle, LoRAWeight, lora_, lora_weight
from .losses import DistillLoss, masked_mse
from .masking import (
    MaskGuard,
    apply_masks_,
    dense_weight,
    fix_masks_,
    is_sharded,
    mask_like,
    merge_,
    recompute_mask,
    set_mask_,
    sparse_linears,
    update_masks_,
)
from .schedule import ThreeStageSchedule, srste_update_due
from .srste import SRSTEWeight, srste_, srste_grad
from .trainer import METHODS, RecoveryConfig, RecoveryResult, recover_

__all__ = [
    "recover_",
    "RecoveryConfig",
    "RecoveryResult",
    "METHODS",
    "SHARDED_METHODS",
    "is_sharded",
    "mask_like",
    "MaskGuard",
    "fix_masks_",
    "apply_masks_",
    "dense_weight",
    "recompute_mask",
    "update_masks_",
    "set_mask_",
    "merge_",
    "sparse_linears",
    "SRSTEWeight",
    "srste_",
    "srste_grad",
    "LoRAWeight",
    "LoRAHandle",
    "lora_",
    "lora_weight",
    "ThreeStageSchedule",
    "srste_update_due",
    "DistillLoss",
    "masked_mse",
    "length_bucketed_batches",
    "AugmentConfig",
    "AugmentedBatches",
]
