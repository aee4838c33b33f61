"""numba kernels of the ``"cpu"`` backend: ``common`` (activations, dot products, the routing
rule, counting sort), ``infer`` (hard inference), ``train`` (conditional forward / backward).
They work on numpy arrays; ``fastff.kernels.cpu`` is their torch glue."""
