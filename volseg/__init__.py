"""volseg: distributed, chunked, promptable organelle segmentation for petascale EM volumes."""

__version__ = "0.1.0"
