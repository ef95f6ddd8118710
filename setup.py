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
  SIMCORE_BUILD_EMULATION=1   also build simcore._C_emu: csrc/cuda compiled as C++ for
                       the host execution model of csrc/cuda/emulation (CPU tensors run
                       the CUDA kernels; SIMCORE_CUDA_EMULATION=1 selects it at run time).
                       Needs the CUDA headers (cuda_runtime.h, cuda_fp16.h), not a GPU.
                       "only": build simcore._C_emu alone (.ci/cuda_emulation).
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
# The emulation's __shared__ variables (function statics, csrc/cuda/emulation/cuda_emulation.h): each in a
# section of its own, which the linker script gathers into the one the scheduler poisons before each block.
EMULATION_FLAGS = CXX_FLAGS + ["-fdata-sections"]
EMULATION_LINK_FLAGS = LINK_FLAGS + ["-Wl,-T," + os.path.join("csrc", "cuda", "emulation", "shared_memory.ld")]


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc when available, then links everything."""

    def build_extension(self, ext):
        for var in ("CC", "CXX"):  # setuptools compiles with CC and links C++ with CXX
            tool = (os.environ.get(var) or sysconfig.get_config_var(var) or "c++").split()[0]
            if not shutil.which(tool):
                _fail(f"no C++ compiler found ({var} is '{tool}'). Install one "
                      "(Debian/Ubuntu: apt-get install g++) or point CC and CXX at it.")
        ext.include_dirs.insert(0, _pybind11_include())
        if ext.name == EMULATION_MODULE:
            return self._build_emulation(ext)
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

    def _build_emulation(self, ext):
        """csrc/cuda/*.cu compiled by the host C++ compiler with the emulation header
        force-included (no nvcc, no GPU), linked with the bindings and the C++ kernels'
        argument checks (csrc/cpu, compiled at -O1 and without sanitizers: no kernel of theirs runs)."""
        include = _cuda_include_for_host()
        ext.include_dirs.append(include)
        compiler = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()
        common = ["-fPIC", "-Icsrc", "-I" + include, "-I" + _pybind11_include(), "-Wno-unused-function"]
        plain = [f for f in CXX_FLAGS if f not in SAN and f != "-O3"] + ["-O1"]
        jobs = [(src, ["-x", "c++", "-include", os.path.join("csrc", "cuda", "emulation", "cuda_emulation.h")]
                 + EMULATION_FLAGS) for src in sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))]
        jobs += [(src, plain) for src in sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))]
        out_dir = os.path.join(self.build_temp, "emulation")
        os.makedirs(out_dir, exist_ok=True)
        procs = []
        for src, flags in jobs:  # in parallel, as the nvcc build
            obj = os.path.join(out_dir, os.path.basename(src) + ".o")
            cmd = compiler + flags + common + ["-c", src, "-o", obj]  # -x c++ must come before the file
            print(" ".join(cmd))
            procs.append((src, obj, subprocess.Popen(cmd)))
        failed = [src for src, _, p in procs if p.wait() != 0]
        if failed:
            _fail("compiling " + ", ".join(failed) + " for the CUDA emulation failed (messages above)")
        ext.extra_objects += [obj for _, obj, _ in procs]
        build_temp, self.build_temp = self.build_temp, out_dir
        try:  # its own object folder: the bindings compile differently here
            super().build_extension(ext)
        except Exception as exc:
            _fail(f"compiling the CUDA emulation module failed ({type(exc).__name__}: {exc})")
        finally:
            self.build_temp = build_temp

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


def _cuda_include_for_host():
    """The folder holding cuda_runtime.h and cuda_fp16.h (the emulation compiles them as host code)."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in filter(None, roots):
        if os.path.exists(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    _fail("SIMCORE_BUILD_EMULATION=1 needs the CUDA toolkit's headers (cuda_runtime.h, cuda_fp16.h); "
          "set CUDA_HOME to the toolkit")


EMULATION_MODULE = "simcore._C_emu"
SOURCES = sorted(glob.glob(os.path.join("csrc", "bindings", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))

ext = Extension(
    "simcore._C",
    sources=SOURCES,
    include_dirs=["csrc"],  # + pybind11's, found at build time (after the compiler check)
    extra_compile_args=CXX_FLAGS,
    extra_link_args=LINK_FLAGS,
    language="c++",
)
_emulation = os.environ.get("SIMCORE_BUILD_EMULATION", "").strip()
extensions = [] if _emulation == "only" else [ext]
if _emulation in ("1", "only"):
    # The bindings see every CPU tensor as a CUDA tensor of device 0 (csrc/bindings/tensor_arg.cpp).
    extensions.append(Extension(
        EMULATION_MODULE,
        # + csrc/cuda/*.cu and csrc/cpu/*.cpp, compiled by BuildExt._build_emulation
        sources=sorted(glob.glob(os.path.join("csrc", "bindings", "*.cpp"))
                       + glob.glob(os.path.join("csrc", "cuda", "emulation", "*.cpp"))),
        include_dirs=["csrc"],
        define_macros=[("SIMCORE_WITH_CUDA", "1"), ("SIMCORE_CUDA_EMULATION", "1"), ("SIMCORE_MODULE_NAME", "_C_emu")],
        extra_compile_args=EMULATION_FLAGS,
        extra_link_args=EMULATION_LINK_FLAGS,
        language="c++",
    ))

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
