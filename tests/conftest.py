import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    """Every test starts with an empty Pyro param store, a fixed seed and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
