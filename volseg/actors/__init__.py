"""Ray: predictor actors pinned to GPUs, the block scheduler, and distributed training (Ray Train).

This is the only package that imports ray; importing it does not (submodules do).
"""
