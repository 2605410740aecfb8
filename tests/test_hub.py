"""Hugging Face hub ids wherever lightllm takes a folder (lightllm.hub.resolve_folder): load_model,
load_quantized, lightllm.tuning.from_pretrained / load_adapter and the CLI's --model / --adapter,
with --revision and --subfolder.

Everything runs offline (HF_HUB_OFFLINE=1) against a cache laid out here the way huggingface_hub
lays out its own (models--org--name/{blobs,snapshots/<commit>,refs/<branch or tag>}); the layout is
checked with huggingface_hub's own cache scanner, and the results are compared with what
transformers and peft load from the same cache and with the same files loaded from a plain folder.
"""

import hashlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from conftest import save_tiny_llama  # noqa: E402

from lightllm.__main__ import main  # noqa: E402
from lightllm.hub import looks_like_hub_id, resolve_folder  # noqa: E402
from lightllm.models import load_model  # noqa: E402
from lightllm.nn import QuantLinear  # noqa: E402
from lightllm.quantization import CheckpointError, RTNConfig, load_quantized, quantize_, save_quantized  # noqa: E402
from lightllm.tuning import LoraConfig, from_pretrained, get_peft_model  # noqa: E402

REPO = "lightllm-test/tiny-llama"
ADAPTER_REPO = "lightllm-test/tiny-lora"
COMMIT_A = "a" * 8 + hashlib.sha1(b"revision a").hexdigest()[8:]  # 40 hex digits, as the hub's commits
COMMIT_B = "b" * 8 + hashlib.sha1(b"revision b").hexdigest()[8:]
QUANT_SUBFOLDER = "rtn-4bit-g32"


def add_snapshot(cache: pathlib.Path, repo_id: str, commit: str, files: dict[str, pathlib.Path], refs=()) -> None:
    """Put ``files`` ({path in the repo: local file}) into ``cache`` as huggingface_hub stores a
    downloaded revision: content-addressed blobs, the snapshot's files as relative symlinks to them,
    and refs/<name> holding the commit for each branch or tag in ``refs``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # the hub writes the bare hash, no newline


def folder_files(folder: pathlib.Path, prefix: str = "") -> dict[str, pathlib.Path]:
    return {prefix + p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def hub_fixture(tmp_path_factory):
    """The cache: REPO at two commits (main -> B, hidden size 48; tag v1 -> A, hidden size 32),
    B also holding an RTN 4-bit checkpoint of itself in QUANT_SUBFOLDER (without a tokenizer: it
    comes from the repository's root), and ADAPTER_REPO holding a LoRA adapter for model A; plus
    the same files as plain folders, to compare with."""
    root = tmp_path_factory.mktemp("hub")
    dense_a = save_tiny_llama(root / "dense-a", hidden_size=32)
    dense_b = save_tiny_llama(root / "dense-b", hidden_size=48)
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_b)
    quantize_(model, RTNConfig(bits=4, group_size=32))
    quant = save_quantized(model, root / "quant-b")
    base = transformers.AutoModelForCausalLM.from_pretrained(dense_a)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero: a trained-looking adapter changes the logits
    adapter = root / "adapter"
    lora.save_pretrained(adapter)

    cache = root / "cache"
    add_snapshot(cache, REPO, COMMIT_A, folder_files(dense_a), refs=("v1",))  # a tag: refs/<tag> as a branch
    add_snapshot(cache, REPO, COMMIT_B, {**folder_files(dense_b), **folder_files(quant, QUANT_SUBFOLDER + "/")},
                 refs=("main",))
    add_snapshot(cache, ADAPTER_REPO, COMMIT_A, folder_files(adapter), refs=("main",))
    return dict(cache=cache, dense_a=dense_a, dense_b=dense_b, quant=quant, adapter=adapter)


@pytest.fixture
def offline(hub_fixture, monkeypatch):
    """HF_HUB_OFFLINE=1 with the fixture's cache, for this process: huggingface_hub reads both from
    the environment once, at import, into huggingface_hub.constants, which it consults per call."""
    cache = hub_fixture["cache"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return hub_fixture


def logits(model, seed=0):
    ids = torch.randint(0, 4096, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fixture_is_a_cache_huggingface_hub_reads(hub_fixture):
    info = huggingface_hub.scan_cache_dir(hub_fixture["cache"])
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {REPO, ADAPTER_REPO}
    assert {rev.commit_hash: set(rev.refs) for rev in repos[REPO].revisions} == {COMMIT_A: {"v1"}, COMMIT_B: {"main"}}
    got = huggingface_hub.try_to_load_from_cache(REPO, f"{QUANT_SUBFOLDER}/config.json",
                                                 cache_dir=hub_fixture["cache"])
    assert pathlib.Path(got).read_bytes() == (hub_fixture["quant"] / "config.json").read_bytes()


def test_load_model_picks_the_revision_as_transformers_does(offline):
    cache = offline["cache"]
    for revision, local, hidden in ((None, offline["dense_b"], 48), ("main", offline["dense_b"], 48),
                                    ("v1", offline["dense_a"], 32), (COMMIT_A, offline["dense_a"], 32)):
        model, tokenizer = load_model(REPO, device="cpu", revision=revision)
        assert model.config.hidden_size == hidden
        # the peer: transformers resolving the same id and revision in the same cache
        peer = transformers.AutoModelForCausalLM.from_pretrained(REPO, revision=revision or "main", cache_dir=cache,
                                                                 local_files_only=True)
        plain, _ = load_model(local, device="cpu")
        assert torch.equal(logits(model), logits(peer))
        assert torch.equal(logits(model), logits(plain))
        assert tokenizer("to be or not")["input_ids"] == transformers.AutoTokenizer.from_pretrained(local)(
            "to be or not")["input_ids"]


def test_load_quantized_from_a_hub_subfolder(offline):
    model = load_quantized(REPO, subfolder=QUANT_SUBFOLDER)
    plain = load_quantized(offline["quant"])
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14  # 7 Linears in each of 2 blocks
    assert torch.equal(logits(model), logits(plain))
    # load_model: the subfolder holds no tokenizer, so it comes from the repository's root
    model, tokenizer = load_model(REPO, device="cpu", subfolder=QUANT_SUBFOLDER)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert torch.equal(logits(model), logits(plain))
    assert len(tokenizer) == 4096
    # a subfolder of a local folder works the same way
    assert resolve_folder(offline["quant"].parent, subfolder="quant-b") == offline["quant"]


def test_adapter_from_a_hub_id_matches_the_folder_and_peft(offline):
    def base():
        return transformers.AutoModelForCausalLM.from_pretrained(offline["dense_a"])

    from_hub = from_pretrained(base(), ADAPTER_REPO)
    from_folder = from_pretrained(base(), offline["adapter"])
    assert not torch.equal(logits(from_hub), logits(base()))
    assert torch.equal(logits(from_hub), logits(from_folder))
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(base(), ADAPTER_REPO, revision="main", cache_dir=str(offline["cache"]),
                                            local_files_only=True)
    torch.testing.assert_close(logits(from_hub), logits(theirs))
    # load_adapter takes ids too, at a revision
    from_hub.load_adapter(ADAPTER_REPO, "second", revision=COMMIT_A)
    from_hub.set_adapter("second")
    assert torch.equal(logits(from_hub), logits(from_folder))


def test_unknown_ids_revisions_and_subfolders_fail_clearly(offline):
    with pytest.raises(FileNotFoundError, match=r"'lightllm-test/no-such-model'.*not in the Hugging Face cache.*"
                                                r"HF_HUB_OFFLINE"):
        load_model("lightllm-test/no-such-model", device="cpu")
    with pytest.raises(CheckpointError, match=r"revision 'v2'.*not in the Hugging Face cache"):
        load_quantized(REPO, revision="v2")
    with pytest.raises(FileNotFoundError, match=r"adapter 'lightllm-test/nope'"):
        from_pretrained(torch.nn.Linear(2, 2), "lightllm-test/nope")
    with pytest.raises(FileNotFoundError, match=r"has no subfolder 'gptq-8bit'"):
        load_model(REPO, device="cpu", subfolder="gptq-8bit")
    with pytest.raises(ValueError, match="subfolder '../x' must be a relative path"):
        load_model(REPO, device="cpu", subfolder="../x")
    with pytest.raises(ValueError, match="is a local folder; revision='v1' applies to Hugging Face hub ids only"):
        load_model(offline["dense_a"], revision="v1")
    with pytest.raises(FileNotFoundError, match="'/no/such/folder' does not exist"):
        load_model("/no/such/folder")
    with pytest.raises(CheckpointError, match="'/no/such/folder' does not exist"):
        load_quantized("/no/such/folder")
    assert looks_like_hub_id("org/name") and looks_like_hub_id("gpt2")
    assert not any(map(looks_like_hub_id, ("./org/name", "a/b/c", "/abs", "~/x", "org//name", "a b", "")))


def test_cli_quantize_and_eval_take_hub_ids(offline, tmp_path, capsys):
    args = ["quantize", "--device", "cpu", "--method", "rtn", "--bits", "4", "--group-size", "32", "--out"]
    assert main([*args, str(tmp_path / "hub"), "--model", REPO, "--revision", "v1"]) == 0
    assert main([*args, str(tmp_path / "folder"), "--model", str(offline["dense_a"])]) == 0
    model = load_quantized(tmp_path / "hub")
    assert model.config.hidden_size == 32  # revision v1 is model A
    assert torch.equal(logits(model), logits(load_quantized(tmp_path / "folder")))
    # streamed block by block (--offload): the same hub id and revision, the same checkpoint
    assert main([*args, str(tmp_path / "offload"), "--model", REPO, "--revision", "v1", "--offload"]) == 0
    assert torch.equal(logits(load_quantized(tmp_path / "offload")), logits(model))
    capsys.readouterr()
    assert main(["eval", "--device", "cpu", "--model", "lightllm-test/missing", "--seqlen", "16"]) == 2
    err = capsys.readouterr().err
    assert "lightllm-test/missing" in err and "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err


def test_cli_in_a_fresh_process_reads_the_environment(offline, tmp_path):
    """The environment variables alone (no patched constants): `python -m lightllm eval` on a hub
    id and subfolder prints the perplexity that the plain folder gives in this process."""
    text = tmp_path / "text.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 4)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(offline["cache"]), HF_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-m", "lightllm", "eval", "--device", "cpu", "--model", REPO,
                           "--subfolder", QUANT_SUBFOLDER, "--data", str(text), "--seqlen", "32"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from lightllm.eval import perplexity, tokenize_stream

    model = load_quantized(offline["quant"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(offline["dense_b"])
    ids = tokenize_stream(tokenizer, text.read_text())
    assert proc.stdout.startswith(f"perplexity {perplexity(model, tokenizer, ids, 32):.3f} "), proc.stdout


def test_an_unsupported_transformers_version_is_named(monkeypatch):
    from lightllm import MissingDependencyError

    # the module require() imports: earlier tests may leave another object in sys.modules than this file's
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.3")
    with pytest.raises(MissingDependencyError, match=r"lightllm.models.load_model needs transformers >= 4.57, this is "
                                                     r"transformers 4.46.3"):
        load_model()
