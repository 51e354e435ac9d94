"""PCL, the prompt-guided contrastive loss of Prompt-DAS, and the sampling of its contrastive points.

The decoder's prompt tokens and contrastive tokens are projected by φ (the model's ``projector``,
already applied in ``PromptDASOutput``). Per crop::

    prototype  = mean of the φ-embeddings of the crop's point prompts        (detached)
    queries    = φ-embeddings of contrastive points on (pseudo-)foreground   (gradient flows here only)
    negatives  = φ-embeddings of contrastive points on (pseudo-)background   (detached)
    loss(q)    = −log  exp(cos(q, prototype)/τ) / (exp(cos(q, prototype)/τ) + Σ_n exp(cos(q, n)/τ))
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from volseg.training.losses import Total, local

#: Label of a contrastive point: on foreground, on background, or padding (no point).
FOREGROUND, BACKGROUND, UNUSED = 1, 0, -1


def sample_contrastive_points(foreground: np.ndarray, background: np.ndarray, k: int, rng: np.random.Generator
                              ) -> tuple[np.ndarray, np.ndarray]:
    """``k`` points (y, x) from a ``Y×X`` crop: ``k // 2`` on ``foreground``, the rest on ``background``.

    Returns (``k×2`` float points, ``k`` int labels FOREGROUND/BACKGROUND/UNUSED). Pixels are drawn
    without replacement while there are enough, else with replacement; a class with no pixel leaves its
    share UNUSED (at (0, 0)), so crops without foreground or background add nothing to the loss.
    """
    points = np.zeros((k, 2))
    labels = np.full(k, UNUSED, dtype=np.int64)
    shares = ((foreground, k // 2, FOREGROUND), (background, k - k // 2, BACKGROUND))
    start = 0
    for mask, n, label in shares:
        where = np.argwhere(mask)
        if len(where) and n:
            pick = rng.choice(len(where), size=n, replace=len(where) < n)
            points[start : start + n] = where[pick]
            labels[start : start + n] = label
        start += n
    return points, labels


def prompt_contrastive_loss(prompt_embeddings: torch.Tensor | None, point_mask: torch.Tensor,
                            contrastive_embeddings: torch.Tensor | None, contrastive_labels: torch.Tensor,
                            temperature: float, total: Total = local) -> torch.Tensor:
    """Cosine InfoNCE of foreground queries against the prompt prototype, with background negatives.

    ``prompt_embeddings`` ``B×N×P`` with ``point_mask`` ``B×N``; ``contrastive_embeddings`` ``B×K×P``
    with ``contrastive_labels`` ``B×K`` (FOREGROUND / BACKGROUND / UNUSED). The loss of a crop is the
    mean over its queries; crops with no valid prompt, no query or no negative contribute 0, and the
    result is the mean over all ``B`` crops (0 when there are no prompts or contrastive points; ``total``
    sums the crops' losses and ``B`` over data-parallel replicas). Gradients reach only the queries.
    """
    count = float(contrastive_labels.shape[0])
    if prompt_embeddings is None or contrastive_embeddings is None:
        reference = contrastive_embeddings if contrastive_embeddings is not None else prompt_embeddings
        s = total(torch.tensor([0.0, count], device=None if reference is None else reference.device))
        return s[0] / s[1].clamp_min(1.0)
    prompts = F.normalize(prompt_embeddings.detach(), dim=-1)
    contrastive = F.normalize(contrastive_embeddings, dim=-1)
    loss_sum = contrastive.new_zeros(())
    for b in range(contrastive.shape[0]):
        valid = point_mask[b]
        queries = contrastive[b, contrastive_labels[b] == FOREGROUND]
        negatives = contrastive[b, contrastive_labels[b] == BACKGROUND].detach()
        if not valid.any() or len(queries) == 0 or len(negatives) == 0:
            continue
        prototype = F.normalize(prompts[b, valid].mean(0), dim=-1)
        positive = queries @ prototype / temperature  # Q
        negative = queries @ negatives.T / temperature  # Q×M
        logits = torch.cat([positive[:, None], negative], dim=1)
        loss_sum = loss_sum - F.log_softmax(logits, dim=1)[:, 0].mean()
    s = total(torch.stack([loss_sum, loss_sum.new_tensor(count)]))
    return s[0] / s[1]
