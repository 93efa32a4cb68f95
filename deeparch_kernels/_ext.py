"""Loads the compiled extension ``deeparch_kernels._C`` if it is there and fresh.

Importing the package never fails because of the extension: when it is missing, stale (built
for another API version or another torch) or fails to load, the C++ backends report themselves
unavailable with the reason, and everything else keeps working. DEEPARCH_NO_EXTENSION=1 does not
import it at all (the package as it is without a build).
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

log = logging.getLogger("deeparch_kernels")

API_VERSION = 4  # must match DEEPARCH_API_VERSION in csrc/common.h

_state: dict = {"loaded": False, "cuda": False, "reason": "not loaded yet", "info": None}


def load() -> None:
    """Import ``_C`` once. The op schemas must be defined before this runs (ops/ does that)."""
    if _state["info"] is not None or _state["reason"] != "not loaded yet":
        return
    if os.environ.get("DEEPARCH_NO_EXTENSION", "0") == "1":
        _state["reason"] = "the C++ extension is switched off (DEEPARCH_NO_EXTENSION=1)"
        return
    try:
        mod = importlib.import_module("deeparch_kernels._C")
    except ImportError as e:
        _state["reason"] = (f"the C++ extension deeparch_kernels._C is not built ({e}); "
                            "install with `pip install --no-build-isolation .`")
        log.info(_state["reason"])
        return
    except OSError as e:  # e.g. undefined symbols: built against another torch
        _state["reason"] = f"the C++ extension failed to load ({e}); rebuild it"
        log.warning(_state["reason"])
        return
    info = mod.build_info()
    _state["info"] = info
    reason = stale_reason(info)
    if reason is None:
        _state.update(loaded=True, cuda=bool(info["cuda"]), reason="", same_bits=mod.same_bits)
    else:
        _state["reason"] = reason
        log.warning(reason)


def stale_reason(info: dict, torch_version: str = torch.__version__) -> str | None:
    """Why an extension with this build_info() must not be used, or None."""
    torch_mm = tuple(int(v) for v in torch_version.split("+")[0].split(".")[:2])
    if info.get("api_version") != API_VERSION:
        return (f"the C++ extension is stale (API {info.get('api_version')}, the package wants "
                f"{API_VERSION}); rebuild with `pip install --no-build-isolation .`")
    if tuple(info.get("torch_version", ())) != torch_mm:
        return (f"the C++ extension was built for torch {info.get('torch_version')}, this is torch "
                f"{torch_version}; rebuild with `pip install --no-build-isolation .`")
    return None


def cpu_reason() -> str | None:
    """Why the C++ CPU kernels can't run, or None when they can."""
    load()
    return None if _state["loaded"] else _state["reason"]


def same_bits():
    """The extension's ``same_bits(a, b)`` (csrc/module.cpp: two tuples, pairwise both None or
    CPU tensors with equal bytes), or None when the extension is not loaded."""
    load()
    return _state["same_bits"] if _state["loaded"] else None


def winograd_reason() -> str | None:
    """Why the C++ CPU Winograd kernel can't run, or None when it can."""
    reason = cpu_reason()
    if reason is None and not _state["info"].get("winograd"):
        return ("the C++ extension was built without AVX2/FMA (DEEPARCH_CPU_ISA=default), which the "
                "Winograd kernel needs")
    return reason


def cuda_reason() -> str | None:
    """Why the C++ CUDA kernels can't run, or None when they can."""
    load()
    if not _state["loaded"]:
        return _state["reason"]
    if not _state["cuda"]:
        return "the C++ extension was built without CUDA (CPU sources only)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def cutlass_reason(device: "torch.device | None" = None) -> str | None:
    """Why the CUTLASS sm_90a kernels can't run on ``device``, or None when they can."""
    why = cuda_reason()
    if why is not None:
        return why
    if not _state["info"].get("cutlass"):
        return ("the C++ extension was built without the CUTLASS sm_90a kernels (they need 9.0 in "
                "TORCH_CUDA_ARCH_LIST, the nvidia-cutlass headers, and DEEPARCH_CUTLASS != 0)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return f"the CUTLASS kernels are built for sm_90a (Hopper); this GPU is sm_{major}{minor}"
    return None


def build_info() -> dict | None:
    """The imported _C's build_info(), also when it is stale (its registrations took effect on
    import all the same); None when it could not be imported."""
    load()
    return _state["info"]
