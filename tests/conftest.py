import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # dist_launch, reference_llama
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")


@pytest.fixture
def megatron_tp1():
    """A single-process world (gloo + CPU mode without CUDA) with TP=PP=1."""
    from megatron.core import parallel_state

    from lns_megatron.training import distributed

    distributed.initialize(1, 1, seed=1234)
    yield
    parallel_state.destroy_model_parallel()
