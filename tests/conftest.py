import os

# Triton kernels run on the CPU through the interpreter when there is no GPU. This must be set
# before triton is first imported, so it happens here, before torch or lightllm are imported.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

# A self-test record in the user's cache changes the automatic defaults (lightllm.selftest): the
# tests start from none, in a folder of their own.
import tempfile  # noqa: E402

os.environ["LIGHTLLM_CACHE"] = tempfile.mkdtemp(prefix="lightllm-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

import lightllm  # noqa: E402
from lightllm import backends  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call":
        item.call_report = report  # read by _claimed_kernel_ran after the test


def cpu_backends() -> list[str]:
    """Backends that this process can run on CPU tensors (triton only under the interpreter)."""
    return [b for b in lightllm.available_backends() if b != "cuda" and (b != "triton" or backends.triton_interpreted())]


def gpu_backends() -> list[str]:
    return [b for b in ("cuda", "triton", "torch") if backends.why_unavailable(b) is None]


@pytest.fixture(autouse=True)
def _reset_backend_choice():
    lightllm.set_backend(None)
    yield
    lightllm.set_backend(None)


@pytest.fixture(autouse=True)
def _claimed_kernel_ran(request):
    """A test parametrized by ``backend`` claims that backend's kernels: every op call it makes with
    that backend chosen must run that backend's own implementation, not a fallback to another one
    (a fallback is fine in the product, never in a test that claims a kernel).
    ``@pytest.mark.handover(op, ...)`` names ops whose fallback the test expects and checks itself; ``@pytest.mark.no_dispatch`` a test that only checks refusals."""
    callspec = getattr(request.node, "callspec", None)
    claimed = callspec.params.get("backend") if callspec is not None else None
    if claimed not in backends.BACKENDS:
        yield
        return
    with backends.record_dispatches() as calls:
        yield
    outcome = getattr(request.node, "call_report", None)
    if outcome is None or not outcome.passed or request.node.get_closest_marker("no_dispatch"):
        return  # a failure or skip says so itself
    expected = {op for marker in request.node.iter_markers("handover") for op in marker.args}
    mine = [call for call in calls if call.chosen == claimed]
    wrong = sorted({(call.op, call.ran, call.fallback) for call in mine if call.ran != claimed
                    and call.op not in expected})
    assert not wrong, f"ops that did not run the claimed {claimed!r} kernel (op, ran, why): {wrong}"


def save_tiny_llama(path, hidden_size: int = 32, intermediate_size: int = 64):
    """A tiny random LLaMA (2 layers, GQA) with the embedded model's tokenizer (vocabulary 4096),
    saved to ``path``: fast to train in tests, real enough for every tuning method."""
    import transformers

    from lightllm.models import default_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
