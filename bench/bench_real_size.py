"""A full-size SDXL surge run on the CPU (issue 11, item 5): peak RSS and seconds per step beside `--estimate`.

Not a test. The student is a full-size SDXL single file made locally (`make_synthetic_checkpoints.py --arch sdxl
-n 1`: real key layout and shapes, fp16 weights generated here, nothing downloaded); the teacher is that base with
a rank-4 LoRA on every attention/MLP module hooked in (`--teacher_lora`), stored in bf16. Four 256 px images with
captions are written to a kohya folder; tokenizers come from the tiny kit (offline). Each configuration trains for
2 optimizer steps with surge on: flavor capture, cached teacher targets, the controller and replay.

    .venv/bin/python bench/make_synthetic_checkpoints.py --arch sdxl -n 1 -o /work/bench_data/sdxl1
    .venv/bin/python bench/bench_real_size.py /work/bench_data/sdxl1/base.safetensors --out-dir /work/bench_out/real

Reported per configuration: wall time, the trainer's seconds per optimizer step (its own log), peak RSS of the
process tree (polled every 50 ms), the estimate's device + offloaded totals, and the flavor cache's size on disk
beside the estimate's.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMMON = ["--resolution", "256", "--train_batch_size", "1", "--max_train_steps", "2", "--mixed_precision", "bf16",
          "--gradient_checkpointing", "--surge_teacher", "cached", "--surge_teacher_dtype", "bf16",
          "--surge_probes", "2", "--surge_num_seeds", "2", "--surge_replay_units", "1", "--surge_replay_steps", "2",
          "--save_precision", "bf16", "--learning_rate", "1e-5", "--seed", "1"]
CONFIGS = {
    "full fine-tune (ADA_SURGE, fused backward, full_bf16)": [
        "--optimizer_type", "ADA_SURGE", "--optimizer_args", "relative_step=False", "scale_parameter=False",
        "warmup_init=False", "--fused_backward_pass", "--full_bf16"],
    "LoRA dim 16 (AdamW)": ["--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "8",
                            "--optimizer_type", "AdamW"],
    # the teacher kept in fp32 shares the LoRA student's frozen fp32 base UNet (frozen_copy) instead of a bf16 copy
    "LoRA dim 16 (AdamW), teacher shares the base": [
        "--network_module", "networks.lora", "--network_dim", "16", "--network_alpha", "8", "--optimizer_type", "AdamW",
        "--surge_teacher_dtype", "float"],
}


def write_dataset(root: Path, n: int = 4) -> Path:
    from PIL import Image, ImageDraw

    folder = root / "1_shapes"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (256, 256), (40 * i % 255, 90, 160))
        ImageDraw.Draw(img).ellipse((30 + 10 * i, 40, 200, 210 - 10 * i), fill=(230, 200 - 30 * i, 60))
        img.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a yellow circle, shape {i}")
    return root


def estimate_totals(cmd: list[str]) -> tuple[float, float, float]:
    """(device GiB, offloaded-to-RAM GiB, flavor cache GiB on disk) from the trainer's own --estimate."""
    from sd_scripts_surge.config import parse_train_args
    from sd_scripts_surge.training.estimate import GIB, estimate

    cfg = parse_train_args(cmd)
    plan = estimate(cfg, cfg.pretrained_model_name_or_path, resolution=(256, 256))
    # on the CPU the device is the same RAM: the peak of both together (phases that never overlap counted once)
    return plan.total() / GIB, (plan.total(("device", "ram")) - plan.total()) / GIB, plan.total("disk") / GIB


def seconds_per_step(log: str) -> float | None:
    """The trainer's progress bar: the last `N.NNs/it` (or it/s) it printed."""
    rates = re.findall(r"(\d+(?:\.\d+)?)(s/it|it/s)", log.replace("\r", "\n"))
    if not rates:
        return None
    value, unit = rates[-1]
    return float(value) if unit == "s/it" else 1.0 / float(value)


def main(argv: list[str] | None = None) -> int:
    from bench_merge import run_measured
    from bench_utilities_memory import make_lora

    from sd_scripts_surge.tiny.kit import ensure_tiny_kit

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student", type=Path, help="full-size SDXL single file (make_synthetic_checkpoints.py)")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=[], help="configuration names starting with these words")
    ap.add_argument("--timeout", type=float, default=5400)
    args = ap.parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    kit = ensure_tiny_kit()
    data = write_dataset(out / "data")
    lora = make_lora(args.student, out / "teacher_lora.safetensors")
    results = []
    for name, flags in CONFIGS.items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        run_dir = out / re.sub(r"\W+", "_", name).strip("_")
        cmd = ["--pretrained_model_name_or_path", str(args.student), "--tokenizer_dir", str(kit.base_dir),
               "--train_data_dir", str(data), "--output_dir", str(run_dir), "--output_name", "real",
               "--teacher_lora", str(lora), *COMMON, *flags]
        device_gib, ram_gib, disk_gib = estimate_totals(cmd)
        full = [str(REPO / ".venv" / "bin" / "python"), str(REPO / "train_surge_sdxl.py"), *cmd]
        r = run_measured(name, full, args.timeout, run_dir.with_suffix(".log"))
        log = run_dir.with_suffix(".log").read_text(errors="replace")
        flavors = sum(f.stat().st_size for f in (run_dir / "flavor_cache").rglob("*") if f.is_file()) / 2**30 \
            if (run_dir / "flavor_cache").is_dir() else float("nan")
        row = {"config": name, "exit": r.returncode, "wall_s": round(r.wall_s, 1),
               "s_per_step": seconds_per_step(log), "peak_rss_gib": round(r.peak_rss_gb * 2**30 / 2**30, 2),
               "estimate_device_gib": round(device_gib, 2), "estimate_offloaded_gib": round(ram_gib, 2),
               "flavor_cache_gib": round(flavors, 3), "estimate_flavor_gib": round(disk_gib, 3)}
        results.append(row)
        print(json.dumps(row), flush=True)
        if r.returncode != 0:
            print(r.log_tail, flush=True)
        for f in run_dir.glob("*.safetensors"):
            f.unlink()  # 5 GB each; the numbers are what we keep
        subprocess.run(["rm", "-rf", str(run_dir / "real-state")], check=False)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
