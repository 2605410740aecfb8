"""Backend selection: names, precedence, availability errors, defaults, and the info command."""

import subprocess
import sys

import pytest
import torch

import lightllm
from lightllm import backends
from lightllm import functional as F


def test_reference_is_always_available():
    assert "torch" in lightllm.available_backends()
    assert backends.why_unavailable("torch") is None


def test_cpp_backend_present_when_extension_is_built():
    assert ("cpp" in lightllm.available_backends()) == (lightllm._native.cpp_module() is not None)
    if lightllm._native.cuda_module() is None:
        assert "lightllm._C_cuda is not loaded" in backends.why_unavailable("cuda")


# A CUDA module that cannot load (built against another CUDA runtime, a driver too old for it...):
# the import fails with the loader's message, which this stand-in raises in a child process.
_BROKEN_CUDA_MODULE = """
import importlib.abc, importlib.machinery, sys

class BrokenCudaModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "lightllm._C_cuda" else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ImportError("libcudart.so.99: cannot open shared object file (stand-in)")

sys.meta_path.insert(0, BrokenCudaModule())
"""


def test_a_cuda_module_that_fails_to_load_leaves_the_cpp_kernels(tmp_path):
    if lightllm._native.cpp_module() is None:
        pytest.skip("lightllm._C is not built in this install")
    check = _BROKEN_CUDA_MODULE + """
import torch
import lightllm
from lightllm import _native, backends
from lightllm import functional as F
from lightllm.__main__ import main
from lightllm.ops.blockwise import quantize_blockwise_reference

print(_native.has_cpp(), _native.has_cuda_kernels())
print(backends.why_unavailable("cuda"))
print(backends.why_unavailable("cpp"))
x = torch.randn(3000, generator=torch.Generator().manual_seed(0))
code = F.create_dynamic_map(True)
ref_codes, ref_absmax = quantize_blockwise_reference(x, code, 256)
direct = _native.cpp_module().quantize_blockwise(x, code, 256)
with lightllm.use_backend("cpp"):
    codes, absmax = torch.ops.lightllm.quantize_blockwise(x, code, 256)
print(all(torch.equal(a, b) for a, b in zip((*direct, codes, absmax), (ref_codes, ref_absmax) * 2)),
      backends.resolve("quantize_blockwise", x.device)[0])
main(["info"])
"""
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == "True False"
    assert lines[1].startswith("lightllm._C_cuda is not loaded (ImportError: libcudart.so.99")
    assert lines[2] == "None"
    assert lines[3] == "True cpp"
    info = proc.stdout
    assert "lightllm._C loaded: C++ CPU kernels" in info
    assert "lightllm._C_cuda not loaded: ImportError: libcudart.so.99: cannot open shared object file" in info
    assert "cpp (available)" in info and "cuda (unavailable: lightllm._C_cuda is not loaded (ImportError" in info


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="unknown lightllm backend 'cudnn'"):
        lightllm.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown lightllm backend"):
        with lightllm.use_backend("fast"):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_unavailable_backend_says_why():
    with pytest.raises(lightllm.BackendUnavailableError, match="'cuda' is not available here: "):
        lightllm.set_backend("cuda")


def test_precedence_scoped_over_global_over_environment(monkeypatch):
    monkeypatch.setenv("LIGHTLLM_BACKEND", "torch")
    assert lightllm.get_backend() == "torch"
    lightllm.set_backend("auto")
    assert lightllm.get_backend() == "torch", "'auto' clears set_backend, the environment still applies"
    lightllm.set_backend("torch")
    with lightllm.use_backend("auto"):
        assert lightllm.get_backend() == "auto"
        with lightllm.use_backend("torch"):
            assert lightllm.get_backend() == "torch"
        assert lightllm.get_backend() == "auto"
    assert lightllm.get_backend() == "torch"
    lightllm.set_backend(None)
    monkeypatch.delenv("LIGHTLLM_BACKEND")
    assert lightllm.get_backend() == "auto"


def test_use_backend_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with lightllm.use_backend("torch"):
            raise RuntimeError("boom")
    assert lightllm.get_backend() == "auto"


def test_environment_choice_is_used_by_ops(monkeypatch):
    monkeypatch.setenv("LIGHTLLM_BACKEND", "torch")
    assert backends.resolve("quantize_blockwise", torch.device("cpu"))[0] == "torch"
    monkeypatch.setenv("LIGHTLLM_BACKEND", "turbo")
    with pytest.raises(ValueError, match="LIGHTLLM_BACKEND: unknown lightllm backend 'turbo'"):
        F.quantize_blockwise(torch.randn(100), blocksize=64)


def test_forced_backend_that_cannot_run_on_the_device_raises(monkeypatch):
    # Triton runs CPU tensors only under the interpreter; without it, naming triton is an error.
    if "triton" not in lightllm.available_backends():
        pytest.skip("triton is not installed")
    with lightllm.use_backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        if torch.cuda.is_available():
            with pytest.raises(lightllm.BackendUnavailableError, match="cannot run on cpu tensors"):
                F.quantize_blockwise(torch.randn(100), blocksize=64)
        else:
            with pytest.raises(lightllm.BackendUnavailableError, match="triton.*not available"):
                F.quantize_blockwise(torch.randn(100), blocksize=64)


def test_cpu_default_is_the_native_kernel_when_built():
    expected = "cpp" if "cpp" in lightllm.available_backends() else "torch"
    assert backends.default_backend("quantize_blockwise", "cpu") == expected
    assert backends.resolve("dequantize_blockwise", torch.device("cpu"))[0] == expected


def test_gpu_default_names_only_verified_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the card is a stand-in
    monkeypatch.setattr(backends, "device_arch", lambda index=None: "sm_90")
    # Nothing verified: the reference, whatever is built.
    monkeypatch.setattr(backends, "GPU_VERIFIED", {})
    assert backends.default_backend("quantize_blockwise", "cuda") == "torch"
    # A verified kernel becomes the default only where it can run, and only on its architecture.
    monkeypatch.setattr(backends, "GPU_VERIFIED",
                        {("quantize_blockwise", "cuda", "sm_90"): {"card": "test", "commit": "x"}})
    monkeypatch.setattr(backends, "why_unavailable", lambda b: None)
    monkeypatch.setattr(backends, "device_arch", lambda index=None: "sm_90")
    assert backends.default_backend("quantize_blockwise", "cuda") == "cuda"
    assert backends.default_backend("dequantize_blockwise", "cuda") == "torch"
    monkeypatch.setattr(backends, "device_arch", lambda index=None: "sm_89")  # an RTX 4090: not verified there
    assert backends.default_backend("quantize_blockwise", "cuda") == "torch"
    monkeypatch.setattr(backends, "device_arch", lambda index=None: "sm_90")
    monkeypatch.setattr(backends, "why_unavailable", lambda b: "not built" if b == "cuda" else None)
    assert backends.default_backend("quantize_blockwise", "cuda") == "torch"
    row = next(r for r in backends.op_table() if r["op"] == "quantize_blockwise")
    assert row["gpu_verified"] == {"cuda sm_90": {"card": "test", "commit": "x"}}


DEFAULT_GENCODE = ("-gencode=arch=compute_80,code=sm_80;-gencode=arch=compute_90a,code=sm_90a;"
                   "-gencode=arch=compute_90,code=compute_90")


@pytest.mark.parametrize("capability,runs", [
    ((8, 0), True),   # A100: sm_80 SASS
    ((8, 6), True),   # RTX 30xx, A10G: sm_80 SASS runs on later minors of major 8
    ((8, 9), True),   # RTX 40xx, L4, L40S
    ((9, 0), True),   # H100/H200: sm_90a
    ((10, 0), True),  # B200: the driver compiles the compute_90 PTX
    ((7, 5), False),  # T4
    ((7, 0), False),  # V100
])
def test_which_cards_the_compiled_cuda_images_run_on(capability, runs):
    problem = backends.cuda_image_problem(capability, DEFAULT_GENCODE)
    assert (problem is None) == runs, problem
    if not runs:
        sm = f"sm_{capability[0]}{capability[1]}"
        assert sm in problem and "sm_80, sm_90a, PTX compute_90" in problem
        assert f"TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}" in problem
    # arch-specific SASS runs on its own architecture only, and without PTX nothing later runs
    only_90a = "-gencode=arch=compute_90a,code=sm_90a"
    assert backends.cuda_image_problem((9, 0), only_90a) is None
    assert backends.cuda_image_problem((10, 0), only_90a) is not None
    assert backends.cuda_image_problem((8, 9), "-gencode=arch=compute_86,code=sm_86") is None
    assert backends.cuda_image_problem((8, 0), "-gencode=arch=compute_86,code=sm_86") is not None
    # family-specific code runs within its major only; plain PTX on every later card
    assert backends.cuda_image_problem((10, 3), "-gencode=arch=compute_100f,code=compute_100f") is None
    assert backends.cuda_image_problem((12, 0), "-gencode=arch=compute_100f,code=compute_100f") is not None
    assert backends.cuda_image_problem((12, 0), "-gencode=arch=compute_100,code=compute_100") is None


def test_the_cuda_backend_names_a_card_it_has_no_image_for(monkeypatch):
    """A T4 with the default build: `info` and a by-name choice say why, instead of the first call
    failing with 'no kernel image is available'."""
    monkeypatch.setattr(backends._native, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(backends._native, "cuda_module", lambda: type("Built", (), {"cuda_gencode": DEFAULT_GENCODE}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as once an op has seen a CUDA tensor
    monkeypatch.setattr(backends, "_device_capability", lambda index: (7, 5))
    reason = backends.why_unavailable("cuda")
    assert reason is not None and "sm_75" in reason
    with pytest.raises(backends.BackendUnavailableError, match="sm_75"):
        with lightllm.use_backend("cuda"):
            pass
    monkeypatch.setattr(backends, "_device_capability", lambda index: (8, 9))
    assert backends.why_unavailable("cuda") is None
    # before CUDA is started in this process the card is not read (that would start it)
    monkeypatch.setattr(backends, "_device_capability", lambda index: (7, 5))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert backends.why_unavailable("cuda") is None


def test_record_dispatches_says_what_was_asked_for_and_what_ran(monkeypatch):
    x = torch.randn(300)
    with backends.record_dispatches() as outer:
        F.quantize_blockwise(x, blocksize=256)  # the automatic default
        with lightllm.use_backend("cuda" if backends.why_unavailable("cuda") is None else "torch"), \
                backends.record_dispatches() as inner:
            torch.ops.lightllm.lora_shrink(torch.randn(2, 8), torch.randn(3, 8))  # lora_shrink has no cuda kernel
    assert outer[0] == backends.Dispatch("quantize_blockwise", "auto", backends.default_backend("quantize_blockwise",
                                                                                                "cpu"))
    assert outer[1:] == inner and len(inner) == 1
    if inner[0].chosen == "cuda":
        assert inner[0].ran == "torch" and inner[0].fallback == "lora_shrink has no 'cuda' kernel"
    with backends.record_dispatches() as after:
        pass
    F.quantize_blockwise(x, blocksize=256)  # outside every block: nothing recorded
    assert after == [] and backends._recorders == []


def test_an_implementation_that_hands_a_call_on_is_recorded_as_such(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))

    def kernel(x):
        if x.numel() > 4:
            backends.note_handover("demo_op", "cpp", "torch", "more than 4 values")
            return x * 2
        return x + x

    backends.register("demo_op", "torch", ("cpu",))(lambda x: x * 2)
    backends.register("demo_op", "cpp", ("cpu",))(kernel)
    with lightllm.use_backend("cpp" if backends.why_unavailable("cpp") is None else "torch"), \
            backends.record_dispatches() as calls:
        for n in (3, 5):
            backends.resolve("demo_op", torch.device("cpu"))[1](torch.ones(n))
    if calls[0].chosen == "cpp":
        assert [(c.ran, c.fallback) for c in calls] == [("cpp", None), ("torch", "more than 4 values")]


def test_every_registered_op_has_a_reference():
    for row in backends.op_table():
        assert "torch" in row["implemented"], row


def test_info_command_reports_backends_and_verification():
    out = subprocess.run([sys.executable, "-m", "lightllm", "info"], capture_output=True, text=True, check=True).stdout
    assert f"lightllm {lightllm.__version__}" in out
    assert "torch (available)" in out
    assert "quantize_blockwise" in out and "dequantize_blockwise" in out
    help_text = subprocess.run([sys.executable, "-m", "lightllm", "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in help_text
