"""Test-session settings shared by every module."""

import os

import torch

# One intra-op thread: the tests' tensors are small, and on a 2-core runner two
# threads per process (plus spawned gloo ranks) oversubscribe the cores; a 300-step
# MLP run measured 2.2 s with one thread and 37 s with two.
torch.set_num_threads(1)

# The suite runs dion_lp's kernels eagerly (spawned ranks inherit this): compiling
# each graph costs seconds per process. tests/test_kernels.py turns compilation on
# and checks that the compiled kernels give the eager codes bit for bit.
os.environ.setdefault("DION_LP_COMPILE", "0")
