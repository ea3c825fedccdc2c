"""Fixtures of the evaluation tests: one torch thread, the small synthetic corpus (once per module)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add synchronisation (and stall on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from safe_av.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("corpus")
    write_synthetic(root, seed=0, small=True)
    return root
