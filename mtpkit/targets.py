"""The one definition of what each draft head predicts.

Head k (1-based) at position t predicts token t + k + 1: the base model itself predicts
t + 1 from the hidden state of token t, head 1 the token after that, and so on. A
sequential head k is conditioned on token t + k (the token the previous predictor emitted).
"""

from __future__ import annotations

import torch


def target_offset(k: int) -> int:
    """How many positions ahead of t the token predicted by head k lies (0 is the base)."""
    return k + 1


def conditioning_offset(k: int) -> int:
    """Position of the token, relative to t, whose embedding sequential head k reads."""
    return k


def shift_left(ids: torch.Tensor, offset: int, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ids[:, t + offset], valid) for every t; positions past the end are filled and invalid."""
    shifted = torch.full_like(ids, fill)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    if offset < ids.shape[1]:
        shifted[:, : ids.shape[1] - offset] = ids[:, offset:]
        valid[:, : ids.shape[1] - offset] = True
    return shifted, valid


def head_targets(ids: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of head k at every position, and where they are valid (inside the sequence and the mask)."""
    targets, valid = shift_left(ids, target_offset(k))
    if mask is not None:
        shifted_mask, _ = shift_left(mask.to(torch.bool).long(), target_offset(k))
        valid &= shifted_mask.bool()
    return targets, valid


def conditioning_tokens(ids: torch.Tensor, k: int) -> torch.Tensor:
    """Token ids that sequential head k is teacher-forced with at every position."""
    return shift_left(ids, conditioning_offset(k))[0]
