import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU CI)")
    config.addinivalue_line("markers", "slow: long-running (real vLLM engines, real models)")


@pytest.fixture
def tp(monkeypatch):
    """Simulated tensor-parallel rank/size for vLLM's parameter classes (no process group)."""
    import vllm.model_executor.parameter as vparam

    state = {"rank": 0, "size": 1}
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_rank", lambda: state["rank"])
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_world_size", lambda: state["size"])
    return state
