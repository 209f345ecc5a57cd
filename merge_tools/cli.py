"""`sd-merge` (also `python -m merge_tools`): one method over model files, or a TOML recipe.

    sd-merge ties --base base.safetensors a.safetensors b.safetensors -o out.safetensors --k 0.2
    sd-merge soup a.safetensors b.safetensors c.safetensors -o soup.safetensors --dtype fp16
    sd-merge add_difference a.safetensors b.safetensors c.safetensors -o out.safetensors --alpha 0.5 \\
        --mbw 0,1,1,1,1,1,1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5   # SDXL: 20 block weights
    sd-merge recipe examples/merge_ties_then_add_difference.toml -o out.safetensors
    sd-merge methods          # list methods and their parameters
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from merge_tools import methods
from merge_tools.engine import MergeOptions, merge
from merge_tools.recipe import Recipe, RecipeError, load_recipe, single_method
from sd_scripts_surge.models.fileio import CheckpointError, parse_size


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output .safetensors (never one of the inputs)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="output dtype (default fp16)")
    p.add_argument("--compute-dtype", choices=["fp64", "fp32"], default=None, help="math dtype (default fp64)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--memory-budget", default=None, help="peak memory, e.g. 4GB (default: 25%% of available RAM)")
    p.add_argument(
        "--missing-keys",
        choices=["error", "skip", "base"],
        default="error",
        help="a key missing from some inputs: stop (default), leave it out, or use the base model's",
    )
    p.add_argument(
        "--check-finite",
        choices=["stream", "pre", "off"],
        default="stream",
        help="NaN/Inf check: while merging (default), full scan before starting, or off",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge from its journal")
    p.add_argument("--seed", type=int, default=None, help="seed of DARE/DELLA masks (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-chunk-elements", type=int, default=None, help=argparse.SUPPRESS)


def _param_flag(name: str) -> list[str]:
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    if name == "lam":
        flags.append("--lambda")
    return flags


def _add_method(sub: Any, spec: methods.MethodSpec) -> None:
    summary = spec.summary.replace("%", "%%")  # argparse %-formats help strings ("100%" crashed --help)
    p = sub.add_parser(spec.name, help=summary, description=summary)
    if spec.inputs == "base+models":
        p.add_argument("--base", required=True, help="base model (θ_base); deltas are τ_i = θ_i − θ_base")
        p.add_argument("models", nargs="+", help="models to merge")
    elif isinstance(spec.inputs, int):
        p.add_argument("models", nargs=spec.inputs, help=f"exactly {spec.inputs} models, in formula order")
    else:
        p.add_argument("models", nargs="+", help="models to merge")
    group = p.add_argument_group("method parameters")
    for name, param in spec.params.items():
        dest = f"param_{name}"
        text = (param.help + "; " if param.help else "") + f"default {param.default}"
        text = (text + f", range {param.range_text}" if param.range_text else text).replace("%", "%%")
        if param.kind == "bool":
            group.add_argument(*_param_flag(name), dest=dest, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        elif param.kind == "floats":
            group.add_argument(
                *_param_flag(name), dest=dest, default=None, type=lambda s: [float(v) for v in s.split(",")], help=text
            )
        else:
            kind = int if param.kind == "int" else float
            group.add_argument(*_param_flag(name), dest=dest, type=kind, default=None, help=text)
    if spec.strength:
        group.add_argument(
            "--mbw",
            default=None,
            help=f"block weights for {spec.strength!r}: a comma list in block order (SD1 26, SDXL 20) or a "
            "supermerger preset name (GRAD_V, FLAT_25, SMOOTHSTEP, COSINE, WRAP08, … see `sd-merge presets`)",
        )
        group.add_argument(
            "--elemental",
            default=None,
            help=f"per-key overrides of {spec.strength!r}, supermerger syntax: 'BLOCKS:ELEMENTS:VALUE, …' "
            "(e.g. 'OUT03 OUT04:attn2:0.5'; NOT inverts; later rules win)",
        )
    _add_common(p)
    p.set_defaults(method=spec.name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd-merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for spec in methods.REGISTRY.values():
        _add_method(sub, spec)
    r = sub.add_parser("recipe", help="run a TOML recipe (nested methods, MBW)")
    r.add_argument("recipe", help="recipe .toml")
    _add_common(r)
    r.set_defaults(method=None)
    sub.add_parser("methods", help="list merge methods and their parameters").set_defaults(method=None)
    sub.add_parser("presets", help="list the MBW presets (supermerger names) with their weights").set_defaults(
        method=None
    )
    i = sub.add_parser("inspect", help="per-block cosine / L2 / sign conflicts of a model set, heatmaps, outliers")
    i.add_argument("models", nargs="+", help="two or more .safetensors models")
    i.add_argument("--base", help="deltas against this model (default: against the mean of the models)")
    i.add_argument("--json", dest="json_path", help="write the numbers here (models, blocks → cosine/l2 matrices)")
    i.add_argument("--out", dest="out_dir", help="write heatmap PNGs and the 2-D model map into this folder")
    i.add_argument("--no-progress", action="store_true", help="no progress bar")
    i.set_defaults(method=None)
    b = sub.add_parser("blocks", help="architecture, the MBW block of every key, parameters per block and component")
    b.add_argument("model", help="a .safetensors checkpoint (only its header is read)")
    b.add_argument("--json", dest="json_path", help="write the key → block table and the counts here")
    b.add_argument("--png", help="draw the parameters per block (network order) into this PNG")
    b.set_defaults(method=None)
    e = sub.add_parser("prune-ema", help="drop a checkpoint's EMA weights (model_ema.*), or keep them as the model")
    e.add_argument("model", help="a .safetensors checkpoint with model_ema.* tensors")
    e.add_argument("-o", "--output", required=True, help="output .safetensors (never the input)")
    e.add_argument("--keep", choices=["model", "ema"], default="model",
                   help="model: drop the EMA tensors; ema: write the EMA weights as the UNet, then drop them")
    e.set_defaults(method=None)
    s = sub.add_parser("swap", help="one checkpoint from components of several: --unet A --te B --te2 C --vae D")
    s.add_argument("--unet", required=True, help="the UNet (and every key no other option replaces)")
    s.add_argument("--te", help="text encoder (SDXL: the first, CLIP-L)")
    s.add_argument("--te2", help="SDXL's second text encoder (OpenCLIP-G)")
    s.add_argument("--vae", help="the VAE")
    s.add_argument("-o", "--output", required=True, help="output .safetensors (never an input)")
    s.set_defaults(method=None)
    x = sub.add_parser("extract-lora", help="SVD of TUNED − BASE per module into a kohya LoRA (LoCon: --conv_dim)")
    x.add_argument("tuned", help="the fine-tuned checkpoint (.safetensors, SD1 or SDXL single file)")
    x.add_argument("base", help="the checkpoint it was tuned from")
    x.add_argument("-o", "--output", required=True, help="output LoRA .safetensors (never an input)")
    x.add_argument("--dim", type=int, default=32, help="rank of Linear / 1x1 modules (default 32)")
    x.add_argument("--conv_dim", "--conv-dim", type=int, default=0,
                   help="rank of 3x3 conv modules (LoCon); 0 = attention/MLP modules only (default)")
    x.add_argument("--energy", type=float, default=None,
                   help="per module, the smallest rank keeping this share of Σσ² (e.g. 0.9), at most --dim")
    x.add_argument("--clamp-quantile", type=float, default=0.99,
                   help="clamp up/down values beyond this quantile of |values| (sd-scripts' 0.99; 1 = off)")
    x.add_argument("--min-diff", type=float, default=1e-6, help="leave out modules whose max |ΔW| is below this")
    x.add_argument("--save-precision", choices=["fp16", "bf16", "fp32"], default="fp16", help="LoRA dtype")
    x.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.set_defaults(method=None)
    m = sub.add_parser("merge-lora", help="add kohya LoRA / LoCon / LoHa / LoKr files into a checkpoint, in fp64")
    m.add_argument("base", help="the checkpoint (.safetensors, SD1 or SDXL single file)")
    m.add_argument("loras", nargs="+", help="LoRA files, each optionally with a multiplier: lora.safetensors:0.7")
    m.add_argument("-o", "--output", required=True, help="output .safetensors (never an input)")
    m.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="cast the float tensors of the output (default: keep each tensor's dtype)")
    m.add_argument("--skip-unmatched", action="store_true",
                   help="leave out LoRA modules that match no tensor instead of stopping")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(method=None)
    rb = sub.add_parser("rebasin", help="Git Re-Basin: reorder B's hidden units to line up with A (same function)")
    rb.add_argument("a", help="the reference model (.safetensors, SD1/SD2/SDXL single file)")
    rb.add_argument("b", help="the model to align; the output computes exactly what it computes")
    rb.add_argument("-o", "--output", required=True, help="output .safetensors: B aligned to A (never an input)")
    rb.add_argument("--head-dim", type=int, default=None, help="attention head width (default: 64 for SDXL/SD2)")
    rb.add_argument("--heads", type=int, default=None, help="attention heads per layer instead (default: 8 for SD1)")
    rb.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups of the ResBlocks (default 32)")
    rb.add_argument("--similarity", choices=["auto", "fp32", "bf16"], default="auto",
                    help="the feed-forward similarity products: bf16 GEMMs whose matching a rounding-error bound "
                         "proves equal to fp32's (else recomputed in fp32), fp32 only, or auto: bf16 where it "
                         "measures faster (AMX/AVX512-BF16 CPUs). Same output either way")
    rb.add_argument("--no-progress", action="store_true", help="no progress bar")
    rb.set_defaults(method=None)
    au = sub.add_parser("autombw", help="Bayesian search (optuna TPE) of a recipe's MBW block weights for a reward")
    au.add_argument("recipe", help="a TOML recipe whose node has a block-weighted parameter")
    au.add_argument("-o", "--output", required=True, help="the best recipe, written as TOML")
    au.add_argument("--reference", help="reward: agreement with this model's noise prediction on fixed probes")
    au.add_argument("--reward-fn", help="reward: your module:function(checkpoint_path) -> float (higher = better)")
    au.add_argument("--clip-model", help="reward: CLIP score of rendered images, with this local transformers "
                    "CLIP folder (e.g. a downloaded openai/clip-vit-large-patch14); needs --prompts")
    au.add_argument("--prompts", help="the CLIP reward's prompts: a text file, one per line")
    au.add_argument("--tokenizer-dir", help="the CLIP reward: tokenizers for single-file checkpoints "
                    "(a folder with tokenizer/ [tokenizer_2/])")
    au.add_argument("--render-steps", type=int, default=20, help="the CLIP reward: sampling steps (default 20)")
    au.add_argument("--render-size", type=int, default=512, help="the CLIP reward: image size in px (default 512)")
    au.add_argument("--trials", type=int, default=50, help="trials in total, counting finished ones (default 50)")
    au.add_argument("--node", help="the node to search (default: the final node)")
    au.add_argument("--param", help="its parameter to search (default: the method's MBW parameter)")
    au.add_argument("--groups", choices=["blocks", "coarse"], default="blocks",
                    help="one weight per block (default), or one each for BASE, IN, M, OUT")
    au.add_argument("--low", type=float, default=0.0, help="lowest weight (default 0)")
    au.add_argument("--high", type=float, default=1.0, help="highest weight (default 1)")
    au.add_argument("--study", help="optuna SQLite file (default: OUTPUT.study.sqlite); an existing one resumes")
    au.add_argument("--seed", type=int, default=0, help="sampler and probe seed")
    au.add_argument("--probes", type=int, default=4, help="probe inputs of the built-in reward (default 4)")
    au.add_argument("--plots", help="folder for objective.png and importance.png")
    au.add_argument("--no-progress", action="store_true", help="no progress bar")
    au.set_defaults(method=None)
    cv = sub.add_parser("convert", help="dtype casts, .ckpt → .safetensors (--allow-pickle), single file ↔ diffusers")
    cv.add_argument("input", help="a .safetensors / .ckpt single file or a diffusers folder")
    cv.add_argument("-o", "--output", required=True, help="a .safetensors file or a folder (never the input)")
    cv.add_argument("--to", choices=["single", "diffusers"], default=None,
                    help="output layout (default: diffusers when -o has no suffix, else single file)")
    cv.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None, help="cast float tensors")
    cv.add_argument("--allow-pickle", action="store_true",
                    help="read .ckpt/.pt with torch.load(weights_only=True) (off: pickles are refused)")
    cv.add_argument("--tokenizer-dir", default=None, help="tokenizers for a diffusers output from a single file")
    cv.set_defaults(method=None)
    return parser


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    if args.command == "recipe":
        return load_recipe(args.recipe)
    spec = methods.get(args.method)
    params = {k[len("param_") :]: v for k, v in vars(args).items() if k.startswith("param_") and v is not None}
    if getattr(args, "mbw", None) or getattr(args, "elemental", None):
        value: Any = params.get(spec.strength, spec.params[spec.strength].default)
        if args.mbw:
            value = args.mbw if "," not in args.mbw else [float(v) for v in args.mbw.split(",")]
        if args.elemental:
            value = {"default": value, "elemental": args.elemental}
        params[spec.strength] = value
    inputs = ([args.base] if spec.inputs == "base+models" else []) + list(args.models)
    return single_method(spec.name, inputs, params)


def _swap(args: argparse.Namespace) -> None:
    from merge_tools.swap import swap

    sources = swap(args.unet, args.output, te=args.te, te2=args.te2, vae=args.vae)
    print(f"wrote {args.output}: " + ", ".join(f"{k} from {v}" for k, v in sources.items()))


def _prune_ema(args: argparse.Namespace) -> None:
    from merge_tools.ema import prune_ema

    summary = prune_ema(args.model, args.output, args.keep)
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


def _blocks(args: argparse.Namespace) -> None:
    from merge_tools.block_map import run

    run(args.model, args.json_path, args.png)


def _inspect(args: argparse.Namespace) -> None:
    from merge_tools.diagnostics import run

    run(args.models, args.base, args.json_path, args.out_dir, progress=not args.no_progress)


def _extract_lora(args: argparse.Namespace) -> None:
    from merge_tools.lora_tools import extract_lora

    extract_lora(args.tuned, args.base, args.output, dim=args.dim, conv_dim=args.conv_dim, energy=args.energy,
                 clamp_quantile=args.clamp_quantile, min_diff=args.min_diff, save_dtype=args.save_precision,
                 device=args.device, progress=not args.no_progress)


def _merge_lora(args: argparse.Namespace) -> None:
    from merge_tools.lora_tools import merge_lora, parse_lora_arg

    counts = merge_lora(args.base, [parse_lora_arg(a) for a in args.loras], args.output, dtype=args.dtype,
                        skip_unmatched=args.skip_unmatched, progress=not args.no_progress)
    print(f"wrote {args.output}: {counts['modules']} LoRA modules into {counts['keys']} tensors"
          + (f", {counts['unmatched']} left out" if counts["unmatched"] else ""))


def _rebasin(args: argparse.Namespace) -> None:
    from merge_tools.rebasin import rebasin

    rebasin(args.a, args.b, args.output, head_dim=args.head_dim, heads=args.heads, norm_groups=args.norm_groups,
            similarity=args.similarity, progress=not args.no_progress)


def _autombw(args: argparse.Namespace) -> None:
    from merge_tools.autombw import autombw

    prompts: list[str] = []
    if args.prompts:
        try:
            text = Path(args.prompts).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--prompts {args.prompts}: {e.strerror or e}") from e
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    elif args.clip_model:
        raise ValueError("--clip-model needs --prompts FILE (one prompt per line)")
    autombw(args.recipe, args.output, reference=args.reference, reward_fn=args.reward_fn,
            clip_model=args.clip_model, prompts=prompts, tokenizer_dir=args.tokenizer_dir,
            render_steps=args.render_steps, render_size=args.render_size, trials=args.trials,
            node=args.node, param=args.param, groups=args.groups, low=args.low, high=args.high,
            study_path=args.study, seed=args.seed, probes=args.probes, plots=args.plots,
            progress=not args.no_progress)


def _convert(args: argparse.Namespace) -> None:
    from merge_tools.convert import convert

    done = convert(args.input, args.output, to=args.to, dtype=args.dtype, allow_pickle=args.allow_pickle,
                   tokenizer_dir=args.tokenizer_dir)
    print(f"wrote {args.output}: {done}")


# model utilities beside the merge methods: subcommand → what runs it (errors are reported by main)
UTILITIES = {"swap": _swap, "prune-ema": _prune_ema, "blocks": _blocks, "inspect": _inspect,
             "extract-lora": _extract_lora, "merge-lora": _merge_lora, "rebasin": _rebasin,
             "autombw": _autombw, "convert": _convert}


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # lets the engine flush its journal, so --resume can continue


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "methods":
        for spec in methods.REGISTRY.values():
            inputs = {"models": "models…", "base+models": "--base B models…"}.get(
                str(spec.inputs), f"{spec.inputs} models"
            )
            params = ", ".join(f"{k}={v.default}" for k, v in spec.params.items()) or "-"
            print(f"{spec.name:18s} {inputs:18s} {params}\n{'':18s} {spec.summary}")
        return 0
    if args.command == "presets":
        from sd_scripts_surge.models.keymap import PRESETS, SD1_BLOCKS, SDXL_BLOCKS, preset_weights

        for name in PRESETS:
            for arch_name, blocks in (("sd1", SD1_BLOCKS), ("sdxl", SDXL_BLOCKS)):
                values = preset_weights(name, len(blocks))
                print(f"{name:22s} {arch_name:5s} " + ",".join(f"{v:.4g}" for v in values))
        return 0
    if args.command in UTILITIES:
        try:
            UTILITIES[args.command](args)
        except (CheckpointError, ValueError, OSError) as e:
            print(f"sd-merge: error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        recipe = _recipe_from_args(args)
        d = recipe.defaults
        options = MergeOptions(
            output_dtype=args.dtype or d.get("dtype", "fp16"),
            compute_dtype=args.compute_dtype or d.get("compute_dtype", "fp64"),
            threads=args.threads,
            memory_budget=parse_size(args.memory_budget) if args.memory_budget else None,
            missing_keys=args.missing_keys,
            resume=args.resume,
            seed=args.seed if args.seed is not None else int(d.get("seed", 0)),
            check_finite=args.check_finite,
            progress=not args.no_progress,
            max_chunk_elements=args.max_chunk_elements,
        )
        previous = signal.signal(signal.SIGTERM, _sigterm)
        try:
            merge(recipe, Path(args.output), options)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except (RecipeError, CheckpointError, ValueError, KeyError, MemoryError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"sd-merge: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sd-merge: interrupted; rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
