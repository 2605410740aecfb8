"""Prompt templates for instruction records: how an ``{instruction, input}`` becomes the text the model
is trained to continue with the ``output``.

Built in: ``alpaca`` (the default; Alpaca's preamble and ``### Instruction:`` / ``### Input:`` /
``### Response:`` sections, the input section only when the record has one, as LLM-Adapters and
Alpaca-CoT train) and ``qa`` (``Question: ...`` then ``Answer:``, four times shorter: what a small
model on short problems wants). A JSON file with the same fields (alpaca-lora's template files
have them: ``prompt_input``, ``prompt_no_input``, ``response_split``) overrides both.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    name: str
    prompt_input: str  # with "{instruction}" and "{input}"
    prompt_no_input: str  # with "{instruction}"
    response_split: str  # what separates the prompt from the response in a decoded generation

    def prompt(self, instruction: str, input: str = "") -> str:
        """The text before the response (the part whose labels are masked unless train_on_inputs)."""
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def response_of(self, generated: str) -> str:
        """The response part of a decoded prompt + generation."""
        return generated.split(self.response_split, 1)[-1].strip() if self.response_split in generated \
            else generated.strip()


TEMPLATES = {
    "alpaca": PromptTemplate(
        name="alpaca",
        prompt_input=("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n"
                      "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
        prompt_no_input=("Below is an instruction that describes a task. Write a response that appropriately "
                         "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
        response_split="### Response:",
    ),
    "qa": PromptTemplate(
        name="qa",
        prompt_input="Question: {instruction}\n{input}\nAnswer:",
        prompt_no_input="Question: {instruction}\nAnswer:",
        response_split="Answer:",
    ),
}


def get_template(name_or_path: str | None) -> PromptTemplate:
    """A built-in template by name, or one read from a JSON file (fields ``prompt_input``,
    ``prompt_no_input``, ``response_split``)."""
    if name_or_path is None:
        return TEMPLATES["alpaca"]
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = pathlib.Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"template {name_or_path!r} is neither a built-in template ({', '.join(TEMPLATES)}) nor a "
                         "JSON file")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        template = PromptTemplate(name=path.stem, prompt_input=fields["prompt_input"],
                                  prompt_no_input=fields["prompt_no_input"], response_split=fields["response_split"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: a template file is JSON with prompt_input, prompt_no_input and response_split "
                         f"({type(e).__name__}: {e})") from None
    for field, placeholders in (("prompt_input", ("{instruction}", "{input}")), ("prompt_no_input", ("{instruction}",))):
        missing = [ph for ph in placeholders if ph not in getattr(template, field)]
        if missing:
            raise ValueError(f"{path}: {field} lacks {', '.join(missing)}")
    return template
