"""torch's TF32 rule for fp32 convolutions, as the library reads it (deeparch_kernels._precision):
the legacy flag, the per-op API of torch >= 2.9, and a mix of both (where reading the legacy
flag raises) must all work, and no_tf32() must put every setting back."""
import pytest
import torch

from deeparch_kernels import _precision as P

NEW_API = P._new_api()


@pytest.fixture(autouse=True)
def _keep_settings():
    legacy, state = P._legacy(), P._state()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy
    if NEW_API:
        P._restore(state)
    assert P._legacy() == legacy  # the next test can read torch's legacy flag again


def test_no_tf32_leaves_the_legacy_flag_readable():
    for flag in (True, False):
        torch.backends.cudnn.allow_tf32 = flag
        with P.no_tf32():
            pass
        assert torch.backends.cudnn.allow_tf32 is flag and P.conv_allows_tf32() is flag


def test_legacy_flag():
    torch.backends.cudnn.allow_tf32 = True
    assert P.conv_allows_tf32()
    torch.backends.cudnn.allow_tf32 = False
    assert not P.conv_allows_tf32()


@pytest.mark.skipif(not NEW_API, reason="torch without the per-op fp32_precision API")
def test_new_api_and_a_mix_of_both():
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.conv.fp32_precision = "ieee"  # rnn stays tf32: a mixed state
    with pytest.raises(RuntimeError):
        torch.backends.cudnn.allow_tf32  # torch's own getter refuses it  # noqa: B018
    assert not P.conv_allows_tf32()
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert P.conv_allows_tf32()
    torch.backends.cudnn.conv.fp32_precision = "none"  # inherits from cudnn, then the global one
    torch.backends.cudnn.fp32_precision = "tf32"
    assert P.conv_allows_tf32()


def test_no_tf32_restores_every_setting():
    if NEW_API:
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = True
    before = P._state() if NEW_API else torch.backends.cudnn.allow_tf32
    with P.no_tf32():
        assert not P.conv_allows_tf32()
    assert (P._state() if NEW_API else torch.backends.cudnn.allow_tf32) == before
    assert P.conv_allows_tf32()
