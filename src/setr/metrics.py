"""Segmentation metrics on a torchmetrics confusion matrix (correct under DDP: states are summed).

aAcc (pixel accuracy), mIoU and mAcc (means over classes present in the labels or predictions, as
mmsegmentation's nanmean), per-class IoU and accuracy.
"""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from setr.values import IGNORE_INDEX


class SegMetrics(MulticlassConfusionMatrix):
    """``update(preds, target)`` with preds as class ids ``(B, H, W)`` (or logits ``(B, C, H, W)``);
    ``compute()`` returns a dict of scalar tensors plus ``iou`` and ``acc`` vectors (NaN for absent classes) and
    ``confmat``, the pixel counts they come from. Under DDP ``compute()`` sees the matrix summed over processes
    (torchmetrics syncs around it, then restores each process's shard): ``confmat`` is that all-reduced matrix,
    and the result stays cached until the next ``update`` or ``reset``."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, validate_args=False, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(1)
        super().update(preds, target)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {**scores_from_confusion(self.confmat), "confmat": self.confmat.detach().clone()}


def scores_from_confusion(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores from a confusion matrix ``confmat[target, pred]`` of pixel counts."""
    cm = confmat.double()
    tp = cm.diag()
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = gt.sum()
    return {
        "aAcc": (tp.sum() / total) if total > 0 else torch.tensor(float("nan"), dtype=torch.float64),
        "mIoU": torch.nanmean(iou),
        "mAcc": torch.nanmean(acc),
        "iou": iou,
        "acc": acc,
    }
