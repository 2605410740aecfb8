"""Build script: setuptools drives CMake, the one build definition of the native extensions:
lightllm._C (C++ CPU kernels) and lightllm._C_cuda (CUDA kernels), each loaded on its own.

Environment switches (read at build time):
  LIGHTLLM_SKIP_NATIVE_BUILD=1  pure-Python install (reference and Triton backends only)
  LIGHTLLM_SKIP_CUDA_BUILD=1    build the C++ CPU kernels only, no lightllm._C_cuda (also chosen, with
                                a message, when nvcc's CUDA major version differs from torch's)
  CUDA_HOME                     CUDA toolkit root (default: the toolkit of `nvcc` on PATH, then
                                /usr/local/cuda); torch's own guess can name the wrong root
  TORCH_CUDA_ARCH_LIST          e.g. "8.0;9.0a" or "9.0a+PTX" (default: 8.0, 9.0a, PTX of 9.0)
  MAX_JOBS                      parallel compile jobs (default: number of CPUs)
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# pip runs setup.py once for metadata and once more to build: speak only in the building run.
_BUILDING = any(cmd in sys.argv for cmd in ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"))


def _say(message: str) -> None:
    # pip shows a build's output with -v or on failure; `python -m lightllm info` tells it later too.
    if _BUILDING:
        print(f"lightllm setup: {message}", file=sys.stderr, flush=True)


def find_cuda_home():
    """The CUDA toolkit root, or None. Decided by the toolkit on disk, never by a visible GPU."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            return root
    return None


def cuda_gencode_flags(arch_list: str) -> str:
    """Translate TORCH_CUDA_ARCH_LIST ("8.0;9.0a+PTX", spaces or semicolons) to nvcc -gencode flags."""
    flags = []
    for item in arch_list.replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item[: -len("+PTX")] if ptx else item
        suffix = "a" if arch.endswith("a") else ""
        digits = arch.rstrip("a").replace(".", "")
        if not digits.isdigit():
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {item!r} is not like '8.0', '9.0a' or '9.0+PTX'")
        flags.append(f"-gencode=arch=compute_{digits}{suffix},code=sm_{digits}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{digits}{suffix},code=compute_{digits}{suffix}")
    return ";".join(flags)


# sm_80 code also runs on sm_86/sm_89; sm_90a enables Hopper-only instructions; compute_90 PTX
# lets newer cards JIT. Every extra architecture multiplies CI's compile time on 2 cores.
DEFAULT_GENCODE = (
    "-gencode=arch=compute_80,code=sm_80;"
    "-gencode=arch=compute_90a,code=sm_90a;"
    "-gencode=arch=compute_90,code=compute_90"
)


def nvcc_release(cuda_home) -> "str | None":
    """The toolkit's release ("13.0") from ``nvcc --version``, or None if it cannot be read."""
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def cuda_version_mismatch(nvcc: "str | None", torch_cuda: str) -> "str | None":
    """Why CUDA kernels built by this nvcc would not work with this torch (None if they would):
    the CUDA major versions must match, as torch's own extension builder requires; a different
    minor version within the major is fine."""
    if nvcc is None:
        return None  # unknown: try, and let the compiler speak
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"nvcc is CUDA {nvcc} but torch was built for CUDA {torch_cuda}: kernels from one major version do "
                f"not load beside the other's runtime. Building the C++ CPU kernels only; point CUDA_HOME at a CUDA "
                f"{torch_cuda.split('.')[0]} toolkit to build the CUDA kernels.")
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str, optional: bool = False):
        super().__init__(name, sources=[], optional=optional)


# The two modules CMake builds; each loads on its own (lightllm/_native.py).
CPP_MODULE = "lightllm._C"  # C++ CPU kernels
CUDA_MODULE = "lightllm._C_cuda"  # CUDA kernels, not built without a matching toolkit


class CMakeBuild(build_ext):
    """Configures CMake once, then builds each extension as its own CMake target."""

    def run(self) -> None:
        # setuptools builds into build_lib and copies to the source tree afterwards (--inplace,
        # editable installs): a CUDA module skipped by this build must not be left there from an
        # earlier one.
        self._into_source = bool(self.inplace or getattr(self, "editable_mode", False))
        self._configured = False
        super().run()

    def _configure(self, ext: Extension) -> "tuple[str, Path, bool] | None":
        """(cmake, build folder, whether the CUDA kernels are built); None when nothing can be built."""
        try:
            import torch  # noqa: F401  (the extensions link against this torch)
        except ImportError:
            _say(
                "torch is not importable in the build environment, so the native extensions are "
                "skipped (pure-Python install). Install torch first and build with "
                "`pip install --no-build-isolation`."
            )
            return None

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building lightllm._C needs CMake >= 3.22: pip install -r requirements-build.txt")

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # A build folder inside the source tree keeps re-installs incremental.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)

        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DLIGHTLLM_OUTPUT_DIR={out_path.parent}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")

        cuda_home = None if _env_flag("LIGHTLLM_SKIP_CUDA_BUILD") else find_cuda_home()
        import torch

        if _env_flag("LIGHTLLM_SKIP_CUDA_BUILD"):
            _say("LIGHTLLM_SKIP_CUDA_BUILD=1: building the C++ CPU kernels only, no CUDA kernels.")
        elif cuda_home is None:
            _say("no CUDA toolkit found (set CUDA_HOME): building the C++ CPU kernels only.")
        elif torch.version.cuda is None:
            _say(f"torch {torch.__version__} is a CPU-only build: building the C++ CPU kernels only.")
            cuda_home = None
        else:
            mismatch = cuda_version_mismatch(nvcc_release(cuda_home), torch.version.cuda)
            if mismatch is not None:
                _say(mismatch)
                cuda_home = None
        if cuda_home is not None:
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
            gencode = cuda_gencode_flags(arch_list) if arch_list else DEFAULT_GENCODE
            args += [
                "-DLIGHTLLM_WITH_CUDA=ON",
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DLIGHTLLM_CUDA_GENCODE={gencode}",
            ]
        else:
            args.append("-DLIGHTLLM_WITH_CUDA=OFF")
        subprocess.check_call([cmake, "-S", str(ROOT), "-B", str(build_dir), *args])
        return cmake, build_dir, cuda_home is not None

    def build_extension(self, ext: Extension) -> None:
        if not self._configured:  # once for both extensions
            self._configured = True
            self._cmake = self._configure(ext)
        if self._cmake is None:
            return
        cmake, build_dir, with_cuda = self._cmake
        if ext.name == CUDA_MODULE and not with_cuda:
            self._remove_stale(ext)
            return
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        target = ext.name.rsplit(".", 1)[1]
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs, "--target", target])

    def _remove_stale(self, ext: Extension) -> None:
        stale = [Path(self.get_ext_fullpath(ext.name))]
        if self._into_source:
            stale.append(Path(self._get_inplace_equivalent(self.get_finalized_command("build_py"), ext)[0]))
        for path in stale:
            if path.is_file():
                path.unlink()
                _say(f"removed {path}, left by an earlier build with CUDA kernels")


def native_extensions():
    if _env_flag("LIGHTLLM_SKIP_NATIVE_BUILD"):
        _say("LIGHTLLM_SKIP_NATIVE_BUILD=1: pure-Python install (reference and Triton backends).")
        return []
    # Optional: a build that skips the CUDA kernels leaves no _C_cuda, and setuptools must not
    # look for one.
    return [CMakeExtension(CPP_MODULE), CMakeExtension(CUDA_MODULE, optional=True)]


setup(
    # Triton kernels live in the top-level folder kernels/ but install as lightllm.kernels:
    # a top-level `kernels` module would shadow Hugging Face's `kernels` package.
    # Every package under lightllm/ (a new subpackage cannot be forgotten here), plus the kernels.
    packages=find_packages(where=str(ROOT), include=["lightllm", "lightllm.*"]) + ["lightllm.kernels"],
    package_dir={"lightllm": "lightllm", "lightllm.kernels": "kernels"},
    # The embedded default model ships inside the package (a Hugging Face model directory).
    package_data={"lightllm.models": ["shakespeare/*.json", "shakespeare/*.safetensors", "shakespeare/*.png"]},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
