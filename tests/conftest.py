import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("fastff", deadline=None, max_examples=int(os.environ.get("FASTFF_EXAMPLES", 25)),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("fastff")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run the compiled Triton kernels on a CUDA GPU: they are skipped, with the
    reason shown, without one, and while this process has Triton's interpreter on
    (``TRITON_INTERPRET=1``, which tests/test_kernels_triton.py sets when it is collected)."""
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU (torch.cuda.is_available() is false)"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        reason = ("TRITON_INTERPRET=1 in this process (set when tests/test_kernels_triton.py is collected): the Triton "
                  "kernels would run in the interpreter; run pytest -m cuda --ignore-glob='tests/test_kernels_triton*'")
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
