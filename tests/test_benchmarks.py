"""The benchmark scripts run end to end (tiny CPU configurations), so they cannot rot unnoticed.
These check that the scripts work and write their results, not how fast anything is."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, out: Path, *args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # no interpreter rows: too slow
    proc = subprocess.run([sys.executable, str(BENCH / name), "--device", "cpu", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows, "no result rows written"
    for row in rows:
        assert row.get("commit") and row.get("date") and row.get("card"), "rows are tagged with card, date, commit"
    return rows


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the benchmarks plot with matplotlib")
def test_bench_blockwise_runs(tmp_path):
    rows = run_script("bench_blockwise.py", tmp_path / "blockwise.csv", "--numel", "65536", "--blocksize", "256",
                      "--iters", "2", "--warmup", "1", "--overhead-numel", "4096")
    impls = {row["impl"] for row in rows}
    assert "torch" in impls
    timed = [row for row in rows if row["op"] != "overhead"]
    assert timed and all(row["check"] == "ok" for row in timed if row["impl"] != "bitsandbytes")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the benchmarks plot with matplotlib")
def test_bench_quant_matmul_runs(tmp_path):
    rows = run_script("bench_quant_matmul.py", tmp_path / "quant.csv", "--shapes", "256x256", "--m", "1",
                      "--iters", "2", "--warmup", "1", "--act-order")
    impls = {row["impl"] for row in rows}
    assert {"lightllm-torch", "lightllm-torch+act-order", "cublas-fp16"} <= impls
    assert all(row["accuracy"] == "ok" for row in rows), [(r["impl"], r["accuracy"]) for r in rows]


def test_bench_generate_runs(tmp_path):
    rows = run_script("bench_generate.py", tmp_path / "generate.csv", "--new-tokens", "4", "--repeats", "1")
    assert {row["mode"] for row in rows} == {"eager"} and len(rows) >= 2


def test_bench_gptq_solver_runs(tmp_path):
    rows = run_script("bench_gptq_solver.py", tmp_path / "solver.csv", "--shapes", "32x128", "--tokens", "512")
    assert [row["impl"] for row in rows] == ["plain PyTorch"]  # the fused solver needs a GPU (or the interpreter)
    assert float(rows[0]["seconds"]) > 0 and float(rows[0]["recon_error"]) > 0


def test_bench_optim_runs(tmp_path):
    rows = run_script("bench_optim.py", tmp_path / "optim.csv", "--problems", "tiny", "--iters", "2", "--warmup", "1")
    impls = {(row["impl"], row["backend"]) for row in rows}
    assert ("torch AdamW fused", "-") in impls and ("lightllm AdamW8bit", "cpp") in impls
    ours = next(row for row in rows if row["impl"] == "lightllm AdamW8bit")
    assert float(ours["state_bytes_per_param"]) < 2.1


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the benchmarks plot with matplotlib")
def test_bench_lora_runs(tmp_path):
    rows = run_script("bench_lora.py", tmp_path / "lora.csv", "--shapes", "64x40", "--tokens", "1", "17",
                      "--rank", "4", "--iters", "2", "--warmup", "1")
    impls = {(row["mode"], row["impl"]) for row in rows}
    assert {("fwd", "linear"), ("fwd", "lightllm-torch"), ("fwd", "addmm"), ("fwd+bwd", "lightllm-torch"),
            ("quant", "quant-linear"), ("quant", "lightllm-torch")} <= impls
    if importlib.util.find_spec("peft") is not None:
        assert ("fwd", "peft-fp32") in impls and ("fwd", "peft-fp16") in impls
    assert all(row["accuracy"] == "ok" for row in rows), [(r["impl"], r["accuracy"]) for r in rows]
    ours = [row for row in rows if row["impl"] == "lightllm-torch"]
    assert all(row["ratio_vs_base"] for row in ours)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="the benchmarks plot with matplotlib")
def test_bench_adapter_runs(tmp_path):
    rows = run_script("bench_adapter.py", tmp_path / "adapter.csv", "--shapes", "64x40", "--bottleneck", "4",
                      "--tokens", "1", "17", "--iters", "2", "--warmup", "1")
    impls = {(row["mode"], row["impl"]) for row in rows}
    assert {("fwd", "linear"), ("fwd", "lightllm-torch"), ("fwd", "eager-fp32"), ("fwd+bwd", "lightllm-torch"),
            ("fwd+bwd", "eager-half")} <= impls
    assert all(row["accuracy"] == "ok" for row in rows), [(r["impl"], r["accuracy"]) for r in rows]
    assert all(float(row["floor"]) > 1 for row in rows)


def test_tuning_training_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "training.csv"
    proc = subprocess.run([sys.executable, str(BENCH / "tuning_training.py"), "--steps", "2", "--methods",
                           "pfeiffer", "prompt", "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"].split(",")[0] for r in rows] == ["adapter: Pfeiffer (preset)", "prompt tuning"]
    assert all(float(r["ppl_before"]) > 1 and float(r["loss_before"]) > 0 and r["commit"] for r in rows)


def test_bench_prefix_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "prefix.csv"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_prefix.py"), "--device", "cpu", "--new-tokens", "3",
                           "--repeats", "1", "--prompt-tokens", "4", "--virtual-tokens", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["plain", "prefix tuning (2)", "prompt tuning (2)", "P-tuning (2)"]
    assert all(float(r["ms_per_token"]) > 0 and r["commit"] for r in rows)


def run_quick(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(BENCH / "device_check_quick.py"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_device_check_quick_cpu_areas(tmp_path):
    from lightllm import _native

    if not _native.has_cpp():
        pytest.skip("the blockwise area needs a kernel to check on the CPU: lightllm._C is not built")
    pytest.importorskip("triton.backends.nvidia", reason="the smem area compiles for sm_90 with Triton's backend")
    proc = run_quick("--device", "cpu", "--area", "blockwise", "--size", "12291", "--area", "smem", "--arch", "sm_90",
                     "--kernel", "_dequantize_blockwise", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "==> blockwise ok | 9/9 bit-exact (n=12291)" in proc.stdout
    blockwise = json.loads((tmp_path / "blockwise.json").read_text())
    assert {(r["dtype"], r["blocksize"]) for r in blockwise["rows"]} == {
        (d, b) for d in ("float32", "float16", "bfloat16") for b in (64, 2048, 4096)}
    assert all(r["check"] == "ok" and r["quantize_us"] > 0 for r in blockwise["rows"])
    smem = json.loads((tmp_path / "smem.json").read_text())
    assert smem["status"] == "ok" and smem["tags"]["limit"] == 232448
    assert len(smem["rows"]) == 2 and all(0 < r["shared_bytes"] <= r["limit"] for r in smem["rows"])

    refused = run_quick("--device", "cpu", "--area", "speed", out=tmp_path)
    assert refused.returncode == 2 and "speed needs a CUDA device" in refused.stdout


def test_device_check_candidates_and_script(tmp_path):
    record = {"format": 1, "commit": "abc1234", "card": "NVIDIA H100 80GB HBM3", "arch": "sm_90",
              "created": "2026-12-06T01:00:00+00:00",
              "ops": {"gptq_matmul": {"cuda": {"passed": True, "max_error": 1.2e-3},
                                      "triton": {"passed": False, "max_error": 0.5}},
                      "quantize_blockwise": {"cuda": {"passed": True, "max_error": 0.0},
                                             "torch": {"passed": True, "max_error": 0.0}}}}
    (tmp_path / "selftest_record.json").write_text(json.dumps(record))
    proc = run_quick("--area", "candidates", out=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    candidates = json.loads((tmp_path / "gpu_verified_candidates.json").read_text())
    assert candidates == {
        "gptq_matmul|cuda|sm_90": {"card": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "date": "2026-12-06",
                                   "max_error": 1.2e-3},
        "quantize_blockwise|cuda|sm_90": {"card": "NVIDIA H100 80GB HBM3", "commit": "abc1234",
                                          "date": "2026-12-06", "max_error": 0.0}}
    assert '    ("gptq_matmul", "cuda", "sm_90"): {"card": "NVIDIA H100 80GB HBM3", "commit": "abc1234", ' \
           '"date": "2026-12-06", "max_error": 0.0012},' in proc.stdout

    script = BENCH / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "--quick fits 9 minutes" in usage.stdout
    bad = subprocess.run(["bash", str(script), "--quick", "--only", "tests"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "not an area of this mode" in bad.stderr


def test_bench_bnb_layers_runs(tmp_path):
    rows = run_script("bench_bnb_layers.py", tmp_path / "bnb.csv", "--quick", "--shapes", "64x256", "--m", "1", "17",
                      "--iters", "2")
    impls = {(row["section"], row["impl"]) for row in rows}
    assert {("nf4-matmul", "lightllm-cpp"), ("nf4-matmul", "f32-linear"), ("nf4-quantize", "lightllm-cpp"),
            ("int8-linear", "lightllm-cpp")} <= impls
    assert all(row["check"] == "ok" for row in rows), [(r["impl"], r["check"]) for r in rows if r["check"] != "ok"]


def test_bench_qlora_bnb_runs(tmp_path):
    rows = run_script("bench_qlora_bnb.py", tmp_path / "qlora.csv", "--quick", "--quant", "nf4", "int8", "--tokens", "1",
                      "17", "--modes", "fwd+bwd")
    assert {row["impl"] for row in rows} == {"base", "fused", "unfused"}
    fused = [row for row in rows if row["impl"] == "fused"]
    assert len(fused) == 2 * 2 and all(row["check"] == "ok" for row in fused)
