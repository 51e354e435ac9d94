"""Pure-torch models and their registry.

``build_model(spec)`` turns a :class:`ModelSpec` into an ``nn.Module``; ``input_contract(spec)`` says
what the module expects (2D or 3D windows, normalisation, window size multiple). Nothing here imports
numpy I/O, ray, zarr or tensorstore: tensors in, tensors out.
"""

from volseg.models.registry import (
    MODELS,
    InputContract,
    ModelSpec,
    build_model,
    input_contract,
)

__all__ = ["MODELS", "InputContract", "ModelSpec", "build_model", "input_contract"]
