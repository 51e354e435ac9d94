"""Training and adaptation: crop sampling, targets, losses and the training loop (one process).

Nothing here imports ray, zarr or tensorstore directly: volumes come in as objects with ``read(box)``.
"""
