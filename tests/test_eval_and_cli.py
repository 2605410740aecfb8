"""Perplexity, the Shakespeare corpus, the embedded model and the command line."""

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightllm import data  # noqa: E402
from lightllm.__main__ import main  # noqa: E402
from lightllm.eval import eval_windows, perplexity  # noqa: E402
from lightllm.models import default_model_dir, load_model  # noqa: E402
from lightllm.nn import QuantLinear  # noqa: E402


class CharTokenizer:
    """One token per character (a-z and space), enough to drive perplexity()."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [max(0, min(26, ord(c) - 96)) for c in text]}


def tiny_lm():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=27, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)).eval()


def test_perplexity_is_exp_of_the_mean_nll_over_windows():
    model, tok = tiny_lm(), CharTokenizer()
    text = "to be or not to be that is the question whether tis nobler in the mind"
    ids = torch.tensor(tok(text)["input_ids"])
    seqlen = 16
    nll, count = 0.0, 0
    for start in range(0, (len(ids) // seqlen) * seqlen, seqlen):  # each window alone, by hand
        window = ids[start:start + seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=window[None]).logits[0].double(), -1)
        nll -= sum(float(logp[i, window[i + 1]]) for i in range(seqlen - 1))
        count += seqlen - 1
    assert eval_windows(ids, seqlen).shape == (len(ids) // seqlen, seqlen)
    got = perplexity(model, tok, text, seqlen=seqlen, batch_size=3, progress=False)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "short", seqlen=16)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, "", seqlen=16)


def test_corpus_split_and_calibration_windows():
    train, heldout = data.shakespeare_text("train"), data.shakespeare_text("heldout")
    assert "MACBETH" in heldout and "MACBETH" not in train
    assert "Hamlet" in train and "**" not in train
    ids = torch.arange(1000)
    windows = data.calibration_samples(ids, 8, 50, seed=3)
    assert windows.shape == (8, 50)
    assert torch.equal(windows[:, 1:] - windows[:, :-1], torch.ones(8, 49, dtype=torch.long))  # contiguous windows
    assert torch.equal(windows, data.calibration_samples(ids, 8, 50, seed=3))
    with pytest.raises(ValueError, match="too few for n_samples x seqlen"):
        data.calibration_samples(ids, 128, 512)
    with pytest.raises(ValueError, match="too few for windows of seqlen=2000"):
        data.calibration_samples(ids, 1, 2000)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_text("/nonexistent.txt")


def test_embedded_model_is_small_gqa_llama_and_converged():
    directory = default_model_dir()
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    size = sum(f.stat().st_size for f in directory.iterdir())
    assert size <= 16 * 2**20, f"the embedded model takes {size / 2**20:.1f} MiB on disk"
    model, tokenizer = load_model(directory, device="cpu")
    assert sum(p.numel() for p in model.parameters()) <= 8_000_000
    assert tokenizer.is_fast  # tokenizer.json, read by the tokenizers library
    log = json.loads((directory / "training_log.json").read_text())
    assert log["heldout_improvement_last_10pct"] < 0.01  # converged: under 1% over the last 10% of steps
    # it learned the plays: far better than uniform over its vocabulary on a held-out passage
    passage = data.shakespeare_text("heldout")[5000:9000]
    assert perplexity(model, tokenizer, passage, seqlen=128, progress=False) < 0.05 * len(tokenizer)


def test_cli_quantize_then_eval(tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(data.shakespeare_text("train")[:40000])
    out = tmp_path / "q"
    assert main(["quantize", "--device", "cpu", "--bits", "3", "--group-size", "128", "--act-order", "--asym",
                 "--calib", str(text), "--nsamples", "8", "--seqlen", "64", "--out", str(out)]) == 0
    quant = json.loads((out / "quantize_config.json").read_text())
    assert (quant["bits"], quant["group_size"], quant["desc_act"], quant["sym"]) == (3, 128, True, False)
    assert (out / "tokenizer.json").is_file()
    model, _ = load_model(out, device="cpu")
    assert any(isinstance(m, QuantLinear) for m in model.modules())

    evaltext = tmp_path / "eval.txt"
    evaltext.write_text(data.shakespeare_text("heldout")[:6000])
    capsys.readouterr()
    assert main(["eval", "--device", "cpu", "--model", str(out), "--data", str(evaltext), "--seqlen", "128"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("perplexity ") and "windows of 128" in printed
    assert float(printed.split()[1]) > 1


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_cli_quantizes_to_bitsandbytes_formats_and_eval_reads_them(method, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from lightllm.nn import Linear4bit, Linear8bitLt

    out = tmp_path / method
    assert main(["quantize", "--device", "cpu", "--method", method, "--out", str(out)]) == 0
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes" and quant[f"load_in_{8 if method == 'int8' else 4}bit"]
    model, _ = load_model(out, device="cpu")
    assert any(isinstance(m, Linear8bitLt if method == "int8" else Linear4bit) for m in model.modules())
    evaltext = tmp_path / "eval.txt"
    evaltext.write_text(data.shakespeare_text("heldout")[:6000])
    capsys.readouterr()
    assert main(["eval", "--device", "cpu", "--model", str(out), "--data", str(evaltext), "--seqlen", "128"]) == 0
    quantized = float(capsys.readouterr().out.split()[1])
    assert main(["eval", "--device", "cpu", "--data", str(evaltext), "--seqlen", "128"]) == 0
    dense = float(capsys.readouterr().out.split()[1])
    assert dense <= quantized * 1.01 and quantized < 1.5 * dense  # 4-bit / int8 cost a little, not a lot
    assert main(["quantize", "--device", "cpu", "--method", method, "--bits", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--bits and --group-size are GPTQ/RTN settings" in capsys.readouterr().err


def test_cli_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--help"])
    assert exc.value.code == 0
    assert "--act-order" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--bits", "5", "--group-size", "128", "--out", "x"])
    assert exc.value.code == 2
    assert "invalid choice: 5" in capsys.readouterr().err
    assert main(["quantize", "--device", "cpu", "--bits", "4", "--group-size", "0", "--out", "x"]) == 2
    assert "group_size must be a positive int or -1" in capsys.readouterr().err
    assert main(["eval", "--device", "cpu", "--data", "/nonexistent.txt"]) == 2
    assert "does not exist" in capsys.readouterr().err
