"""AutoMBW benchmark: seconds per trial on the tiny SDXL-architecture model (merge + probe reward).

Not a test. Builds two tiny models and a reference (weighted_pair with known coarse block weights), runs
`autombw` for --trials trials and reports wall time per trial, split into the merge and the reward.

    .venv/bin/python bench/bench_autombw.py --trials 30
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--groups", choices=["blocks", "coarse"], default="coarse")
    args = ap.parse_args(argv)

    import merge_tools.autombw as am
    from merge_tools.engine import MergeOptions, merge
    from merge_tools.recipe import single_method
    from sd_scripts_surge.models import io
    from sd_scripts_surge.models.keymap import SDXL_BLOCKS, Architecture
    from tests.test_models_io import tiny_sdxl

    tmp = Path(tempfile.mkdtemp(prefix="bench-autombw-"))
    a = io.save_single_file(tiny_sdxl(0), tmp / "a.safetensors", precision="float")
    b = io.save_single_file(tiny_sdxl(5), tmp / "b.safetensors", precision="float")
    target = {"BASE": 0.2, "IN": 0.8, "M": 0.5, "OUT": 0.3}
    groups = am.block_groups(Architecture("sdxl", "ldm", SDXL_BLOCKS), "coarse")
    alpha = {blk: target[d] for d, blocks in groups.items() for blk in blocks}
    ref = tmp / "ref.safetensors"
    merge(single_method("weighted_pair", [str(a), str(b)], {"alpha": alpha}), ref,
          MergeOptions(progress=False, log=lambda s: None))
    recipe = tmp / "recipe.toml"
    recipe.write_text(f'[models]\na = "{a}"\nb = "{b}"\n[nodes.mix]\nmethod = "weighted_pair"\ninputs = ["a", "b"]\n')

    spent = {"merge": 0.0, "reward": 0.0}
    real_merge, real_reward = am.run_merge, am.ProbeReward.__call__

    def timed_merge(*a_, **k):  # noqa: ANN002, ANN003, ANN202
        t = time.perf_counter()
        try:
            return real_merge(*a_, **k)
        finally:
            spent["merge"] += time.perf_counter() - t

    def timed_reward(self, path):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        try:
            return real_reward(self, path)
        finally:
            spent["reward"] += time.perf_counter() - t

    am.run_merge, am.ProbeReward.__call__ = timed_merge, timed_reward
    t0 = time.perf_counter()
    result = am.autombw(recipe, tmp / "best.toml", reference=ref, trials=args.trials, groups=args.groups,
                        progress=False, log=lambda s: None)
    wall = time.perf_counter() - t0
    print(f"{args.trials} trials ({args.groups}, {len(groups) if args.groups == 'coarse' else len(SDXL_BLOCKS)} "
          f"weights) in {wall:.1f} s: {wall / args.trials:.2f} s/trial "
          f"(merge run {spent['merge'] / args.trials:.2f} s, probe reward {spent['reward'] / args.trials:.2f} s, "
          f"merge planning + sampler + study {(wall - spent['merge'] - spent['reward']) / args.trials:.2f} s); "
          f"best reward {result.best_value:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
