"""The self-test's mechanics on the CPU: each (op, backend) in its own child process, a record the
dispatcher reads for this machine and build only, failures, crashes, timeouts and handovers reported
as such, stale and corrupt records ignored with one warning. The GPU sweeps run in device_check.sh."""

import json
import logging
import sys
import textwrap

import pytest
import torch

from lightllm import __main__ as cli
from lightllm import backends, selftest

needs_cpp = pytest.mark.skipif(backends.why_unavailable("cpp") is not None,
                               reason=f"C++ kernels not built: {backends.why_unavailable('cpp')}")

PLUGIN = '''
import ctypes
import time

import torch

from lightllm import backends, selftest


def reference(x):
    return x * 2


def kernels():
    def handover(x):
        backends.note_handover("demo_handover", "cpp", "torch", "outside the kernel's range")
        return reference(x)

    return {
        "demo_right": lambda x: x + x,
        "demo_wrong": lambda x: x * 2 + 1e-3 * x.abs().max(),  # off by far more than rounding
        "demo_crash": lambda x: ctypes.string_at(0),  # a segmentation fault, as a bad kernel would
        "demo_slow": lambda x: time.sleep(120),
        "demo_raise": lambda x: (_ for _ in ()).throw(IndexError("block index out of range")),
        "demo_handover": handover,
    }


for op, fn in kernels().items():
    backends.register(op, "torch", ("cpu",))(reference)
    backends.register(op, "cpp", ("cpu",))(fn)


@selftest.sweep_for(*kernels())
def sweep(checker, small):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    call = lambda t: backends.resolve(checker.op, t.device)[1](t)  # noqa: E731
    checker.close("n=1000", checker.run(call, x), checker.reference(call, x), x.double() * 2)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module registering demo ops whose C++ "kernels" are right, wrong, crash, hang, raise or hand
    over; importable here and in the self-test's child processes."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "selftest_demo_plugin.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder) + ":" + __import__("os").environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(selftest, "_SWEEPS", dict(selftest._SWEEPS))
    yield "selftest_demo_plugin"
    sys.modules.pop("selftest_demo_plugin", None)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTLLM_CACHE", str(tmp_path / "cache"))
    selftest.forget_records()
    yield
    selftest.forget_records()


@needs_cpp
def test_each_outcome_is_reported_and_one_bad_kernel_fails_only_itself(plugin):
    record = selftest.run_selftest("cpu", ops=["demo_right", "demo_wrong", "demo_crash", "demo_slow", "demo_raise",
                                               "demo_handover"], timeout=20, imports=[plugin], progress=False)
    ops = record["ops"]
    assert set(ops) == {"demo_right", "demo_wrong", "demo_crash", "demo_slow", "demo_raise", "demo_handover"}
    right = ops["demo_right"]["cpp"]
    assert right["passed"] and right["cases"] == 1 and right["max_error"] == 0.0
    wrong = ops["demo_wrong"]["cpp"]
    assert not wrong["passed"] and wrong["failed"] == 1 and wrong["max_error"] > 1e-4
    assert "bound" in wrong["detail"]
    crash = ops["demo_crash"]["cpp"]
    assert not crash["passed"] and "exited with code -11" in crash["detail"]
    assert not ops["demo_slow"]["cpp"]["passed"] and "timed out after 20 s" in ops["demo_slow"]["cpp"]["detail"]
    raised = ops["demo_raise"]["cpp"]
    assert not raised["passed"] and "IndexError: block index out of range" in raised["detail"]
    handover = ops["demo_handover"]["cpp"]
    assert not handover["passed"] and handover["cases"] == 0 and "never ran" in handover["detail"]

    # the record on disk is what the dispatcher reads: only the kernel that passed stays the default
    on_disk = json.loads(selftest.record_path("cpu").read_text())
    assert on_disk["ops"] == ops and on_disk["arch"] == "cpu" and on_disk["torch"] == torch.__version__
    assert backends.default_choice("demo_right", "cpu") == ("cpp", "C++ kernel")
    for op in ("demo_wrong", "demo_crash", "demo_slow", "demo_raise", "demo_handover"):
        backend, source = backends.default_choice(op, "cpu")
        assert backend == "torch" and "failed the local self-test" in source, op


@needs_cpp
def test_real_cpu_kernels_pass_and_a_narrowed_run_adds_to_the_record():
    first = selftest.run_selftest("cpu", ops=["quantize_blockwise"], backend_names=["cpp"], progress=False)
    assert first["ops"]["quantize_blockwise"]["cpp"]["passed"], first["ops"]
    assert first["ops"]["quantize_blockwise"]["cpp"]["cases"] >= 20
    second = selftest.run_selftest("cpu", ops=["dequantize_blockwise"], backend_names=["cpp"], progress=False)
    assert set(second["ops"]) == {"quantize_blockwise", "dequantize_blockwise"}
    assert all(r["cpp"]["passed"] for r in second["ops"].values())
    assert selftest.local_result("quantize_blockwise", "cpp", "cpu") is True
    assert selftest.local_result("optimizer_step", "cpp", "cpu") is None  # not run: no entry


@pytest.mark.skipif(not backends.triton_interpreted() or backends.why_unavailable("triton") is not None,
                    reason="Triton runs on the CPU only under TRITON_INTERPRET=1")
def test_triton_kernels_run_under_the_interpreter_in_the_child():
    record = selftest.run_selftest("cpu", ops=["lora_shrink", "dequantize_blockwise"], backend_names=["triton"],
                                   save=False, progress=False)
    for op in ("lora_shrink", "dequantize_blockwise"):
        result = record["ops"][op]["triton"]
        assert result["passed"] and result["cases"] > 0, (op, result)
    assert not selftest.record_path("cpu").exists()  # save=False


def _write_record(ops: dict, **changes) -> None:
    record = {"format": selftest.RECORD_FORMAT, "device_type": "cpu", **selftest.device_identity("cpu"),
              **selftest._software(), "created": "2026-12-05T00:00:00+00:00", "ops": ops, **changes}
    path = selftest.record_path("cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


FAILED = {"quantize_blockwise": {"cpp": {"passed": False, "max_error": 1.0, "cases": 3, "seconds": 1.0}}}


@needs_cpp
@pytest.mark.parametrize("change,why", [
    ({"torch": "0.0.1"}, "torch changed"),
    ({"lightllm": "0.0.0"}, "lightllm changed"),
    ({"fingerprint": "0123456789abcdef"}, "the kernel code changed"),
    ({"card": "another CPU"}, "it was run on 'another CPU'"),
    ({"format": 99}, "not a lightllm self-test record"),
])
def test_a_stale_record_is_ignored_with_one_warning(change, why, caplog):
    _write_record(FAILED, **change)
    with caplog.at_level(logging.WARNING, logger="lightllm"):
        assert backends.default_choice("quantize_blockwise", "cpu") == ("cpp", "C++ kernel")
        assert backends.default_choice("quantize_blockwise", "cpu") == ("cpp", "C++ kernel")
        torch.ops.lightllm.quantize_blockwise(torch.randn(300), torch.linspace(-1, 1, 256), 256)
    warnings = [r.getMessage() for r in caplog.records if "self-test record" in r.getMessage()]
    assert len(warnings) == 1 and why in warnings[0], warnings


@needs_cpp
def test_a_current_record_changes_the_default_and_a_corrupt_one_is_ignored(caplog):
    _write_record(FAILED)
    assert backends.default_choice("quantize_blockwise", "cpu")[0] == "torch"
    with backends.record_dispatches() as calls:
        torch.ops.lightllm.quantize_blockwise(torch.randn(300), torch.linspace(-1, 1, 256), 256)
    assert [c.ran for c in calls] == ["torch"]
    selftest.record_path("cpu").write_text('{"format": 1, "ops": {"quantize_blockw')  # cut short mid-write
    selftest.forget_records()
    with caplog.at_level(logging.WARNING, logger="lightllm"):
        assert backends.default_choice("quantize_blockwise", "cpu")[0] == "cpp"
    assert any("cannot be read" in r.getMessage() for r in caplog.records)


def test_a_gpu_default_comes_from_the_built_in_record_or_this_card_s_self_test(monkeypatch):
    """The cuda branch of the dispatcher without a GPU: the card, its availability and its record
    are stand-ins; the choice logic is the real one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "device_arch", lambda index=None: "sm_89")
    monkeypatch.setattr(backends, "why_unavailable", lambda b: None)
    monkeypatch.setattr(backends, "GPU_VERIFIED", {("gptq_matmul", "cuda", "sm_90"): {"card": "H100", "commit": "x"}})
    passed = {("lora_linear", "triton"), ("gptq_matmul", "triton")}
    monkeypatch.setattr(selftest, "local_result",
                        lambda op, backend, device_type, index=None: (op, backend) in passed if device_type == "cuda"
                        else None)
    assert backends.default_choice("gptq_matmul", "cuda") == ("triton", "local self-test")  # H100's pass: not sm_89
    assert backends.default_choice("lora_linear", "cuda") == ("triton", "local self-test")
    assert backends.default_choice("optimizer_step", "cuda") == ("torch", "reference")
    monkeypatch.setattr(backends, "device_arch", lambda index=None: "sm_90")
    assert backends.default_choice("gptq_matmul", "cuda") == ("cuda", "built-in record")


@needs_cpp
def test_cli_prints_the_table_writes_json_and_info_shows_the_record(tmp_path, capsys):
    out = tmp_path / "record.json"
    code = cli.main(["selftest", "--device", "cpu", "--ops", "dequantize_blockwise", "--backends", "cpp",
                     "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "dequantize_blockwise" in text and "passed" in text and "record written to" in text
    assert json.loads(out.read_text())["ops"]["dequantize_blockwise"]["cpp"]["passed"]
    assert cli.main(["info"]) == 0
    info = capsys.readouterr().out
    assert f"selftest cpu: {selftest.record_path('cpu')}" in info and "applies to this build" in info


def test_bad_requests_are_refused_clearly():
    with pytest.raises(ValueError, match="none of the ops"):
        selftest.run_selftest("cpu", ops=["no_such_op"], progress=False)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        selftest.run_selftest("meta", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            selftest.run_selftest("cuda", progress=False)


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTLLM_CACHE", str(tmp_path / "here"))
    assert selftest.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("LIGHTLLM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert selftest.cache_dir() == tmp_path / "xdg" / "lightllm"
