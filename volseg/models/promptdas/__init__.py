"""Prompt-DAS: image encoders, the point-prompt encoder, the two-way decoder and the two heads
(segmentation and centre density); :mod:`~volseg.models.promptdas.model` assembles them."""
