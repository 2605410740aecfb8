"""transformers 4.57 (the last 4.x release, which AdapterHub and many users pin): lightllm's
Hugging Face-facing paths run there too.

The rest of the suite runs under the transformers this environment has (the newest). This test
builds a second virtual environment layered over this one: its own site-packages first (transformers
4.57 with the huggingface_hub 0.x and tokenizers it requires, installed there by pip), then this
environment's site-packages (torch, peft, bitsandbytes, lightllm itself, added with site.addsitedir
so that editable installs resolve as here). It then runs a focused subset of the HF-facing tests in
that environment (FOCUSED: hub ids with huggingface_hub 0.x, load_model / load_quantized / the CLI,
GPTQ and bitsandbytes checkpoints, quantizing a sharded model block by block, peft's own get_peft_model on lightllm's layers, prefix tuning
through 4.57's Cache classes, its generate() and its gradient checkpointing, the Trainer with
gradient checkpointing) and fails with their output if any fails.

pip needs the package index (as the README's install command does). Measured on a 2-core machine
shared with other jobs: 1 min 46 s and 4 min 15 s in two runs, and 12.6 min (with fewer tests)
under a load average of about 9.
"""

import os
import re
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRANSFORMERS_4 = "transformers>=4.57,<4.58"
# datasets: the Trainer tests; the newest requires huggingface_hub >= 1, so pip picks one that works with 0.x
WITH_IT = ("datasets",)

# node ids under tests/: each one exercises an HF-facing path (transformers models, their files, the hub)
FOCUSED = (
    "test_hub.py",
    "test_eval_and_cli.py::test_cli_quantize_then_eval",
    "test_bnb_checkpoints.py",
    "test_quantize_offload.py::test_sharded_model_streamed_equals_in_memory[gptq]",
    "test_quantize_offload.py::test_sharded_model_streamed_equals_in_memory[nf4]",
    "test_peft_integration.py",
    "test_prefix.py::test_generation_caches_hold_the_prefix_once",
    "test_prefix.py::test_a_forward_cache_continues_decoding",
    "test_prefix.py::test_gradient_checkpointing_gives_the_same_gradients[prefix-mlp-llama]",
    "test_prefix.py::test_gradient_checkpointing_gives_the_same_gradients[prompt-llama]",
    "test_prefix.py::test_generate_without_a_length_and_with_a_generation_config",
    "test_hf_trainer.py::test_gradient_checkpointing",
)


def _layered_venv(path: Path) -> Path:
    venv.create(path, with_pip=False, symlinks=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
    # a .pth line starting with "import" runs: addsitedir appends this environment's site-packages
    # after the new one's own and processes their .pth files (editable installs, distutils' shim)
    (Path(purelib) / "zz_parent_env.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in parents) + "\n")
    return python


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd[:6]} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.transformers457
def test_hf_facing_paths_under_transformers_4_57(tmp_path):
    python = _layered_venv(tmp_path / "venv457")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check",
          TRANSFORMERS_4, *WITH_IT], timeout=600)
    probe = _run([str(python), "-c", "import transformers, huggingface_hub, torch, lightllm; "
                  "print(transformers.__version__, huggingface_hub.__version__, lightllm.__file__)"],
                 cwd=ROOT, timeout=300).stdout.split()  # cwd: what pytest below imports
    assert probe[0].startswith("4.57."), probe
    assert int(probe[1].split(".")[0]) == 0, probe  # transformers 4.x requires huggingface_hub < 1.0
    assert Path(probe[2]).resolve().is_relative_to(ROOT.resolve()), probe  # this checkout, not another lightllm
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           *[f"tests/{node}" for node in FOCUSED]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = proc.stdout[-8000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"under transformers {probe[0]}:\n{tail}"
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 20 and " skipped" not in proc.stdout.splitlines()[-1], tail
