"""Build of deeparch-kernels: one extension, ``deeparch_kernels._C``.

CUDA and CPU sources when nvcc and a CUDA build of torch are found, CPU sources only otherwise.
Environment switches (flash-attention style):

  DEEPARCH_FORCE_CPU=1      build the CPU sources only, even where CUDA is present
  DEEPARCH_SKIP_BUILD=1     build no extension (pure Python: the Triton/ATen/reference backends)
  DEEPARCH_DEBUG=1          -O0 -g, and -lineinfo for the CUDA sources
  TORCH_CUDA_ARCH_LIST      CUDA archs, default "8.0;9.0" (Ampere + Hopper), PTX for the newest
  MAX_JOBS                  parallel compile jobs, default from cores and free memory
  DEEPARCH_CPU_ISA          "avx2" or "default": the at::vec ISA of the CPU kernels; default avx2
                            when the building machine has AVX2, FMA and F16C (pip builds on the machine
                            that runs it; set "default" to build a portable binary)
  CUDA_HOME                 the CUDA toolkit; defaults to /usr/local/cuda when nvcc is there
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"deeparch-kernels setup: {msg}", file=sys.stderr)


# torch guesses CUDA_HOME from nvcc's path and can land on /usr/local (then -lcudart fails).
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
if "MAX_JOBS" not in os.environ:
    try:  # each nvcc job can take ~2-3 GB: cap by free memory as well as by cores
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gb // 3))))


def _cpu_isa():
    isa = os.environ.get("DEEPARCH_CPU_ISA")
    if isa:
        return isa
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx2" if {"avx2", "fma", "f16c"} <= set(flags) else "default"


def _extensions():
    if _flag("DEEPARCH_SKIP_BUILD"):
        _say("DEEPARCH_SKIP_BUILD=1: no C++/CUDA extension; Triton/ATen/reference backends only.")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        not _flag("DEEPARCH_FORCE_CPU")
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if with_cuda:
        _say(f"building CPU + CUDA kernels (CUDA_HOME={CUDA_HOME}, "
             f"archs {os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']}).")
    else:
        why = ("DEEPARCH_FORCE_CPU=1" if _flag("DEEPARCH_FORCE_CPU") else
               "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)")
        _say(f"building CPU kernels only ({why}); the 'cuda' backend will be unavailable.")

    major, minor = torch.__version__.split(".")[:2]
    debug = _flag("DEEPARCH_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    macros = [("DEEPARCH_TORCH_MAJOR", major), ("DEEPARCH_TORCH_MINOR", minor),
              ("DEEPARCH_WITH_CUDA", "1" if with_cuda else "0")]
    cxx = list(opt)  # the C++ standard is torch's choice (C++20 for torch >= 2.12)
    cxx.append("-fopenmp")  # at::parallel_for is header-inline OpenMP: without it, one thread
    isa = _cpu_isa()
    if isa == "avx2":  # at::vec picks its ISA at compile time (torch does the same per kernel file)
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    _say(f"CPU kernels: at::vec ISA {isa} (DEEPARCH_CPU_ISA), OpenMP on.")
    if with_cuda:
        nvcc = opt + ["--expt-relaxed-constexpr", "-Xptxas=-v" if _flag("DEEPARCH_PTXAS_VERBOSE") else ""]
        nvcc = [f for f in nvcc if f] + (["-lineinfo"] if debug else [])
        ext = CUDAExtension("deeparch_kernels._C", sources + cuda_sources, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    else:
        ext = CppExtension("deeparch_kernels._C", sources, define_macros=macros,
                           extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
