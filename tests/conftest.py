"""Shared test setup.

Without a GPU, Triton kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET=1
must be set before any kernel is defined, i.e. before deeparch_kernels is imported, so it is set
here. Tests marked ``gpu`` are skipped without CUDA.
"""
import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# backend="auto" remembers its choices on disk: the tests' go to a directory of their own.
os.environ.setdefault("DEEPARCH_CACHE_DIR", tempfile.mkdtemp(prefix="deeparch-test-cache-"))

HAS_CUDA = torch.cuda.is_available()


def _fix_triton36_interpreter_index() -> None:
    """Triton <= 3.6's interpreter sets tl.tensor's ``__index__`` to ``int(handle.data)`` on a
    1-element 1-D array, which numpy >= 2.4 refuses (triton-lang/triton#9171), so ``range()``
    over a runtime bound fails there (the GPU machine's torch 2.11 ships Triton 3.6). Later
    Triton takes the element first; this does the same on the older ones, for the tests only."""
    try:
        import inspect

        from triton.runtime import interpreter as ti

        orig = ti._patch_lang_tensor
        if "int(self.handle.data)" not in inspect.getsource(orig):
            return  # a fixed Triton
    except (ImportError, AttributeError, OSError, TypeError):
        return

    def _patch_lang_tensor(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    ti._patch_lang_tensor = _patch_lang_tensor


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_triton36_interpreter_index()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
