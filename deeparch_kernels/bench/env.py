"""What a result was measured on: device, library versions, git commit, date (STYLE.md: "GPU
name and commit in every stored row"), so that two files compare knowing their card and code."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .._precision import conv_allows_tf32
from ..timing import last_level_cache_bytes


def resolve_device(name: Optional[str]) -> torch.device:
    """The device a run uses: ``name`` if given, else the GPU when CUDA is available, else CPU.
    A CUDA device always carries its index (torch.cuda.set_device needs one)."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


def device_from_arg(name: Optional[str]) -> torch.device:
    """resolve_device for a command line's ``--device``: ValueError, with the message to show,
    for a name torch can't parse, a device other than cpu/cuda, or cuda without CUDA."""
    try:
        dev = resolve_device(name)
    except RuntimeError as e:
        raise ValueError(f"bad --device {name!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:  # the model name is more useful than "x86_64"
        return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), name)
    except OSError:
        return name


def device_slug(device: torch.device) -> str:
    """A short file-name tag: 'h200', 'h100', 'a100', ... for GPUs, 'cpu' for the CPU."""
    if device.type != "cuda":
        return "cpu"
    name = device_name(device).lower().replace("nvidia", "").strip()
    m = re.search(r"\b([a-z]+\d+[a-z]*)\b", name)
    slug = m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug or "gpu"


def git_info() -> Dict[str, Any]:
    """The commit of the checkout this package runs from (None when not a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    out: Dict[str, Any] = {"commit": None, "dirty": None}

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
    try:
        if (commit := git("rev-parse", "HEAD")).returncode == 0:
            out["commit"] = commit.stdout.strip()
            st = git("status", "--porcelain", "-uno")
            out["dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _version(mod: str) -> Optional[str]:
    try:
        return str(getattr(__import__(mod), "__version__", None))
    except Exception:  # noqa: BLE001 - not installed, or broken
        return None


def cpu_bf16_isa() -> Optional[str]:
    """The instructions this CPU multiplies bfloat16 with, natively: "amx_bf16" (AMX tiles),
    "avx512_bf16" (VDPBF16PS), or None (no native bf16: oneDNN then converts to fp32, when it
    runs bf16 at all). From torch's cpuinfo queries (private names: None where they are gone)."""
    q = getattr(torch, "cpu", None)
    try:
        if getattr(q, "_is_amx_tile_supported", lambda: False)():
            return "amx_bf16"
        if getattr(q, "_is_avx512_bf16_supported", lambda: False)():
            return "avx512_bf16"
    except RuntimeError:  # pragma: no cover - a build without cpuinfo
        return None
    return None


def cpu_runs_bf16_natively() -> bool:
    """bfloat16 convolutions here run on native bf16 instructions through oneDNN (what the main
    job's bf16 model rows on the CPU measure)."""
    return (cpu_bf16_isa() is not None and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def environment(device: torch.device) -> Dict[str, Any]:
    """The ``env`` block of a result file."""
    from .. import __version__, _ext
    from ..cpu_memory import kept_freed_memory

    ext = _ext.build_info()
    env: Dict[str, Any] = dict(
        device=str(device), device_type=device.type, device_name=device_name(device),
        device_slug=device_slug(device), python=platform.python_version(), platform=platform.platform(),
        torch=torch.__version__, torchvision=_version("torchvision"), triton=_version("triton"),
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        deeparch_kernels=__version__,
        extension={k: list(v) if isinstance(v, tuple) else v for k, v in ext.items()} if isinstance(ext, dict) else ext,
        cpu_threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1", git=git_info(),
        last_level_cache_bytes=last_level_cache_bytes(device))
    if device.type == "cpu":  # the instruction set ATen's kernels use, and oneDNN's bf16 path
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["onednn_bf16"] = bool(torch.backends.mkldnn.is_available()
                                  and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        env["cpu_bf16_isa"] = cpu_bf16_isa()
        env["malloc_kept_bytes"] = kept_freed_memory()  # None: malloc as the system set it
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu"] = dict(name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                          memory_bytes=p.total_memory, l2_bytes=getattr(p, "L2_cache_size", None))
        env.update(cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
                   cudnn_allow_tf32=conv_allows_tf32(),  # for convolutions (either TF32 API)
                   matmul_allow_tf32=bool(torch.backends.cuda.matmul.allow_tf32))
    return env


def now() -> _dt.datetime:
    return _dt.datetime.now().astimezone()
