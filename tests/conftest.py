"""Shared test settings."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter (read when the kernels are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread: tiny models on 2 shared cores run faster without thread hand-offs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
