import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("fastff", deadline=None, max_examples=int(os.environ.get("FASTFF_EXAMPLES", 25)),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("fastff")
torch.set_num_threads(min(2, torch.get_num_threads()))
