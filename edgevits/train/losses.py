"""Losses: soft-target cross-entropy (label smoothing, mixup) and DeiT distillation through the student's
distillation head."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against soft targets ``target`` (B, num_classes)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class DistillationLoss(nn.Module):
    """DeiT's loss. The student returns ``(cls, dist)`` logits in training; the class head learns the (mixed,
    smoothed) labels, the distillation head learns the teacher:

    * ``hard``: cross-entropy of ``dist`` against the teacher's top-1 class;
    * ``soft``: KL(teacher / tau || dist / tau) x tau^2;
    * ``none`` (no teacher): both heads learn the labels (their mean is what evaluation uses).

    ``loss = (1 - alpha) * label_loss + alpha * distillation_loss``. The teacher runs in eval mode without gradients.
    """

    def __init__(self, teacher: nn.Module | None = None, kind: str = "none", alpha: float = 0.5, tau: float = 1.0,
                 teacher_size: int | None = None):
        super().__init__()
        if kind not in ("hard", "soft", "none"):
            raise ValueError(f"distillation must be hard, soft or none, got {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError(f"{kind} distillation needs a teacher")
        self.kind, self.alpha, self.tau, self.teacher_size = kind, alpha, tau, teacher_size
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None and kind != "none" else None

    def train(self, mode: bool = True):  # the teacher stays in eval mode
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.teacher_size and images.shape[-1] != self.teacher_size:
            images = F.interpolate(images, size=(self.teacher_size, self.teacher_size), mode="bicubic",
                                   align_corners=False)
        out = self.teacher(images)
        return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out

    def forward(self, images: torch.Tensor, outputs, target: torch.Tensor) -> torch.Tensor:
        """``outputs``: the student's logits or ``(cls, dist)``; ``target``: soft targets (B, num_classes)."""
        if not isinstance(outputs, tuple):
            if self.kind != "none":
                raise ValueError("distillation needs a student built with distillation=True (two heads)")
            return soft_cross_entropy(outputs, target)
        cls, dist = outputs
        if self.kind == "none":
            return (soft_cross_entropy(cls, target) + soft_cross_entropy(dist, target)) / 2
        base = soft_cross_entropy(cls, target)
        teacher = self.teacher_logits(images).float()
        if self.kind == "soft":
            t = self.tau
            kd = F.kl_div(F.log_softmax(dist.float() / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                          reduction="sum", log_target=True) * (t * t) / dist.numel()
        else:
            kd = F.cross_entropy(dist.float(), teacher.argmax(dim=-1))
        return base * (1 - self.alpha) + kd * self.alpha
