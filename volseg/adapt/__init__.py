"""Training and adaptation (one process): crops, targets, augmentation, losses and training loops.

- :mod:`~volseg.adapt.sampler`: random crops with the point prompts inside them.
- :mod:`~volseg.adapt.targets`: instance centres, Gaussian density targets, point disks.
- :mod:`~volseg.adapt.prompts`: random prompt subsets, merging, padding to tensors.
- :mod:`~volseg.adapt.augment`: weak / strong views; geometric transforms of images, maps and points.
- :mod:`~volseg.adapt.teacher`: the EMA (mean) teacher.
- :mod:`~volseg.adapt.pseudo_labels`: density peaks and confident segmentation pseudo-labels.
- :mod:`~volseg.adapt.contrastive`: PCL, the prompt-guided contrastive loss, and its point sampling.
- :mod:`~volseg.adapt.losses`: BCE + Dice (with an ignore mask) and density MSE.
- :mod:`~volseg.adapt.batches`: labelled and pseudo-labelled Prompt-DAS batches.
- :mod:`~volseg.adapt.settings`, :mod:`~volseg.adapt.trainer`: Prompt-DAS training (source, oracle,
  UDA, WDA), one loop for one process and for data-parallel workers; :mod:`~volseg.adapt.loop`: the
  supervised loop of non-promptable models.
- :mod:`~volseg.adapt.replicas`: data parallelism in the loop (shards of the global batch, per-crop random
  streams, loss statistics summed over replicas); :mod:`~volseg.adapt.resume`: the state a run resumes from.

Nothing here imports ray, zarr or tensorstore directly: volumes come in as objects with ``read(box)``;
Ray Train runs the loop from :mod:`volseg.actors.training`.
"""
