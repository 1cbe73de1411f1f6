import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Tensors in some test modules are small: intra-op threads only add wake-up latency (large when other jobs
    load the cores). Use with `pytest.mark.usefixtures('one_thread')`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
