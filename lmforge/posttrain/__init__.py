"""Post-training: preference losses (and, beside them, the SFT / reward / DPO loops that use them)."""

from lmforge.posttrain.losses import (
    DPOLossType,
    dpo_loss,
    reward_accuracy,
    reward_pair_loss,
    sequence_logps,
    simpo_loss,
)

__all__ = ["DPOLossType", "dpo_loss", "reward_accuracy", "reward_pair_loss", "sequence_logps", "simpo_loss"]
