import os

# Kernel tests run the Triton code through its interpreter on the CPU. Set before any kernel
# module is imported: @triton.jit decides at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
