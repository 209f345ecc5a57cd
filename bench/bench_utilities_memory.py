"""Peak memory of the model utilities on an SDXL-size checkpoint (not a test).

Runs each `sd-merge` utility as its own process on full-size synthetic SDXL files (real key layout and
shapes, `make_synthetic_checkpoints.py --arch sdxl -n 1`) and records wall time and the peak RSS of the
process tree (bench_merge.run_measured). A kohya LoRA with rank-4 modules on every attention/MLP target is
synthesised from the key map for merge-lora.

    .venv/bin/python bench/make_synthetic_checkpoints.py --arch sdxl -n 1 -o /work/bench_data/sdxl1
    .venv/bin/python bench/bench_utilities_memory.py /work/bench_data/sdxl1 --out-dir /work/bench_out/util
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_lora(checkpoint: Path, out: Path, rank: int = 4) -> Path:
    import torch
    from safetensors.torch import save_file

    from sd_scripts_surge.models.fileio import read_safetensors_header
    from sd_scripts_surge.models.lora_keys import checkpoint_lora_keys

    header = read_safetensors_header(checkpoint)
    keymap = checkpoint_lora_keys({k: v.shape for k, v in header.tensors.items()})
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in keymap.targets.items():
        if t.group != "attn":
            continue
        rest = 1
        for s in t.shape[1:]:
            rest *= s
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, rest, generator=g) * 0.01).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(t.shape[0], rank, generator=g) * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    save_file(tensors, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    from bench_merge import run_measured

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="folder with base.safetensors and model_00.safetensors")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--skip", nargs="*", default=[], help="utilities to leave out (e.g. extract-lora)")
    args = ap.parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    base, tuned = args.data / "base.safetensors", args.data / "model_00.safetensors"
    lora = make_lora(base, out / "synthetic_lora.safetensors")
    py = [str(REPO / ".venv" / "bin" / "python"), "-m", "merge_tools"]
    runs = {
        "blocks": py + ["blocks", str(base), "--json", str(out / "blocks.json")],
        "swap": py + ["swap", "--unet", str(base), "--te", str(tuned), "--te2", str(tuned), "--vae", str(tuned),
                      "-o", str(out / "swap.safetensors")],
        "convert (fp16 → bf16)": py + ["convert", str(base), "-o", str(out / "bf16.safetensors"), "--dtype", "bf16"],
        "to-diffusers (layout)": py + ["convert", str(base), "-o", str(out / "diffusers")],
        "from-diffusers (layout)": py + ["convert", str(out / "diffusers"), "-o", str(out / "single.safetensors")],
        "merge-lora": py + ["merge-lora", str(base), f"{lora}:0.8", "-o", str(out / "baked.safetensors"),
                            "--no-progress"],
        "soup (2 models)": py + ["soup", str(base), str(tuned), "-o", str(out / "soup.safetensors"), "--no-progress",
                                 "--memory-budget", "3GB"],
        "rebasin": py + ["rebasin", str(base), str(tuned), "-o", str(out / "rebasin.safetensors"), "--no-progress"],
        "extract-lora (dim 32)": py + ["extract-lora", str(tuned), str(base), "-o", str(out / "x.safetensors"),
                                       "--dim", "32", "--no-progress"],
    }
    print(f"{'utility':24s} {'wall':>8s} {'peak RSS':>10s}")
    for name, cmd in runs.items():
        if name.split(" ")[0] in args.skip:
            continue
        r = run_measured(name, cmd, 7200, out / f"{name.split(' ')[0]}.log")
        status = "" if r.returncode == 0 else f"  (exit {r.returncode}: {r.log_tail[-200:]})"
        print(f"{name:24s} {r.wall_s:7.1f}s {r.peak_rss_gb:8.2f} GB{status}", flush=True)
        for f in out.glob("*.safetensors"):
            if f.name != lora.name:
                f.unlink()
        if name.startswith("from-diffusers"):
            shutil.rmtree(out / "diffusers", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
