"""Installation: kernels/ must import as lightllm.kernels from a wheel and from an editable install,
and the pure-Python and CPU-only builds must import and say what they skipped.

Builds run on a copy of the source tree, so the checkout under test is never touched, and with
the native build skipped where the point is packaging (CI compiles the extension once, not again).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys
for i, finder in enumerate(list(sys.meta_path)):
    # An editable install's finder goes to the end of meta_path; put ours first so an outer
    # install of lightllm on the inherited path cannot answer instead.
    if getattr(finder, "__module__", "").startswith("__editable___lightllm"):
        sys.meta_path.insert(0, sys.meta_path.pop(i))
import lightllm, lightllm.kernels, lightllm.kernels.blockwise
print(lightllm.__file__)
print(lightllm.kernels.__file__)
print(",".join(lightllm.available_backends()))
"""


def copy_source(dest: Path) -> Path:
    src = dest / "src"
    shutil.copytree(
        ROOT, src,
        ignore=shutil.ignore_patterns(".git", "build", "dist", "*.so", "__pycache__", "*.egg-info", ".ci-venv", "results"),
    )
    return src


def build_env(**flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTLLM_")}
    env.update(flags)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(cmd, cwd, env=None, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def test_wheel_installs_kernels_as_a_subpackage(tmp_path):
    src = copy_source(tmp_path)
    out = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path / "wheels"), str(src)],
              cwd=tmp_path, env=build_env(LIGHTLLM_SKIP_NATIVE_BUILD="1"))
    assert out.count("LIGHTLLM_SKIP_NATIVE_BUILD=1: pure-Python install") == 1
    (wheel,) = (tmp_path / "wheels").glob("lightllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightllm/kernels/__init__.py" in names and "lightllm/kernels/blockwise.py" in names
    assert not any(n.startswith("kernels/") for n in names), "no top-level `kernels` package may be installed"
    assert not any(n.endswith(".so") for n in names)
    site = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(site)
    # -I: no current directory or user site on the path; the unpacked wheel goes first, and an
    # editable install of this checkout (a meta-path finder) must not fill in lightllm._C.
    prelude = (
        f"import sys; sys.path.insert(0, {str(site)!r})\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable___lightllm')]\n"
    )
    lines = run([sys.executable, "-I", "-c", prelude + CHECK],
                cwd=tmp_path).split("\n")
    assert lines[0].startswith(str(site / "lightllm")) and lines[1].startswith(str(site / "lightllm" / "kernels"))
    assert "cpp" not in lines[2].split(",") and "torch" in lines[2].split(",")


def _venv_over_this_environment(path: Path) -> Path:
    """A fresh venv that sees this environment's packages (torch, pip, setuptools, ...) as plain path
    entries, so this environment's own lightllm install (an editable finder, run from a .pth) stays
    out, and pip, finding that install outside the venv, leaves it alone."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    target_site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=path).strip()
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(target_site, "outer_environment.pth").write_text("\n".join(sorted(outer)) + "\n")
    return python


def test_editable_install_imports_kernels(tmp_path):
    src = copy_source(tmp_path)
    python = _venv_over_this_environment(tmp_path / "venv")
    out = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-v", "-e", str(src)],
              cwd=tmp_path, env=build_env(LIGHTLLM_SKIP_NATIVE_BUILD="1"))
    assert out.count("LIGHTLLM_SKIP_NATIVE_BUILD=1: pure-Python install") == 1
    lines = run([str(python), "-c", CHECK], cwd=tmp_path).split("\n")
    assert lines[0] == str(src / "lightllm" / "__init__.py")
    assert lines[1] == str(src / "kernels" / "__init__.py")


@pytest.mark.slow
def test_cpu_only_native_build(tmp_path):
    """LIGHTLLM_SKIP_CUDA_BUILD=1 builds the C++ CPU kernels alone, says so, and they load."""
    src = copy_source(tmp_path)
    python = _venv_over_this_environment(tmp_path / "venv")
    out = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-v", "-e", str(src)],
              cwd=tmp_path, env=build_env(LIGHTLLM_SKIP_CUDA_BUILD="1", MAX_JOBS="2"))
    assert out.count("LIGHTLLM_SKIP_CUDA_BUILD=1: building the C++ CPU kernels only") == 1
    check = CHECK + "import lightllm._native as n; print(n.has_cpp(), n.has_cuda_kernels())\n"
    lines = run([str(python), "-c", check], cwd=tmp_path).split("\n")
    assert lines[0] == str(src / "lightllm" / "__init__.py")
    assert "cpp" in lines[2].split(",")
    assert lines[3] == "True False"


# ---- the checkout's kernels/ folder must not stand in for Hugging Face's `kernels` ----------------
# `python -m ...`, `python -c` and pytest started in the checkout put its root first on sys.path,
# where kernels/ (a regular package, for the editable install) would shadow an installed `kernels`.

def _run_in_checkout(code: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"in {ROOT}:\n{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().split("\n")


def test_root_first_on_the_path_still_imports_another_kernels_package(tmp_path):
    """A `kernels` package later on the path (here a stand-in for Hugging Face's) is what
    `import kernels` gives, submodules included; lightllm.kernels stays ours in the same process."""
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("__version__ = 'installed-elsewhere'\n")
    (other / "layer.py").write_text("WHERE = 'installed-elsewhere layer'\n")
    lines = _run_in_checkout(
        "import os, sys\n"
        f"assert os.path.realpath(sys.path[0] or '.') == {str(ROOT)!r}, sys.path[:2]\n"
        f"sys.path.insert(1, {str(tmp_path / 'site')!r})\n"
        "import kernels, kernels.layer\n"
        "from kernels.layer import WHERE\n"
        "import lightllm.kernels.blockwise as ours\n"
        "print(kernels.__version__); print(kernels.__file__); print(WHERE); print(ours.__file__)\n"
    )
    assert lines[0] == "installed-elsewhere"
    assert lines[1] == str(other / "__init__.py")
    assert lines[2] == "installed-elsewhere layer"
    assert lines[3] == str(ROOT / "kernels" / "blockwise.py") or "site-packages" in lines[3]


def test_transformers_and_hugging_face_kernels_import_from_the_checkout_root():
    """The failure a new user met (issue 13): transformers >= 5.25 requires Hugging Face's
    `kernels` and imports it; from the checkout's root it must get the real one, not kernels/."""
    import importlib.metadata

    lines = _run_in_checkout(
        "import transformers\n"
        "from transformers import LlamaForCausalLM\n"
        "import kernels\n"
        "print(transformers.__version__); print(kernels.__file__); print(getattr(kernels, '__version__', 'none'))\n"
    )
    try:
        installed = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is None:
        # No Hugging Face `kernels` here (transformers < 5.25 does not need it): the folder stays an
        # empty stand-in without a version, which transformers judges unusable, and it imports.
        assert lines[1] == str(ROOT / "kernels" / "__init__.py") and lines[2] == "none"
    else:
        assert lines[1] != str(ROOT / "kernels" / "__init__.py"), "`import kernels` gave the checkout's folder"
        assert os.path.samefile(lines[1], installed.locate_file("kernels/__init__.py"))
        assert lines[2] == installed.version


def _setup_helpers() -> dict:
    """setup.py's helper functions, classes and constants, without running setup() (which the
    module does when executed)."""
    import ast

    source = (ROOT / "setup.py").read_text()
    tree = ast.parse(source)
    tree.body = [node for node in tree.body
                 if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign))]
    namespace = {"__file__": str(ROOT / "setup.py")}
    exec(compile(tree, "setup.py", "exec"), namespace)
    return namespace


def test_cuda_kernels_need_nvcc_and_torch_of_the_same_cuda_major(tmp_path):
    helpers = _setup_helpers()
    mismatch = helpers["cuda_version_mismatch"]
    assert mismatch("13.0", "13.0") is None
    assert mismatch("13.1", "13.0") is None  # minor versions within a major are compatible
    assert mismatch(None, "13.0") is None  # unknown: the compiler will say
    message = mismatch("12.4", "13.0")
    assert message is not None and "CUDA 12.4" in message and "CUDA 13.0" in message and "CUDA_HOME" in message
    # nvcc's version read from its banner, as a toolkit prints it
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    "echo 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    assert helpers["nvcc_release"](tmp_path) == "12.4"
    assert helpers["nvcc_release"](tmp_path / "absent") is None


def test_the_cpu_and_cuda_kernels_are_two_extensions(monkeypatch):
    """lightllm._C (C++ CPU kernels) and lightllm._C_cuda (CUDA kernels) are separate modules, so
    one failing to load leaves the other; the CUDA one is optional: a build without a matching CUDA
    toolkit leaves it out, and setuptools must not expect it."""
    helpers = _setup_helpers()
    for name in ("LIGHTLLM_SKIP_NATIVE_BUILD", "LIGHTLLM_SKIP_CUDA_BUILD"):
        monkeypatch.delenv(name, raising=False)
    extensions = {ext.name: ext for ext in helpers["native_extensions"]()}
    assert sorted(extensions) == ["lightllm._C", "lightllm._C_cuda"]
    assert extensions["lightllm._C_cuda"].optional and not extensions["lightllm._C"].optional
    monkeypatch.setenv("LIGHTLLM_SKIP_NATIVE_BUILD", "1")
    assert helpers["native_extensions"]() == []


def test_the_cpu_extension_needs_no_cuda_library():
    """lightllm._C must load where CUDA cannot: it names no CUDA library to the dynamic loader."""
    import lightllm._native as native

    if native.cpp_module() is None:
        pytest.skip(f"lightllm._C is not loaded: {native.load_error}")
    image = Path(native.cpp_module().__file__).read_bytes()
    for library in (b"libcudart.so", b"libc10_cuda.so", b"libtorch_cuda.so", b"libcuda.so"):
        assert library not in image, library
