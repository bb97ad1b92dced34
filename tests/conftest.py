import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Path to a saved 2-layer Llama model with a small ChatML tokenizer (pad == eos)."""
    from tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models gain nothing from threads and lose a lot when several test processes share two cores;
    tests on the real default model get two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2 if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)
