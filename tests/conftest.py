"""Fixtures shared by the tests (the embedded model, a stock llama-cpp-python reference, a prompt), the test
tiers (markers ``model`` and ``slow``; unmarked tests are model-free) and the guard that keeps model-free tests
from loading a model."""

import llama_cpp
import pytest

from helpers import N_THREADS
from kvbench.haystack import haystack_text
from pykvcompose import Llama, default_model_path

#: Fixtures that load the embedded model: a test that uses one (directly or through another fixture) is a model test.
MODEL_FIXTURES = {"model_path", "plain_llm", "llm", "prompt_tokens"}


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(autouse=True)
def _model_free_tests_load_no_model(request, monkeypatch):
    """An unmarked test is model-free (``make test-fast`` runs it): loading a model there fails at once, naming the
    marker to add, instead of silently slowing the fast loop."""
    if request.node.get_closest_marker("model") is None:

        def refuse(*args, **kwargs):
            raise RuntimeError(f"{request.node.nodeid} loads a model: mark it @pytest.mark.model")

        monkeypatch.setattr(llama_cpp.Llama, "__init__", refuse)


@pytest.fixture(scope="session")
def model_path():
    return default_model_path()


@pytest.fixture(scope="session")
def plain_llm(model_path):
    """Stock llama-cpp-python: the reference."""
    llm = llama_cpp.Llama(model_path, n_ctx=2048, n_threads=N_THREADS, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="session")
def llm(model_path):
    """One pykvcompose Llama shared by tests that set their own press."""
    m = Llama(model_path, n_ctx=2048, verbose=False)
    yield m
    m.close()


@pytest.fixture(scope="session")
def prompt_tokens(plain_llm):
    """About 400 tokens of real text."""
    text = haystack_text()[20000:21800]
    toks = plain_llm.tokenize(text.encode())
    assert 300 < len(toks) < 800
    return toks
