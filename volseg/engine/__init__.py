"""Block execution, knowing nothing of models: the stage contract and :func:`run_stage` (stage.py), the
serial executor (serial.py), Ray predictor actors pinned to GPUs (ray.py) and joining or starting a Ray
cluster (cluster.py), done-marks for resume (ledger.py) and the leases by which one run holds its outputs
(lease.py).

Only ray.py and cluster.py (and :mod:`volseg.training.distributed`, Ray Train) import ray; importing this
package does not.
"""
