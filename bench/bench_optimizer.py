"""Optimizer step time and state memory: AdaSurge vs torch AdamW, transformers Adafactor, bitsandbytes 8-bit.

One run, one process, the same SDXL-shaped tensors (~100M parameters: 3x3 convs 320/640/1280 wide, attention
and GEGLU linears 640x2048, 1280x1280, 1280x5120, 10240x1280, norms and biases) and the same gradients for
every optimizer. Rounds are interleaved (each round steps every optimizer once) so background load hits all
of them alike; the median over rounds is reported. Ratios are against transformers' Adafactor with kohya's
SDXL settings (relative_step=False, scale_parameter=False, warmup_init=False).

    .venv/bin/python bench/bench_optimizer.py [--scale 1.0] [--rounds 7] [--device cpu|cuda]

Not a test: numbers depend on the machine. Targets (DESIGN §4 / issue 5): AdaSurge (fp32 state) step time
≤ 1.3x Adafactor, state memory ≤ 1.1x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.surge_optimizer import AdaSurge  # noqa: E402

# (shape, count): SDXL UNet-like tensors; about 100M parameters at scale 1.0
SDXL_SHAPES: list[tuple[tuple[int, ...], int]] = [
    ((1280, 1280, 3, 3), 1), ((640, 640, 3, 3), 5), ((320, 320, 3, 3), 4), ((640, 320, 3, 3), 1),
    ((1280, 640, 3, 3), 1),
    ((1280, 1280), 4), ((640, 640), 4), ((640, 2048), 4), ((1280, 2048), 2),
    ((10240, 1280), 1), ((1280, 5120), 2), ((5120, 640), 1), ((640, 2560), 1),
    ((320,), 16), ((640,), 24), ((1280,), 24), ((10240,), 2), ((5120,), 1),
]


def build_tensors(scale: float, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    """The benchmark's parameters with fixed random gradients; `scale` < 1 keeps each count but shrinks dim 0."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape, count in SDXL_SHAPES:
        shape = (max(1, int(shape[0] * scale)), *shape[1:])
        for _ in range(count):
            p = torch.nn.Parameter(0.02 * torch.randn(shape, generator=g).to(device))
            p.grad = 1e-3 * torch.randn(shape, generator=g).to(device)
            params.append(p)
    return params


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of distinct tensor storages held in the optimizer's per-parameter state."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def candidates(params: list[torch.nn.Parameter], lr: float) -> dict[str, Callable[[], torch.optim.Optimizer]]:
    from transformers.optimization import Adafactor

    kohya = dict(relative_step=False, scale_parameter=False, warmup_init=False)
    out: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "transformers Adafactor": lambda: Adafactor(params, lr=lr, **kohya),
        "AdaSurge fp32 (controller)": lambda: AdaSurge(params, lr=lr, standalone=False),
        "AdaSurge fp32 (standalone)": lambda: AdaSurge(params, lr=lr, standalone=True),
        "AdaSurge fp64 state": lambda: AdaSurge(params, lr=lr, standalone=False, state_dtype="fp64"),
        "AdaSurge beta1=0.9": lambda: AdaSurge(params, lr=lr, standalone=False, beta1=0.9),
        "torch AdamW": lambda: torch.optim.AdamW(params, lr=lr, foreach=True),
    }
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        print(f"bitsandbytes 8-bit optimizers: skipped (bitsandbytes not importable: {e})")
        return out
    for name, cls in (("AdamW8bit", bnb.optim.AdamW8bit), ("PagedAdamW8bit", bnb.optim.PagedAdamW8bit),
                      ("Lion8bit", bnb.optim.Lion8bit)):
        probe = torch.nn.Parameter(torch.randn(256, 256, device=params[0].device))
        probe.grad = torch.randn_like(probe)
        try:  # this build may not run the 8-bit kernels on this device: skip with its reason
            cls([probe], lr=lr).step()
        except Exception as e:  # noqa: BLE001 - any failure of the probe step means "not on this device"
            print(f"bitsandbytes {name}: skipped ({type(e).__name__}: {str(e)[:120]})")
            continue
        out[f"bitsandbytes {name}"] = lambda cls=cls: cls(params, lr=lr)
    # the first moment in bitsandbytes' blockwise 8-bit code (needs the same package)
    out["AdaSurge beta1=0.9 8-bit moment"] = lambda: AdaSurge(params, lr=lr, standalone=False, beta1=0.9,
                                                              moment_8bit=True)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink factor on dim 0 of every tensor")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    device = torch.device(args.device)

    params = build_tensors(args.scale, device)
    n = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {n / 1e6:.1f}M parameters on {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    makers = candidates(params, args.lr)
    # The optimizers share the parameters (in-place updates drift them slightly; irrelevant for timing).
    optimizers = {name: make() for name, make in makers.items()}
    for opt in optimizers.values():  # first step allocates state: not timed
        opt.step()
    synchronize(device)

    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for name, opt in optimizers.items():
            synchronize(device)
            t0 = time.perf_counter()
            opt.step()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)

    base = "transformers Adafactor"
    base_t = statistics.median(times[base])
    base_m = state_bytes(optimizers[base])
    print(f"\n{'optimizer':34s} {'step ms (median)':>17s} {'x Adafactor':>12s} {'state MiB':>10s} {'x Adafactor':>12s}")
    for name, opt in optimizers.items():
        t = statistics.median(times[name])
        m = state_bytes(opt)
        print(f"{name:34s} {t * 1e3:17.1f} {t / base_t:12.2f} {m / 2**20:10.1f} {m / max(base_m, 1):12.2f}")
    surge_t = statistics.median(times["AdaSurge fp32 (controller)"]) / base_t
    surge_m = state_bytes(optimizers["AdaSurge fp32 (controller)"]) / max(base_m, 1)
    print(f"\ntarget: AdaSurge fp32 step ≤ 1.30x Adafactor → {surge_t:.2f}x ({'ok' if surge_t <= 1.3 else 'MISSED'}); "
          f"state ≤ 1.10x → {surge_m:.2f}x ({'ok' if surge_m <= 1.1 else 'MISSED'})")


if __name__ == "__main__":
    main()
