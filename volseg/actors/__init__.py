"""Ray: joining or starting a cluster, and predictor actors pinned to GPUs running blocks.

With :mod:`volseg.training.distributed` (Ray Train), the only code that imports ray; importing this
package does not (its submodules do).
"""
