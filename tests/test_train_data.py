"""Fine-tuning data and scoring: reading records, templates, tokenization with loss masking, the
embedded math task, batches, the token-weighted loss over accumulated micro-batches, and the math
evaluator's answer extraction."""

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lightllm.eval.math import evaluate_math, extract_number, extract_option, is_correct  # noqa: E402
from lightllm.train.collate import Collator, count_target_tokens, length_grouped_order, token_loss_sum  # noqa: E402
from lightllm.train.data import (IGNORE_INDEX, Tokenized, math_task, read_records, tokenize_record,  # noqa: E402
                                 write_records)
from lightllm.train.templates import TEMPLATES, get_template  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    from lightllm.models import default_model_dir

    return transformers.AutoTokenizer.from_pretrained(default_model_dir())


# ---- reading ---------------------------------------------------------------------------------------

def test_json_and_jsonl_files_concatenate_and_bad_records_name_file_and_line(tmp_path):
    a = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}, {"instruction": "Name a play.", "output": "Hamlet"}]
    (tmp_path / "a.json").write_text(json.dumps(a, indent=2))
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}) + "\n")
    records = read_records([tmp_path / "a.json", tmp_path / "b.jsonl"])
    assert [r.get("instruction", "chat") for r in records] == ["Add 2 and 3.", "Name a play.", "chat"]
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n\n{"instruction": 3, "output": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: an instruction record needs a string 'instruction'"):
        read_records([tmp_path / "bad.jsonl"])
    (tmp_path / "bad.json").write_text('[\n {"instruction": "x", "output": "y"},\n\n {"output": "y"}\n]')
    with pytest.raises(ValueError, match=r"bad.json:4: an instruction record needs a string 'instruction'"):
        read_records([tmp_path / "bad.json"])
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x", "output": "y"}\n{"instruction": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        read_records([tmp_path / "broken.jsonl"])
    (tmp_path / "nochat.json").write_text('[{"messages": [{"role": "user", "content": "hi"}]}]')
    with pytest.raises(ValueError, match="nochat.json:1: a chat record needs at least one assistant message"):
        read_records([tmp_path / "nochat.json"])
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        read_records([tmp_path / "missing.json"])


def test_records_round_trip_through_both_formats(tmp_path):
    records = math_task("test", n=4)
    for name in ("x.json", "x.jsonl"):
        write_records(records, tmp_path / name)
        assert read_records([tmp_path / name]) == records


# ---- templates and tokenization ------------------------------------------------------------------------

def test_templates():
    alpaca = TEMPLATES["alpaca"]
    with_input = alpaca.prompt("Add.", "2 and 3")
    assert "### Input:\n2 and 3" in with_input and with_input.endswith("### Response:\n")
    assert "### Input" not in alpaca.prompt("Add.")
    assert get_template(None) is alpaca
    assert alpaca.response_of(with_input + "5") == "5"
    assert TEMPLATES["qa"].prompt("How many?") == "Question: How many?\nAnswer:"


def test_template_files_are_checked(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"prompt_input": "I: {instruction} / {input} ->", "prompt_no_input": "I: {instruction} ->",
                                "response_split": "->"}))
    assert get_template(str(good)).prompt("x", "y") == "I: x / y ->"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prompt_input": "{instruction}", "prompt_no_input": "{instruction}", "response_split": ":"}))
    with pytest.raises(ValueError, match="prompt_input lacks {input}"):
        get_template(str(bad))
    with pytest.raises(ValueError, match="neither a built-in template"):
        get_template("nonexistent")


def test_tokenization_masks_the_prompt_and_appends_eos(tokenizer):
    record = {"instruction": "Tom has 3 apples. He gets 4 more. How many apples does he have now?", "input": "",
              "output": "3 + 4 = 7. The answer is 7."}
    qa = TEMPLATES["qa"]
    t = tokenize_record(record, tokenizer, qa, cutoff_len=256)
    prompt_ids = tokenizer(qa.prompt(record["instruction"]), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(" " + record["output"], add_special_tokens=False)["input_ids"]
    assert t.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert t.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    on_inputs = tokenize_record(record, tokenizer, qa, cutoff_len=256, train_on_inputs=True)
    assert on_inputs.labels == on_inputs.input_ids
    cut = tokenize_record(record, tokenizer, qa, cutoff_len=len(prompt_ids) + 3)
    assert len(cut.input_ids) == len(prompt_ids) + 3 and cut.input_ids[-1] != tokenizer.eos_token_id  # no EOS when cut


def test_chat_records_train_on_the_assistant_turns_only(tokenizer):
    chat = transformers.AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    chat.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|endoftext|>{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    messages = [{"role": "user", "content": "Who wrote it?"}, {"role": "assistant", "content": "Shakespeare."},
                {"role": "user", "content": "When?"}, {"role": "assistant", "content": "In 1606."}]
    t = tokenize_record({"messages": messages}, chat, TEMPLATES["alpaca"], cutoff_len=512)
    trained = chat.decode([i for i, label in zip(t.input_ids, t.labels) if label != IGNORE_INDEX])
    assert trained == "Shakespeare.<|endoftext|>In 1606.<|endoftext|>"
    with pytest.raises(ValueError, match="chat records need a tokenizer with a chat template"):
        tokenize_record({"messages": messages}, tokenizer, TEMPLATES["alpaca"])


# ---- the embedded task --------------------------------------------------------------------------------

def test_math_task_is_seeded_split_and_correct():
    test = math_task("test")
    train = math_task("train")
    assert math_task("test") == test and len(test) == 300 and len(train) == 3000
    assert sum(r["type"] == "one_step" for r in test) == 200
    assert not {r["instruction"] for r in test} & {r["instruction"] for r in train}
    assert sum(r["type"] == "two_step" for r in train) == 1000
    for r in test + train[:500]:
        equations = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", r["output"])
        assert len(equations) == (1 if r["type"] == "one_step" else 2)
        for a, op, b, c in equations:
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
        assert r["output"].endswith(f"The answer is {r['answer']}.") and int(r["answer"]) >= 0
        if r["type"] == "one_step":
            a, _, b, _ = equations[0]
            assert max(int(a), int(b)) <= 9 and a in r["instruction"] and b in r["instruction"]
    assert math_task("train", seed=1) != train


# ---- batches and the loss -----------------------------------------------------------------------------

def test_collator_pads_to_a_multiple_of_eight_on_either_side():
    items = [Tokenized([5, 6, 7], [-100, 6, 7]), Tokenized([1] * 9, [1] * 9)]
    right = Collator(pad_token_id=0)(items)
    assert right["input_ids"].shape == (2, 16)
    assert right["input_ids"][0, :3].tolist() == [5, 6, 7] and right["attention_mask"][0].sum() == 3
    assert (right["labels"][0, 3:] == IGNORE_INDEX).all()
    left = Collator(pad_token_id=0, padding_side="left")(items)
    assert left["input_ids"][0, -3:].tolist() == [5, 6, 7] and left["attention_mask"][0, :13].sum() == 0


def test_length_grouped_order_is_a_seeded_permutation_of_similar_lengths():
    lengths = [(i * 37) % 101 for i in range(400)]
    order = length_grouped_order(lengths, 8, seed=3)
    assert sorted(order) == list(range(400)) and order == length_grouped_order(lengths, 8, seed=3)
    spreads = [max(lengths[i] for i in order[s:s + 8]) - min(lengths[i] for i in order[s:s + 8])
               for s in range(0, 400, 8)]
    assert sum(spreads) / len(spreads) < 10  # random batches would spread over ~80


def test_token_weighted_loss_over_micro_batches_equals_one_big_batch():
    """Variable-length micro-batches: the mean of per-micro-batch means differs from the mean over
    every target token of the whole batch; ours (summed token losses over the step's token count)
    equals the big batch, loss and gradients."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2))
    gen = torch.Generator().manual_seed(1)
    items = []
    for length, target in ((20, 2), (6, 5), (14, 1), (9, 8)):
        ids = torch.randint(1, 50, (length,), generator=gen).tolist()
        items.append(Tokenized(ids, [IGNORE_INDEX] * (length - target) + ids[length - target:]))
    collate = Collator(0, pad_to_multiple_of=1)
    big = collate(items)
    micro = [collate(items[:2]), collate(items[2:])]

    def grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want, want_g = grads(lambda: model(**big).loss)  # transformers' mean over the big batch's tokens
    total = sum(count_target_tokens(b["labels"]) for b in micro)
    ours, ours_g = grads(lambda: sum(token_loss_sum(model(**b).logits, b["labels"]) / total for b in micro))
    naive, _ = grads(lambda: sum(model(**b).loss for b in micro) / len(micro))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(float(naive) - float(want)) > 1e-3


# ---- scoring -----------------------------------------------------------------------------------------

def test_answer_extraction_follows_llm_adapters_but_options_are_whole_words():
    assert extract_number("3 + 4 = 7. The answer is 7.") == 7.0
    assert extract_number("It costs 1,250 coins") == 1250.0 and extract_number("no digits") is None
    assert extract_number("-3 degrees, then 2.5") == 2.5
    assert extract_option("Each of them is right, so the answer is C") == "C"  # LLM-Adapters would read the E of Each
    assert extract_option("Every option fails") is None
    assert is_correct("The answer is 7.0004", "7") == (True, 7.0004)
    assert is_correct("The answer is 7.01", "7")[0] is False
    assert is_correct("So (B) it is", "B") == (True, "B")
    with pytest.raises(ValueError, match="neither a number nor an option letter"):
        is_correct("7", "seven")


def test_evaluate_math_left_pads_scores_by_type_and_writes_jsonl(tokenizer, tmp_path):
    """A stand-in model that answers from a table: what it is asked (the left-padded prompts) and
    what the evaluator reads back are both checked."""
    records = math_task("test")[198:203]  # two one-step, three two-step
    answers = {r["instruction"]: r["answer"] for r in records}
    answers[records[1]["instruction"]] = "999"  # one wrong answer
    qa = TEMPLATES["qa"]

    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
            rows = []
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                assert mask[-1] == 1  # left padding: every prompt ends at the last column
                prompt = tokenizer.decode([i for i, m in zip(ids, mask) if m])
                instruction = prompt[len("Question: "):prompt.index("\nAnswer:")]
                rows.append(ids + tokenizer(f" The answer is {answers[instruction]}.")["input_ids"])
            longest = max(map(len, rows))
            return torch.tensor([r + [0] * (longest - len(r)) for r in rows])

    result = evaluate_math(Table(), tokenizer, records, qa, batch_size=2, jsonl_path=tmp_path / "g.jsonl",
                           progress=False)
    assert (result["correct"], result["total"]) == (4, 5)
    assert result["by_type"] == {"one_step": 0.5, "two_step": 1.0}
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, True, True, True]
    assert rows[1]["read"] == 999.0 and rows[1]["response"] == "The answer is 999."


def test_cli_exports_the_task_and_scores_a_model(tmp_path, capsys):
    from lightllm.__main__ import main

    out = tmp_path / "test.jsonl"
    assert main(["data", "export", "--split", "test", "--n", "3", "--out", str(out)]) == 0
    assert read_records([out]) == math_task("test", n=3)
    assert main(["eval", "--task", "math", "--data", str(out), "--device", "cpu", "--out-jsonl",
                 str(tmp_path / "g.jsonl")]) == 0
    assert "exact match 0.0% (0 of 3), one_step 0.0%" in capsys.readouterr().out  # the untuned model writes verse
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 3
    assert main(["eval", "--task", "math", "--data", str(tmp_path / "none.json"), "--device", "cpu"]) == 2
