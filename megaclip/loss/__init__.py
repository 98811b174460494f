"""Exact global-batch contrastive losses over the data-parallel group (chunked, O(b * chunk))."""

from megaclip.loss.common import DPComm
from megaclip.loss.contrastive import (
    ClipLossOutput,
    ContrastiveLoss,
    clip_loss,
    clip_loss_with_comm,
)
from megaclip.loss.siglip import SigLipLoss, siglip_loss, siglip_loss_with_comm

__all__ = [
    "ClipLossOutput",
    "ContrastiveLoss",
    "DPComm",
    "SigLipLoss",
    "clip_loss",
    "clip_loss_with_comm",
    "siglip_loss",
    "siglip_loss_with_comm",
]
