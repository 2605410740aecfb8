"""The demo's fine-tuning half, on a tiny random model for a few steps: every row is trained and
scored in its own process, the counts are the models' own, the deployment rows exist, and the table
reports what the goals say (a random model meets none of them, and the table must say so)."""

import os

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest import save_tiny_llama  # noqa: E402
from lightllm.finetune_demo import DEMO_METHODS, FinetuneDemoSettings, format_table, goals, run_finetune_demo  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaMA with the embedded model's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-demo"), hidden_size=128, intermediate_size=256)


SETTINGS = FinetuneDemoSettings(steps=2, batch_size=4, warmup_steps=1, test_limit=3, train_records=90,
                                max_new_tokens=4)


def test_every_method_is_trained_scored_and_tabled(tiny_model_dir):
    from lightllm.tuning import get_peft_model
    from lightllm.train.loop import FinetuneConfig, method_config

    result = run_finetune_demo(tiny_model_dir, device="cpu", settings=SETTINGS, progress=False, isolate=False)
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["untuned"] + [label for label, _ in DEMO_METHODS]
    dense = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert result["rows"][0]["base_params"] == sum(p.numel() for p in dense.parameters())
    for row, (_, overrides) in zip(result["rows"][1:], DEMO_METHODS):
        # the trainable count is what the method's config puts on the dense model
        expected = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                  method_config(FinetuneConfig(output_dir="x", **overrides)))
        assert row["trainable"] == sum(p.numel() for p in expected.parameters() if p.requires_grad), row["label"]
        assert row["scored"] == 6 and 0.0 <= row["one_step"] <= 1.0 and row["train_s"] > 0
        assert row["peak_memory_bytes"] > 0
    merged, quantized = result["deployment"]
    assert quantized["size_bytes"] < merged["size_bytes"]
    table = format_table(result)
    assert "untuned" in table and "LoRA merged, GPTQ 4-bit g128" in table
    for goal, met, _ in goals(result):
        assert ("met   " if met else "MISSED") + " " + goal in table


def test_rows_run_in_fresh_processes(tiny_model_dir):
    result = run_finetune_demo(tiny_model_dir, device="cpu", settings=SETTINGS, progress=False,
                               methods=DEMO_METHODS[3:4])  # prefix: the quickest
    assert [r["label"] for r in result["rows"]] == ["untuned", DEMO_METHODS[3][0]]
    assert result["rows"][1]["trainable"] > 0 and result["deployment"] == []
    pids = {r["pid"] for r in result["rows"]}
    assert len(pids) == 2 and os.getpid() not in pids


def test_demo_cli_help_names_both_parts(capsys):
    from lightllm.__main__ import main

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "--part" in out and "finetune" in out and "quantize" in out
