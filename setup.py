"""Build of deeparch-kernels: one extension, ``deeparch_kernels._C``.

CUDA and CPU sources when nvcc and a CUDA build of torch are found, CPU sources only otherwise.
Environment switches (flash-attention style):

  DEEPARCH_FORCE_CPU=1      build the CPU sources only, even where CUDA is present
  DEEPARCH_SKIP_BUILD=1     build no extension (pure Python: the Triton/ATen/reference backends)
  DEEPARCH_DEBUG=1          -O0 -g, and -lineinfo for the CUDA sources
  TORCH_CUDA_ARCH_LIST      CUDA archs, default "8.0;9.0+PTX" (Ampere + Hopper), PTX for the newest
  DEEPARCH_CUTLASS          the CUTLASS 3.x sm_90a conv kernels (csrc/cuda/cutlass/): unset = build
                            them when 9.0 is in TORCH_CUDA_ARCH_LIST and the CUTLASS headers are
                            found, "0" = never, "1" = required (the build fails saying what is
                            missing). Headers: DEEPARCH_CUTLASS_DIR (a CUTLASS source tree, with
                            include/ and tools/util/include/), else the pinned nvidia-cutlass wheel's
                            cutlass_library/source (pyproject.toml, scripts/setup_env.sh). They are
                            compiled for sm_90a only, in their own translation units (one per dtype,
                            ~3.5-4.5 GB of memory and ~70 s of CPU each), by a second ninja file.
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


CUTLASS_VERSION = "4.2.0.0"  # the nvidia-cutlass wheel the kernels were written against
CUTLASS_UNITS = ["csrc/cuda/cutlass/conv_sm90_f16.cu", "csrc/cuda/cutlass/conv_sm90_bf16.cu"]
CUTLASS_HOST = ["csrc/cuda/cutlass/conv_sm90_op.cpp"]  # the torch op, built with the other sources


def _has_hopper(arch_list: str) -> bool:
    """9.0 (also 9.0a, 9.0+PTX, "Hopper") in a TORCH_CUDA_ARCH_LIST value."""
    for entry in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip().split("+")[0]
        if entry in ("9.0", "9.0a", "Hopper"):
            return True
    return False


def _cutlass_source_dir():
    """(CUTLASS source tree with include/ and tools/util/include/, None) or (None, why not)."""
    root = os.environ.get("DEEPARCH_CUTLASS_DIR")
    if not root:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")  # located, not imported
        if spec is None or not spec.submodule_search_locations:
            return None, (f"the CUTLASS headers are not installed (pip install --no-deps "
                          f"nvidia-cutlass=={CUTLASS_VERSION}, or set DEEPARCH_CUTLASS_DIR)")
        root = os.path.join(list(spec.submodule_search_locations)[0], "source")
    if not os.path.exists(os.path.join(root, "include", "cutlass", "conv", "convnd_problem_shape.hpp")):
        return None, f"no CUTLASS 3.x headers under {root}/include"
    return root, None


def _cutlass_plan(with_cuda: bool):
    """(CUTLASS source dir, None) when the CUTLASS kernels are built, else (None, why not)."""
    mode = os.environ.get("DEEPARCH_CUTLASS", "").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return None, "DEEPARCH_CUTLASS=0"
    if not with_cuda:
        why = "no CUDA build"
    elif not _has_hopper(os.environ["TORCH_CUDA_ARCH_LIST"]):
        why = f"9.0 is not in TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    else:
        root, why = _cutlass_source_dir()
        if root is not None:
            return root, None
    if mode in ("1", "true", "yes", "on"):
        raise SystemExit(f"deeparch-kernels setup: DEEPARCH_CUTLASS=1 but {why}")
    return None, why


def _cutlass_jobs() -> int:
    """Parallel nvcc jobs for the CUTLASS units: each needs up to ~4.5 GB (measured)."""
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 8.0
    return max(1, min(int(os.environ["MAX_JOBS"]), int(free_gb // 5)))


def _build_cutlass_objects(build_temp: str, cutlass_root: str, cuda_home: str) -> list:
    """Compiles CUTLASS_UNITS for sm_90a with their own flags (torch's extension build applies one
    set of arch flags to every .cu file: these must be sm_90a only) through a ninja file of
    their own, incremental (nvcc dependency files), and returns the object files."""
    import shlex
    import subprocess

    import torch

    out_dir = os.path.join(os.path.abspath(build_temp), "cutlass_sm90")
    os.makedirs(out_dir, exist_ok=True)
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-gencode=arch=compute_90a,code=sm_90a",
             f"-I{os.path.join(cutlass_root, 'include')}",
             f"-I{os.path.join(cutlass_root, 'tools', 'util', 'include')}"]
    if _flag("DEEPARCH_DEBUG"):
        flags.append("-lineinfo")
    if _flag("DEEPARCH_PTXAS_VERBOSE"):
        flags.append("-Xptxas=-v")
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    lines = ["ninja_required_version = 1.3", f"nvcc = {nvcc}",
             f"flags = {' '.join(shlex.quote(f) for f in flags)}", "",
             "rule nvcc",
             "  command = $nvcc $flags --generate-dependencies-with-compile "
             "--dependency-output $out.d -c $in -o $out",
             "  depfile = $out.d", "  deps = gcc", "  description = nvcc (sm_90a, CUTLASS) $in", ""]
    objects = []
    for src in CUTLASS_UNITS:
        obj = os.path.join(out_dir, os.path.basename(src).replace(".cu", ".o"))
        lines.append(f"build {obj}: nvcc {os.path.join(ROOT, src)}")
        objects.append(obj)
    with open(os.path.join(out_dir, "build.ninja"), "w") as f:
        f.write("\n".join(lines) + "\n")
    jobs = _cutlass_jobs()
    _say(f"compiling the CUTLASS sm_90a kernels ({len(CUTLASS_UNITS)} units, {jobs} job(s))")
    subprocess.run(["ninja", "-C", out_dir, "-j", str(jobs)], check=True)
    return objects


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
    cutlass_root, no_cutlass = _cutlass_plan(with_cuda)
    if with_cuda:
        _say("CUTLASS sm_90a conv kernels: " + (f"building them (headers {cutlass_root})"
                                                if cutlass_root else f"skipped ({no_cutlass})"))
    macros.append(("DEEPARCH_WITH_CUTLASS", "1" if cutlass_root else "0"))
    if with_cuda:
        nvcc = opt + ["--expt-relaxed-constexpr", "-Xptxas=-v" if _flag("DEEPARCH_PTXAS_VERBOSE") else ""]
        nvcc = [f for f in nvcc if f] + (["-lineinfo"] if debug else [])
        host = CUTLASS_HOST if cutlass_root else []
        ext = CUDAExtension("deeparch_kernels._C", sources + cuda_sources + host, define_macros=macros,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc})
        # The CUTLASS units are compiled apart (their own arch and flags) and linked in; a
        # change to them or their headers re-links the extension.
        ext.cutlass_root = cutlass_root
        if cutlass_root:
            ext.depends = sorted(glob.glob("csrc/cuda/cutlass/*") + glob.glob("csrc/cuda/*.cuh"))
    else:
        ext = CppExtension("deeparch_kernels._C", sources, define_macros=macros,
                           extra_compile_args={"cxx": cxx})
    base = BuildExtension.with_options(use_ninja=True)

    class Build(base):
        def build_extension(self, ext):
            root = getattr(ext, "cutlass_root", None)
            if root:
                objects = _build_cutlass_objects(self.build_temp, root, CUDA_HOME)
                ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
                ext.depends = [d for d in ext.depends if d not in objects] + objects
            super().build_extension(ext)

    return [ext], {"build_ext": Build}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
