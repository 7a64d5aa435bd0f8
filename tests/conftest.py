import os

import pytest
import torch

# No test downloads anything; bitsandbytes would otherwise try to fetch a CPU kernel from the
# model hub when it is imported (tests/test_quantized.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton's interpreter runs the kernels on the CPU; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: they gain nothing from threads, and
    OpenMP workers spinning on a shared CPU make their many small ops slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face model directory (what `--model DIR` loads)."""
    from .models import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return str(path)
