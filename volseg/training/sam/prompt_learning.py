"""SAM prompt learning (the cryo-EM method, arXiv 2311.16140): SAM stays frozen; only small added parts learn.

The parts are options of :class:`~volseg.models.sam.model.SamSegmenter`: the *head prompt* (a 2-level U-Net in
front of SAM), *prefix tokens* (learned tokens every encoder block's attention also reads) and *encoder
adapters* (bottleneck MLPs after the encoder blocks). They train with a Dice loss on labelled crops,
prompt-free, while every SAM weight keeps its value and gets no gradient — far less memory than
fine-tuning SAM, and one frozen SAM can serve several learned prompts.
"""

from __future__ import annotations

from dataclasses import replace

from volseg.errors import ConfigError
from volseg.models.sam.model import SamSegmenter
from volseg.training.crops import CropSampler
from volseg.training.loop import StepCallback, TrainHistory
from volseg.training.promptdas.trainer import DomainData
from volseg.training.sam.tuning import SamTuneSettings, labelled_crops, tune_sam


def learn_sam_prompts(model: SamSegmenter, data: DomainData, settings: SamTuneSettings,
                      on_step: StepCallback | None = None) -> TrainHistory:
    """Train ``model``'s head prompt / prefix tokens / adapters (SAM frozen, its decoder too) on crops of
    ``data`` (``raw`` with ``labels``; labels > 0 = foreground), in place; returns the history."""
    if data.labels is None:
        raise ConfigError("SAM prompt learning needs labelled crops, and the data has no labels.",
                          "give sam_adapt.labelled: {raw, labels} (a few labelled slices are enough).")
    if not model.added_parameters():
        raise ConfigError("SAM prompt learning has nothing to learn: the model has no head prompt, prefix tokens "
                          "or adapters.", "set model.options head_prompt: true, prefix_tokens and/or adapter_dim.")
    sampler = CropSampler(data.raw, data.labels, settings.crop, settings.seed)
    return tune_sam(model, labelled_crops(sampler, settings), replace(settings, train_decoder=False), on_step)
