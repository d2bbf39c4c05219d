import importlib.util
import os
import warnings

import pytest
import torch

# 2 cores: keep torch from oversubscribing when pytest runs in parallel with nothing else
torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings('ignore', message='.*is_fx_tracing.*')

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=6, num_heads=4, num_classes=5)


@pytest.fixture
def tiny_kwargs():
    return dict(TINY)


@pytest.fixture(scope='module')
def one_torch_thread():
    """One torch thread for a module of tiny problems: a second thread only adds synchronization, and stalls badly
    when the other core is busy (measured: 0.02 s -> 3.7 s for one joint refinement test with 2 threads beside
    another process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def load_script():
    """Import a repository script (benchmarks/, scripts/) by its path relative to the repository root."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def load(relpath):
        name = os.path.splitext(os.path.basename(relpath))[0]
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, relpath))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load
