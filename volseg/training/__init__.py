"""Training and adaptation: crops, targets, augmentation, losses and training loops.

- :mod:`~volseg.training.crops`: random crops with the point prompts inside them.
- :mod:`~volseg.training.targets`: instance centres, Gaussian density targets, point disks.
- :mod:`~volseg.training.augment`: weak / strong views; geometric transforms of images, maps and points.
- :mod:`~volseg.training.losses`: BCE + Dice (with an ignore mask) and density MSE.
- :mod:`~volseg.training.loop`: the supervised loop of non-promptable models.
- :mod:`~volseg.training.replicas`: data parallelism in the loop (shards of the global batch, per-crop
  random streams, loss statistics summed over replicas); :mod:`~volseg.training.resume`: the state a run
  resumes from; :mod:`~volseg.training.distributed`: the same loop under Ray Train (DDP).
- :mod:`~volseg.training.promptdas`: Prompt-DAS training (source, oracle, UDA, WDA): settings, trainer,
  batches, prompts, teacher, pseudo-labels and PCL.
- :mod:`~volseg.training.sam`: the SAM-based methods (tuning, prompt learning, All-in-SAM, DFG).

Only :mod:`~volseg.training.distributed` imports ray; nothing here imports zarr or tensorstore directly:
volumes come in as objects with ``read(box)``.
"""
