"""Test-wide settings."""

import torch

# `pytest -n 2` runs two workers on a 2-core machine: one intra-op thread each avoids
# oversubscription, which makes small ops (decode steps) an order of magnitude slower.
torch.set_num_threads(1)
