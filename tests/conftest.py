"""Shared fixtures: the toy tokenizer, a tiny random policy, the toy world's data (written once)."""

import pytest
import torch

from nanosafe import toy


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the machine is shared, and two busy OpenMP threads
    fighting other jobs for two cores ran a 1 s training loop in 27 s"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tok():
    # function scope: cheap (~10 ms), and some tests mutate tokenizers (pad tokens, added words)
    return toy.toy_tokenizer()


@pytest.fixture
def tiny_policy(tok):
    return toy.toy_model(tok, "tiny", seed=0)


@pytest.fixture(scope="session")
def _toy_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return out, toy.write_dataset(str(out), seed=0)


@pytest.fixture(scope="session")
def toy_dir(_toy_world):
    """a folder with the six toy files of seed 0 (written once per session)"""
    return _toy_world[0]


@pytest.fixture(scope="session")
def toy_data(_toy_world):
    """the same records as dicts: {'sft_train': [...], 'pref_train': [...], ...}; don't mutate"""
    return _toy_world[1]
