"""Surge engine on the tiny model, end to end in well under a minute on CPU:

teacher capture (flavor cache) → student capture → per-unit statistics over K seeds → anchors and zones →
per-unit LR multipliers → one unit replay with the downstream test.

Writes to --out: `difference_heatmap.png` (units × seeds of relative difference; anchors and high-difference
units marked), `multipliers.json` (multipliers, targets, cascade offsets, zones, statistics, the replay result,
capture time and cache size) and the flavor cache itself (`flavors/`).

Teacher and student: by default the teacher is the tiny UNet (seed 0) and the student is the same network with
a few units' weights perturbed (--perturb), so the right answer is known. With --kit, they are the tiny kit's
trained `teacher` and its `base` (the real distillation pair), conditioned on the kit's held-out prompts.

    python examples/surge_engine_demo.py --out output/surge_demo
    python examples/surge_engine_demo.py --kit
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sd_scripts_surge.surge.anchors import UnitStats, UnitStatsAccumulator, ZoneRules, Zones, find_zones  # noqa: E402
from sd_scripts_surge.surge.capture import CaptureOptions, capture_flavor  # noqa: E402
from sd_scripts_surge.surge.controller import ControllerConfig, UnitLRController, build_unit_param_groups  # noqa: E402
from sd_scripts_surge.surge.flavors import build_or_load_flavors, make_cache_key  # noqa: E402
from sd_scripts_surge.surge.losses import scaled_linear_alphas_cumprod  # noqa: E402
from sd_scripts_surge.surge.perturb import perturbed_copy  # noqa: E402
from sd_scripts_surge.surge.probes import ProbeSet, make_probes  # noqa: E402
from sd_scripts_surge.surge.replay import replay_unit  # noqa: E402
from sd_scripts_surge.surge.units import build_unit_map, hop_distances  # noqa: E402
from sd_scripts_surge.tiny.architecture import build_tiny_unet  # noqa: E402


def synthetic_pair(args, unit_map_name: str):
    teacher = build_tiny_unet(0).eval()
    unit_map = build_unit_map(teacher, unit_map_name)
    student = perturbed_copy(teacher, unit_map, args.perturb, args.perturb_scale, seed=1)
    g = torch.Generator().manual_seed(123)
    contexts = torch.randn(args.conditions, 77, 64, generator=g)
    added = {"text_embeds": torch.randn(args.conditions, 32, generator=g),
             "time_ids": torch.tensor([64.0, 64, 0, 0, 64, 64]).expand(args.conditions, 6)}
    return teacher, student, unit_map, contexts, added


def kit_pair(args, unit_map_name: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sd_scripts_surge.tiny.kit import PromptEncoder, ensure_tiny_kit, load_tokenizers, time_ids_for

    kit = ensure_tiny_kit()
    teacher = UNet2DConditionModel.from_pretrained(kit.teacher_dir, subfolder="unet").eval()
    student = UNet2DConditionModel.from_pretrained(kit.base_dir, subfolder="unet").eval()
    encoder = PromptEncoder(*load_tokenizers(kit.tokenizer_dir, kit.tokenizer_2_dir),
                            CLIPTextModel.from_pretrained(kit.base_dir, subfolder="text_encoder"),
                            CLIPTextModelWithProjection.from_pretrained(kit.base_dir, subfolder="text_encoder_2"))
    prompts = [p for p in kit.prompts_file.read_text().splitlines() if p.strip()][: args.conditions]
    contexts, pooled = encoder(prompts)
    added = {"text_embeds": pooled, "time_ids": time_ids_for(64, 64, len(prompts))}
    return teacher, student, build_unit_map(teacher, unit_map_name), contexts, added


def collect_statistics(teacher_store, student, unit_map, probes: ProbeSet, options: CaptureOptions) -> UnitStats:
    acc = UnitStatsAccumulator(unit_map.names, probes.num_seeds)
    with torch.no_grad():
        for i in range(len(teacher_store)):
            idx = teacher_store.probe_indices(i)
            _, s_flavor = capture_flavor(student, unit_map, probes.unet_kwargs(idx), options)
            acc.add(teacher_store.load(i), s_flavor, probes.seed_index[idx])
    acc.all_reduce()
    return acc.finalize()


def plot_heatmap(stats: UnitStats, zones: Zones, path: Path) -> None:
    d = stats.d.numpy()
    fig, ax = plt.subplots(figsize=(2.2 + 0.5 * d.shape[1], 0.26 * len(stats.units) + 1.5))
    image = ax.imshow(d, aspect="auto", cmap="magma")
    ax.set_xticks(range(d.shape[1]), [f"seed {k}" for k in range(d.shape[1])])
    def label(u: str) -> str:
        marks = ("◆" if u in zones.anchors else "") + ("▲" if u in zones.high_difference else "") + \
            ("~" if u in zones.slow else "")
        return f"{u}  {marks}" if marks else u

    labels = [label(u) for u in stats.units]
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    for i, u in enumerate(stats.units):
        if u in zones.anchors:
            ax.get_yticklabels()[i].set_color("tab:blue")
        elif u in zones.high_difference:
            ax.get_yticklabels()[i].set_color("tab:red")
    fig.colorbar(image, ax=ax, label="relative difference ‖h_T − h_S‖² / ‖h_T‖²")
    ax.set_title("teacher vs student per unit and seed\n◆ anchor (blue)   ▲ high-difference (red)   ~ slow",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/surge_engine_demo")
    parser.add_argument("--kit", action="store_true", help="use the tiny kit's trained teacher and base")
    parser.add_argument("--unit_map", default="mbw", choices=["mbw", "fine"])
    parser.add_argument("--perturb", nargs="*", default=["IN05", "OUT03"], help="units perturbed in the student")
    parser.add_argument("--perturb_scale", type=float, default=0.5)
    parser.add_argument("--conditions", type=int, default=3)
    parser.add_argument("--timesteps", type=int, nargs="*", default=[150, 500, 850])
    parser.add_argument("--num_seeds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=6)
    parser.add_argument("--replay_steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    teacher, student, unit_map, contexts, added = (kit_pair if args.kit else synthetic_pair)(args, args.unit_map)
    probes = make_probes(contexts, args.timesteps, list(range(args.num_seeds)), scaled_linear_alphas_cumprod(),
                         (4, 8, 8), added_cond=added)
    print(f"{len(probes)} probes ({args.conditions} conditionings × {len(args.timesteps)} timesteps × "
          f"{args.num_seeds} seeds), unit map {unit_map.name} with {len(unit_map.units)} units")

    # A. teacher capture, cached
    options = CaptureOptions()
    key = make_cache_key(teacher, probes, unit_map, torch.float32, options)
    t0 = time.perf_counter()
    store = build_or_load_flavors(out / "flavors", teacher, unit_map, probes, key, batch_size=args.batch_size,
                                  options=options)
    capture_s = time.perf_counter() - t0

    # B–C. student capture, statistics, zones
    stats = collect_statistics(store, student, unit_map, probes, options)
    zones = find_zones(stats, ZoneRules(slow_time_ratio=None if not args.kit else 2.0))
    print(f"anchors: {zones.anchors}\nhigh-difference: {zones.high_difference}\nslow: {zones.slow}")

    # D. controller → multipliers (applied here to an AdamW over per-unit parameter groups)
    hops = hop_distances(unit_map)
    controller = UnitLRController(unit_map, hops, ControllerConfig())
    controller.update(dict(zip(unit_map.names, stats.d_mean.tolist())), zones.anchors, zones.slow)
    groups = build_unit_param_groups(student, unit_map, base_lr=1e-4)
    optimizer = torch.optim.AdamW(groups)
    for _ in range(int(controller.config.shock_rate)):  # the ramp, as during training
        controller.step()
    controller.apply(optimizer)

    # E. one replay of the unit where most difference originates
    excess = stats.excess.nanmean(dim=1)
    candidates = [u for u in (zones.high_difference or unit_map.names) if unit_map[u].kind != "embed"]
    unit = max(candidates, key=lambda u: float(excess[unit_map.index(u)]))
    flavors = [store.load(i) for i in range(len(store))]
    replay = replay_unit(student, unit_map, unit, flavors, replay_steps=args.replay_steps, lr=1e-3,
                         post_change_layers=2)
    print(f"replay {unit}: {'accepted' if replay.accepted else 'rolled back'} "
          f"(window error {replay.before:.4f} → {replay.after:.4f})")

    plot_heatmap(stats, zones, out / "difference_heatmap.png")
    result = {
        "multipliers": controller.multipliers(),
        "targets": controller.targets,
        "cascade_offsets": controller.offsets,
        "applied_lr": {g["unit"]: g["lr"] for g in optimizer.param_groups},
        "zones": {"anchors": zones.anchors, "high_difference": zones.high_difference, "slow": zones.slow},
        "statistics": stats.as_dict(),
        "replay": replay.as_dict(),
        "teacher_capture_seconds": round(capture_s, 3),
        "flavor_cache_bytes": store.total_bytes(),
        "probes": len(probes),
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    (out / "multipliers.json").write_text(json.dumps(result, indent=1))
    print(f"teacher capture {capture_s:.2f} s, flavor cache {store.total_bytes() / 2**20:.2f} MB; "
          f"wrote {out / 'difference_heatmap.png'} and {out / 'multipliers.json'} "
          f"in {result['total_seconds']:.1f} s total")
    return result


if __name__ == "__main__":
    main()
