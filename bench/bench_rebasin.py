"""Re-Basin benchmark: `sd-merge rebasin` against sd-mecha's rebasin on the same SDXL UNet files.

Not a test. Both run as subprocesses on the same two files with the same thread count; wall time and the
peak memory of the process tree are measured by bench_merge.run_measured. sd-mecha runs one weight-matching
pass (`iters=1`; its default is 10), so its time is seconds per pass; ours is exact in one pass.

    bench/setup_bench_venv.sh
    .venv/bin/python bench/make_synthetic_checkpoints.py --arch sdxl -n 1 -o /work/bench_data/sdxl-unet1 \
        --components diffuser
    .venv/bin/python bench/bench_rebasin.py /work/bench_data/sdxl-unet1/base.safetensors \
        /work/bench_data/sdxl-unet1/model_00.safetensors --out-dir /work/bench_out --threads 2

Worker mode (inside bench/.venv-mecha): bench_rebasin.py mecha-worker A B -o OUT --threads T --iters 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]


def mecha_worker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_rebasin.py mecha-worker")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--iters", type=int, default=1)
    args = ap.parse_args(argv)
    import sd_mecha
    import torch

    recipe = sd_mecha.rebasin(sd_mecha.model(args.b), sd_mecha.model(args.a), iters=args.iters)
    sd_mecha.merge(recipe, merge_dtype=torch.float32, output_dtype=torch.float16, merge_device="cpu",
                   output_device="cpu", threads=args.threads, output=args.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "mecha-worker":
        return mecha_worker(argv[1:])
    from bench_merge import MECHA_PYTHON, run_measured

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="reference model (SDXL single-file UNet)")
    ap.add_argument("b", type=Path, help="model to align")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--skip-mecha", action="store_true")
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ours_out, mecha_out = args.out_dir / "rebasin_ours.safetensors", args.out_dir / "rebasin_mecha.safetensors"
    runs = [("ours", [str(REPO / ".venv" / "bin" / "python"), "-m", "merge_tools", "rebasin", str(args.a),
                      str(args.b), "-o", str(ours_out), "--no-progress"])]
    if not args.skip_mecha:
        runs.append(("sd-mecha", [str(MECHA_PYTHON), str(Path(__file__).resolve()), "mecha-worker", str(args.a),
                                  str(args.b), "-o", str(mecha_out), "--threads", str(args.threads)]))
    results = {}
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # both tools: the same thread count
    for tool, cmd in runs:
        (ours_out if tool == "ours" else mecha_out).unlink(missing_ok=True)
        r = run_measured(tool, cmd, args.timeout, args.out_dir / f"rebasin_{tool}.log")
        results[tool] = r
        print(f"{tool:9s} rc={r.returncode} wall {r.wall_s:8.1f} s  peak RSS {r.peak_rss_gb:6.2f} GB "
              f"(load {r.load_avg:.1f})\n{r.log_tail}\n", flush=True)
    if "sd-mecha" in results and results["sd-mecha"].returncode == 0 and results["ours"].returncode == 0:
        print(f"sd-mecha / ours wall time: {results['sd-mecha'].wall_s / results['ours'].wall_s:.2f}x")
    (args.out_dir / "rebasin.json").write_text(
        json.dumps({k: vars(v) for k, v in results.items()}, indent=2, default=str)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
