"""The fine-tuning loop: every method trains and saves in its format, an interrupted run resumes to
the same losses step for step, two processes (gloo) end with the same parameters and the same loss
curve as one process with the same global batch, under DDP and under FSDP2 (sharded, resumed too),
and bad outputs fail before training."""

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest import save_tiny_llama  # noqa: E402
from lightllm.train.loop import FinetuneConfig, finetune  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaMA with the embedded model's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from lightllm.train.data import math_task, write_records

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    write_records(math_task("train", n=96), path)
    return path


def config(tmp_path, model_dir, data, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), model=str(model_dir), data=[str(data)], template="qa",
                  cutoff_len=96, lr=1e-2, batch_size=8, micro_batch_size=2, max_steps=6, log_steps=1, cpu=True,
                  progress=False, warmup_steps=1)
    values.update(overrides)
    return FinetuneConfig(**values)


def losses(result):
    return [entry["loss"] for entry in result.log]


@pytest.mark.parametrize("method", ["lora", "qlora", "adapter", "prefix", "prompt", "p-tuning", "full"])
def test_every_method_trains_and_saves_in_its_format(tmp_path, tiny_model_dir, data_file, method):
    from lightllm.tuning import from_pretrained

    result = finetune(config(tmp_path, tiny_model_dir, data_file, method=method, max_steps=8))
    run = tmp_path / "run"
    assert result.steps == 8 and len(result.log) == 8
    assert (run / "log.json").is_file() and (run / "checkpoint-8" / "trainer_state.json").is_file()
    assert sum(losses(result)[-3:]) < sum(losses(result)[:3])  # it learns
    if method == "full":
        assert (run / "model" / "model.safetensors").is_file()
        return
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == {"lora": "LORA", "qlora": "LORA", "adapter": "BOTTLENECK", "prefix": "PREFIX_TUNING",
                                    "prompt": "PROMPT_TUNING", "p-tuning": "P_TUNING"}[method]
    if method != "qlora":  # the adapter reloads onto a fresh base and gives the trained model's logits
        from lightllm.models import load_model

        base, _ = load_model(str(tiny_model_dir), device="cpu", dtype=torch.float32)
        loaded = from_pretrained(base, run / "adapter")
        ids = torch.randint(5, 4000, (2, 9), generator=torch.Generator().manual_seed(0))
        result.model.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, result.model(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


def test_a_resumed_run_repeats_the_uninterrupted_one_step_for_step(tmp_path, tiny_model_dir, data_file):
    """Data order, dropout RNG, optimizer (8-bit state) and schedule all resume: the losses after
    resuming are the uninterrupted run's."""
    whole = finetune(config(tmp_path / "a", tiny_model_dir, data_file, lora_dropout=0.1))
    first = finetune(config(tmp_path / "b", tiny_model_dir, data_file, lora_dropout=0.1, stop_after=3))
    assert first.steps == 3 and not (tmp_path / "b" / "run" / "adapter").exists()
    rest = finetune(config(tmp_path / "b", tiny_model_dir, data_file, lora_dropout=0.1, resume=True))
    assert rest.steps == 6 and len(rest.log) == 6
    assert losses(rest) == pytest.approx(losses(whole), rel=1e-6, abs=1e-7)


def test_checkpoints_are_kept_to_the_limit_and_bad_outputs_fail_first(tmp_path, tiny_model_dir, data_file):
    finetune(config(tmp_path, tiny_model_dir, data_file, save_steps=2, save_total_limit=2))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list((tmp_path / "run").glob(".checkpoint-*"))
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .checkpoint-6.: pass resume"):
        finetune(config(tmp_path, tiny_model_dir, data_file, save_steps=2, save_total_limit=2))
    with pytest.raises(ValueError, match="other settings .lr: 0.01 then, 0.02 now"):
        finetune(config(tmp_path, tiny_model_dir, data_file, lr=2e-2, resume=True))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="output_dir .*file is a file"):
        finetune(config(tmp_path, tiny_model_dir, data_file, output_dir=str(tmp_path / "file")))
    with pytest.raises(ValueError, match="batch_size 8 must be a multiple of micro_batch_size x processes = 3 x 1"):
        finetune(config(tmp_path, tiny_model_dir, data_file, micro_batch_size=3))
    with pytest.raises(ValueError, match="method must be one of"):
        FinetuneConfig(output_dir="x", method="dora")


def test_accelerate_fsdp_and_deepspeed_configs_are_refused_before_anything_loads(tmp_path):
    """lightllm shards with FSDP2 itself (--fsdp); Accelerate's FSDP wrapping and DeepSpeed are
    refused with the way to run, before a model loads."""
    from accelerate.utils import DistributedType

    for kind, message in ((DistributedType.FSDP, "shards with FSDP2 itself.*--fsdp"),
                          (DistributedType.DEEPSPEED, "does not run under DeepSpeed")):
        class Configured:  # what finetune reads of an Accelerator prepared by such a config
            distributed_type = kind
            mixed_precision = "no"
            num_processes, process_index = 2, 0

        with pytest.raises(ValueError, match=message):
            finetune(FinetuneConfig(output_dir=str(tmp_path / "run"), model=str(tmp_path / "absent")),
                     accelerator=Configured())
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="fsdp with mixed_precision fp16"):
        FinetuneConfig(output_dir="x", fsdp=True, mixed_precision="fp16")


def test_fsdp_qlora_merge_on_a_base_quantized_in_the_run_is_refused_before_training(tmp_path, tiny_model_dir,
                                                                                     data_file):
    """The merge after an FSDP run reloads the base in one process; a base quantized during the run
    cannot be rebuilt there, so the run is refused before its first step, not after it."""
    from accelerate.utils import DistributedType

    class TwoProcesses:
        distributed_type = DistributedType.MULTI_CPU
        mixed_precision = "no"
        num_processes, process_index, device = 2, 0, torch.device("cpu")

    cfg = config(tmp_path, tiny_model_dir, data_file, method="qlora", fsdp=True, merge=True)
    with pytest.raises(ValueError, match="qlora with fsdp and merge needs a GPTQ checkpoint"):
        finetune(cfg, accelerator=TwoProcesses())
    assert not any((tmp_path / "run").glob("checkpoint-*"))


TWO_PROCESS_SCRIPT = """
import pathlib, sys
import torch
from accelerate import Accelerator
from lightllm.train.loop import FinetuneConfig, finetune

out_root, model_dir, data = sys.argv[1:4]
accelerator = Accelerator(cpu=True)
cfg = FinetuneConfig(output_dir=str(pathlib.Path(out_root) / "ddp"), model=model_dir, data=[data], template="qa",
                     cutoff_len=96, lr=1e-2, batch_size=8, micro_batch_size=2, max_steps=4, log_steps=1, cpu=True,
                     progress=False, warmup_steps=1)
result = finetune(cfg, accelerator=accelerator)
params = {n: p.detach().cpu() for n, p in result.model.named_parameters() if p.requires_grad}
torch.save({"params": params, "losses": [e["loss"] for e in result.log]},
           pathlib.Path(out_root) / f"rank{accelerator.process_index}.pt")
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, data_file):
    # torchrun in a child process: a fresh interpreter per rank (forking this test process after
    # earlier tests have started torch's thread pools can hang), gloo on CPU, two real ranks
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(script), str(tmp_path), str(tiny_model_dir), str(data_file)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in rank0["params"]:
        assert torch.equal(rank0["params"][name], rank1["params"][name]), name
    single = finetune(config(tmp_path / "one", tiny_model_dir, data_file, max_steps=4))
    assert rank0["losses"] == pytest.approx(losses(single), rel=1e-5)
    one = {n: p for n, p in single.model.named_parameters() if p.requires_grad}
    for name, value in rank0["params"].items():
        torch.testing.assert_close(value, one[name].detach(), rtol=1e-4, atol=1e-6)


def test_a_crash_mid_run_leaves_the_last_checkpoint_and_resume_finishes_the_run(tmp_path, tiny_model_dir, data_file,
                                                                                monkeypatch):
    """An exception in step 4 (as Ctrl-C would raise) after checkpoints at steps 2: checkpoint-2 is
    complete, no temporary folder is left, and --resume reproduces the uninterrupted losses."""
    import lightllm.train.loop as loop

    whole = finetune(config(tmp_path / "a", tiny_model_dir, data_file))
    calls = {"n": 0}
    real = loop.token_loss_sum

    def crashing(logits, labels):
        calls["n"] += 1
        if calls["n"] == 4 * 4:  # the first micro-batch of step 4 (8 records in micro-batches of 2)
            raise KeyboardInterrupt
        return real(logits, labels)

    monkeypatch.setattr(loop, "token_loss_sum", crashing)
    with pytest.raises(KeyboardInterrupt):
        finetune(config(tmp_path / "b", tiny_model_dir, data_file, save_steps=2))
    run = tmp_path / "b" / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".", "checkpoint"))) == ["checkpoint-2"]
    monkeypatch.setattr(loop, "token_loss_sum", real)
    rest = finetune(config(tmp_path / "b", tiny_model_dir, data_file, save_steps=2, resume=True))
    assert losses(rest) == pytest.approx(losses(whole), rel=1e-6, abs=1e-7)


def test_bf16_mixed_precision_trains(tmp_path, tiny_model_dir, data_file):
    """Accelerate's bf16 autocast (on the CPU here): the step runs and the loss falls."""
    result = finetune(config(tmp_path, tiny_model_dir, data_file, mixed_precision="bf16", max_steps=8))
    assert all(math.isfinite(v) for v in losses(result))
    assert sum(losses(result)[-3:]) < sum(losses(result)[:3])


FSDP_SCRIPT = """
import json, pathlib, sys
import torch
from accelerate import Accelerator
from lightllm.train.loop import FinetuneConfig, finetune

out_root, model_dir, data, method, extra = sys.argv[1:6]
accelerator = Accelerator(cpu=True)
settings = dict(model=model_dir, data=[data], template="qa", method=method, cutoff_len=96, lr=1e-2, batch_size=8,
                micro_batch_size=2, max_steps=4, log_steps=1, cpu=True, progress=False, warmup_steps=1, fsdp=True,
                save_steps=2, **json.loads(extra))
root = pathlib.Path(out_root)
whole = finetune(FinetuneConfig(output_dir=str(root / "whole"), **settings), accelerator=accelerator)
finetune(FinetuneConfig(output_dir=str(root / "parts"), stop_after=2, **settings), accelerator=accelerator)
resumed = finetune(FinetuneConfig(output_dir=str(root / "parts"), resume=True, **settings), accelerator=accelerator)
record = {}
for name, result in (("whole", whole), ("resumed", resumed)):
    record[name] = {"losses": [e["loss"] for e in result.log],
                    "params": {n: p.detach().cpu() for n, p in result.model.named_parameters() if p.requires_grad},
                    "kinds": sorted({type(p).__name__ for p in result.model.parameters()})}
torch.save(record, root / f"rank{accelerator.process_index}.pt")
"""


@pytest.mark.parametrize("method,extra", [
    ("lora", {"merge": True}),
    ("qlora", {"gradient_checkpointing": True}),  # the GPTQ/RTN base's packed buffers stay whole
    ("adapter", {}),
    ("prefix", {}),
    ("full", {"optimizer": "adamw"}),  # torch's AdamW: its state is sharded DTensors, saved per process
    ("full", {}),  # AdamW8bit: 8-bit state for the sharded embedding
    ("prompt", {}),
    ("p-tuning", {}),
])
def test_fsdp_two_processes_match_one_process_and_resume_exactly(tmp_path, tiny_model_dir, data_file, method, extra):
    """Two gloo ranks with FSDP2 (fully_shard per decoder layer): the loss curve and the trained
    parameters equal one process with the same global batch; a run stopped at step 2 and resumed
    repeats the uninterrupted one exactly; both ranks end with the same whole parameters; the
    outputs are written whole (the merged LoRA equals one process's merge)."""
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), str(script), str(tmp_path), str(tiny_model_dir), str(data_file), method,
                           json.dumps(extra)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    whole, resumed = rank0["whole"], rank0["resumed"]
    assert whole["kinds"] == ["Parameter"]  # gathered at the end: whole tensors, not shards
    for name, value in whole["params"].items():
        assert torch.equal(value, rank1["whole"]["params"][name]), name
        assert torch.equal(value, resumed["params"][name]), name
    assert resumed["losses"] == whole["losses"]
    # it was sharded: each process saved its own optimizer state, about half of the whole
    checkpoint = tmp_path / "whole" / "checkpoint-4"
    assert not (checkpoint / "optimizer.pt").exists()
    local = torch.load(checkpoint / "optimizer_0.pt", weights_only=False)["state_dict"]["state"]
    local_elements = sum(max(v.numel() for v in entry.values() if isinstance(v, torch.Tensor)) for entry in local.values())
    whole_elements = sum(v.numel() for v in whole["params"].values())
    assert (checkpoint / "optimizer_1.pt").is_file() and local_elements <= 0.6 * whole_elements

    single = finetune(config(tmp_path / "one", tiny_model_dir, data_file, method=method, max_steps=4, **extra))
    assert whole["losses"] == pytest.approx(losses(single), rel=1e-5)
    one = {n: p.detach() for n, p in single.model.named_parameters() if p.requires_grad}
    assert set(one) == set(whole["params"])
    for name, value in whole["params"].items():
        if method == "full" and not extra:  # 8-bit state: reduction order now and then moves a code by one
            near = (value - one[name]).abs() <= 5e-5 + 1e-4 * one[name].abs()
            assert near.float().mean() >= 0.999, name
        else:
            torch.testing.assert_close(value, one[name], rtol=1e-4, atol=5e-5)
    saved = tmp_path / "whole" / ("model" if method == "full" else "adapter")
    assert saved.is_dir()
    if method == "full":  # the whole model, gathered, with the tied embedding stored once as one process does
        from safetensors.torch import load_file

        ours = load_file(saved / "model.safetensors")
        assert set(ours) == set(load_file(tmp_path / "one" / "run" / "model" / "model.safetensors"))
        for key, value in ours.items():
            assert torch.equal(value, whole["params"][key]), key
    if method == "lora":
        from safetensors.torch import load_file

        ours = load_file(tmp_path / "whole" / "merged" / "model.safetensors")
        reference = load_file(tmp_path / "one" / "run" / "merged" / "model.safetensors")
        assert set(ours) == set(reference)
        for key in ours:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-5)

    # the optimizer state is split two ways: one process cannot continue it
    with pytest.raises(ValueError, match="FSDP run of 2 processes"):
        finetune(config(tmp_path, tiny_model_dir, data_file, output_dir=str(tmp_path / "parts"), method=method,
                        max_steps=4, fsdp=True, save_steps=2, resume=True, **extra))
