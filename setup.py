"""Build script for simcore's compiled core.

One extension, ``simcore._C``: the C++ kernels (csrc/cpu), their pybind11
bindings (csrc/bindings) and, where nvcc is found, the CUDA kernels
(csrc/cuda) linked against the static CUDA runtime. The extension does not
link libtorch: tensors cross the boundary as pointer + shape + strides + dtype
(see csrc/common/tensor_view.h), so building needs only a C++17 compiler and
pybind11.

Environment switches:
  SIMCORE_CUDA=0|1     0: never build CUDA; 1: require it (fail without nvcc);
                       unset: build CUDA when nvcc is found.
  SIMCORE_NATIVE=1     add -march=native (the default build is portable).
  SIMCORE_CUDA_ARCHS   e.g. "80;90": SASS for each, plus PTX of the last one
                       for newer GPUs. Default: SASS for the oldest architecture
                       of each major family nvcc supports from sm_75 up (with
                       nvcc 13.0: 75;80;90;100;110;120), PTX for the newest.
  SIMCORE_DEBUG=1      -O1 -g, for debuggers and sanitizers.
  SIMCORE_SANITIZE=address,undefined   build with those sanitizers.
  CUDA_HOME            where to look for nvcc before PATH.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _fail(message):
    # One readable line instead of a deep traceback from the build backend.
    sys.stderr.write("\nsimcore build error: " + message + "\n\n")
    raise SystemExit(1)


def _pybind11_include():
    try:
        import pybind11
    except ImportError:
        _fail("pybind11 is not installed in the build environment. "
              "`pip install .` installs it automatically; with "
              "--no-build-isolation run `pip install 'pybind11>=2.12'` first.")
    return pybind11.get_include()


def _find_nvcc():
    switch = os.environ.get("SIMCORE_CUDA", "").strip()
    if switch == "0":
        return None
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append(shutil.which("nvcc") or "")
    candidates.append("/usr/local/cuda/bin/nvcc")
    for nvcc in candidates:
        if nvcc and os.path.isfile(nvcc) and os.access(nvcc, os.X_OK):
            return nvcc
    if switch == "1":
        _fail("SIMCORE_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH).")
    return None


def _cuda_paths(nvcc):
    """Include and library folders as nvcc itself resolves them (nvcc may be a wrapper script)."""
    out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True).stderr
    includes, libs = [], []
    for line in out.splitlines():
        for token in line.replace('"', " ").split():
            if token.startswith("-I") and os.path.isdir(token[2:]):
                includes.append(os.path.normpath(token[2:]))
            elif token.startswith("-L") and os.path.isdir(token[2:]) and not token.rstrip("/").endswith("stubs"):
                libs.append(os.path.normpath(token[2:]))
    if not any(os.path.exists(os.path.join(d, "libcudart_static.a")) for d in libs):
        _fail(f"found nvcc at {nvcc} but not libcudart_static.a beside it; set CUDA_HOME, "
              "or SIMCORE_CUDA=0 to build without CUDA.")
    return sorted(set(includes)), sorted(set(libs))


def _default_cuda_archs(nvcc):
    """Every architecture this nvcc can target from sm_75 (T4) up, thinned to the oldest of each
    major family: its SASS runs on the family's newer minors (sm_80 on sm_86/89, ...)."""
    out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True).stdout
    archs = sorted({int(t[3:]) for t in out.split() if t.startswith("sm_") and t[3:].isdigit()})
    archs = [a for a in archs if a >= 75]
    if not archs:
        _fail(f"{nvcc} --list-gpu-code names no architecture from sm_75 up; set SIMCORE_CUDA_ARCHS.")
    families = {}
    for a in archs:
        families.setdefault(a // 10, a)
    return [str(a) for a in sorted(families.values())], str(archs[-1])


def _cuda_archs(nvcc):
    """-gencode flags: SASS for each architecture, PTX for the newest (JIT-compiled on newer GPUs)."""
    chosen = os.environ.get("SIMCORE_CUDA_ARCHS", "").replace(",", ";")
    archs = [a.strip() for a in chosen.split(";") if a.strip()]
    ptx = archs[-1] if archs else None
    if not archs:
        archs, ptx = _default_cuda_archs(nvcc)
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]
    return flags


DEBUG = os.environ.get("SIMCORE_DEBUG") == "1"
SANITIZE = os.environ.get("SIMCORE_SANITIZE", "").strip()
OPT = ["-O1", "-g", "-fno-omit-frame-pointer"] if DEBUG or SANITIZE else ["-O3"]
SAN = [f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all"] if SANITIZE else []
# OpenMP: the extension links libgomp.so.1, which torch's CPU wheels already
# load under that soname, so both share one OpenMP runtime (tests check this).
# -fno-math-errno: sqrt and friends never set errno (nothing reads it), so loops using them vectorise
CXX_FLAGS = ["-std=c++17", "-fvisibility=hidden", "-fopenmp", "-fno-math-errno", "-Wall", "-Wextra",
             "-Wno-unused-parameter"] + OPT + SAN
if os.environ.get("SIMCORE_NATIVE") == "1":
    CXX_FLAGS.append("-march=native")
LINK_FLAGS = ["-fopenmp"] + SAN


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc when available, then links everything."""

    def build_extension(self, ext):
        for var in ("CC", "CXX"):  # setuptools compiles with CC and links C++ with CXX
            tool = (os.environ.get(var) or sysconfig.get_config_var(var) or "c++").split()[0]
            if not shutil.which(tool):
                _fail(f"no C++ compiler found ({var} is '{tool}'). Install one "
                      "(Debian/Ubuntu: apt-get install g++) or point CC and CXX at it.")
        ext.include_dirs.insert(0, _pybind11_include())
        nvcc = _find_nvcc()
        if nvcc:
            ext.extra_objects += self._compile_cuda(nvcc, ext)
            ext.define_macros.append(("SIMCORE_WITH_CUDA", "1"))
            include_dirs, library_dirs = _cuda_paths(nvcc)
            ext.include_dirs += include_dirs
            ext.library_dirs += library_dirs
            # Static runtime: no libcudart.so to match at run time; the driver
            # is loaded lazily, so the module imports on machines without a GPU.
            ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        else:
            print("simcore: nvcc not found or SIMCORE_CUDA=0; building the CPU kernels only")
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError / LinkError: output is above
            _fail(f"compiling the C++ extension failed ({type(exc).__name__}: {exc}); "
                  "the compiler's messages are printed above.")

    def _compile_cuda(self, nvcc, ext):
        sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        flags = ["-std=c++17", "-Xcompiler", "-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr",
                 "-lineinfo", "-Icsrc"] + (["-O1", "-g"] if DEBUG else ["-O3"]) + _cuda_archs(nvcc)
        objects, procs = [], []
        for src in sources:
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj] + flags
            print(" ".join(cmd))
            procs.append((src, subprocess.Popen(cmd)))
            objects.append(obj)
        failed = [src for src, p in procs if p.wait() != 0]
        if failed:
            _fail("nvcc failed on " + ", ".join(failed) + " (messages above). "
                  "Set SIMCORE_CUDA=0 to build without CUDA.")
        return objects


ext = Extension(
    "simcore._C",
    sources=sorted(glob.glob(os.path.join("csrc", "bindings", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
    include_dirs=["csrc"],  # + pybind11's, found at build time (after the compiler check)
    extra_compile_args=CXX_FLAGS,
    extra_link_args=LINK_FLAGS,
    language="c++",
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
