import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread: tiny models gain nothing from more, and on this project's 2-vCPU machines a second thread
# makes small element-wise ops up to 25x slower whenever anything else runs (see model/threads.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Path to a saved 2-layer Llama model with a small ChatML tokenizer (pad == eos)."""
    from tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))
