"""BatchNorm statistics of a domain: re-estimating a model's running statistics on images of the domain it
is applied to (AdaBN, Li et al. 2016), and a digest of them for run signatures."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (none in ViTs or GroupNorm CNNs)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def calibrate_norms(model: nn.Module, images: torch.Tensor, batch: int = 8) -> bool:
    """Re-estimate the running statistics of ``model``'s BatchNorm layers on ``images`` (``B×1×Y×X`` model
    input): each becomes the mean of the layer's batch statistics over batches of ``batch`` images. Only
    the model's ``encoder`` runs when every such layer lives there. The model is left in eval mode.
    Returns False, changing nothing, when the model has no such layers."""
    norms = norm_layers(model)
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
        m.train()
    device = next(model.parameters()).device
    encoder = getattr(model, "encoder", None)
    inside = set() if not isinstance(encoder, nn.Module) else {id(m) for m in encoder.modules()}
    run = encoder if all(id(m) in inside for m in norms) else model
    for part in images.split(batch):
        run(part.to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
    return True


def norm_digest(model: nn.Module) -> str | None:
    """SHA-256 of the running statistics of ``model``'s BatchNorm layers (None when it has none)."""
    norms = norm_layers(model)
    if not norms:
        return None
    digest = hashlib.sha256()
    for m in norms:
        for b in (m.running_mean, m.running_var):
            digest.update(b.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
