"""The training objectives (REFERENCE.md "Training"), on per-document yes/no logits.

Inputs are ``z_yes, z_no: [G, K]`` (group g's positive in column 0, negatives after it) and a
``mask: [G, K]`` of real documents (groups may have fewer negatives). ``s = z_yes - z_no``.

- SFT: ``-log sigmoid(s_0) - sum_i log sigmoid(-s_i)`` per group.
- CL: InfoNCE over the group with ``z_yes`` as the score.
- URL: ``-(w_0 * D(h_0) - sum_i w_i * D(h_i))`` with the weights detached, so the gradient with
  respect to each document's hidden state is exactly weight x direction. Weights: ``sft``
  (``1 - sigmoid(s_0)``, ``sigmoid(s_i)``), ``cl`` (``1 - softmax_0``, ``softmax_i`` over z_yes),
  ``base`` (1), ``base_tau`` (1, but 0 once ``sigmoid(s_0) > 1 - tau`` or ``sigmoid(s_i) < tau``).
  Directions: ``sft`` (``M_yes - M_no``, i.e. D = s) or ``cl`` (``M_yes``, i.e. D = z_yes).
  URL(sft, sft) has SFT's gradient and URL(cl, cl) has CL's (tested).
All losses are means over groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTS = ("sft", "cl", "base", "base_tau")
DIRECTIONS = ("sft", "cl")


def sft_loss(z_yes: torch.Tensor, z_no: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    s = z_yes - z_no
    per_doc = torch.where(torch.arange(s.shape[1], device=s.device) == 0, -F.logsigmoid(s), -F.logsigmoid(-s))
    return (per_doc * mask).sum(1).mean()


def cl_loss(z_yes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = z_yes.masked_fill(~mask, float("-inf"))
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


def url_weights(z_yes: torch.Tensor, z_no: torch.Tensor, mask: torch.Tensor, weight: str, tau: float) -> torch.Tensor:
    """Per-document weights [G, K] (positive in column 0), detached."""
    with torch.no_grad():
        p = torch.sigmoid(z_yes - z_no)
        if weight == "sft":
            w = torch.cat([1 - p[:, :1], p[:, 1:]], dim=1)
        elif weight == "cl":
            soft = torch.softmax(z_yes.masked_fill(~mask, float("-inf")), dim=1)
            w = torch.cat([1 - soft[:, :1], soft[:, 1:]], dim=1)
        elif weight == "base":
            w = torch.ones_like(p)
        elif weight == "base_tau":
            keep = torch.cat([p[:, :1] <= 1 - tau, p[:, 1:] >= tau], dim=1)
            w = keep.to(p.dtype)
        else:
            raise ValueError(f"unknown URL weight {weight!r}; expected one of {WEIGHTS}")
        return w * mask


def url_loss(z_yes: torch.Tensor, z_no: torch.Tensor, mask: torch.Tensor, weight: str, direction: str,
             tau: float = 0.1) -> torch.Tensor:
    w = url_weights(z_yes, z_no, mask, weight, tau)
    if direction == "sft":
        d = z_yes - z_no
    elif direction == "cl":
        d = z_yes
    else:
        raise ValueError(f"unknown URL direction {direction!r}; expected one of {DIRECTIONS}")
    sign = torch.ones_like(d)
    sign[:, 1:] = -1.0
    return -(w * sign * d).sum(1).mean()


def objective_loss(objective: str, z_yes, z_no, mask, url_weight: str = "sft", url_direction: str = "sft",
                   tau: float = 0.1) -> torch.Tensor:
    if objective == "sft":
        return sft_loss(z_yes, z_no, mask)
    if objective == "cl":
        return cl_loss(z_yes, mask)
    if objective == "url":
        return url_loss(z_yes, z_no, mask, url_weight, url_direction, tau)
    raise ValueError(f"unknown objective {objective!r}; expected sft, cl or url")
