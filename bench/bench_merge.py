"""Side-by-side merge benchmark: our merge engine against sd-mecha on the same files and thread count.

For every case (method x N x architecture) both tools run as their own subprocess: ours through
`.venv/bin/python -m merge_tools ...`, sd-mecha through this same file in worker mode under
bench/.venv-mecha (see bench/setup_bench_venv.sh). For each run we record wall time and peak memory
of the whole process tree (polled from /proc: VmRSS, which counts mapped file pages the kernel may
drop, and RssAnon, the process's own heap), then compare the two fp16 outputs key by key.

Inputs come from bench/make_synthetic_checkpoints.py (base.safetensors + model_XX.safetensors in
<data>/<arch>/); N models = model_00 .. model_{N-1}.

    .venv/bin/python bench/bench_merge.py --quick                  # SD1, N = 4, all methods
    .venv/bin/python bench/bench_merge.py --arch sd1 sdxl --n 4 16 --methods soup ties

Worker mode (runs inside bench/.venv-mecha; imports only the standard library, torch and sd_mecha):

    bench/.venv-mecha/bin/python bench/bench_merge.py mecha-worker METHOD --base B -o OUT --threads T M1 M2 ...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUR_PYTHON = REPO / ".venv" / "bin" / "python"
MECHA_PYTHON = REPO / "bench" / ".venv-mecha" / "bin" / "python"
METHODS = ("soup", "ties", "model_stock", "geometric_median", "tgmd", "dgmla")

# Our CLI: method name and extra flags per benchmark method (DESIGN §6 definitions).
OUR_USES_BASE = {"ties", "model_stock", "tgmd", "dgmla"}  # soup and geometric_median take the models only
OUR_ARGS: dict[str, list[str]] = {
    "soup": ["soup"],
    "ties": ["ties", "--k", "0.2"],
    "model_stock": ["model_stock"],
    "geometric_median": ["geometric_median"],
    "tgmd": ["tgmd"],
    "dgmla": ["dgmla"],
}

# How far the two tools' definitions agree, printed beside the measured difference.
DEFINITION_NOTES: dict[str, str] = {
    "soup": "same definition (mean of the models); expect <= 1 fp16 ulp",
    "ties": "same definition (trim top 20% |delta|, sign = sgn of the delta sum, disjoint mean, lambda 1); "
    "sd-mecha's trim threshold is a float32 kthvalue at index int(0.8*numel), so entries at the "
    "threshold may fall on the other side",
    "model_stock": "differs by definition: sd-mecha takes cosines along the last dim (rows of 2-D weights, "
    "kernel rows of convs) averaged over adjacent pairs (i, i+1) only; ours: per tensor, all pairs",
    "geometric_median": "Weiszfeld eps 1e-6, maxiter 100, ftol 1e-20 in both; sd-mecha: one point per whole "
    "tensor in weight space (translation-equivariant, so = base + GM of deltas)",
    "tgmd": "sign filter by sign count (TIES-SOUP, k = 100%), then Weiszfeld GM of the filtered deltas per "
    "tensor, added to the base (sd-mecha ties_sum_extended k=1, vote_sgn=False, apply_median=True)",
    "dgmla": "differs by definition and by its random masks (same work): DELLA drop p = 0.1 by magnitude rank "
    "(eps 0.1 toward keeping large |delta|), sign count, Weiszfeld GM. Ours ranks within rows and rescales each "
    "entry by 1/(1 - p_entry) before the vote; sd-mecha (ties_sum_with_dropout probability=0.1, della_eps=0.1, "
    "k=1, apply_median) ranks the whole tensor and divides the merged delta by 1 - p",
}


# --------------------------------------------------------------------------------------------------
# sd-mecha worker (runs in bench/.venv-mecha)
# --------------------------------------------------------------------------------------------------


def mecha_recipe(method: str, base_path: str, model_paths: list[str]):  # noqa: ANN201 - sd_mecha type
    """The sd-mecha 1.1.8 recipe that computes `method` as DESIGN §6 defines it (see DEFINITION_NOTES)."""
    import sd_mecha
    from sd_mecha.extensions.builtin.merge_methods import linear, ties

    base = sd_mecha.model(base_path)
    models = [sd_mecha.model(p) for p in model_paths]
    if method == "soup":
        return sd_mecha.n_average(*models)
    if method == "geometric_median":
        return sd_mecha.geometric_median(*models, eps=1e-6, maxiter=100, ftol=1e-20)
    if method == "model_stock":
        return sd_mecha.n_model_stock(base, *models)
    deltas = [linear.subtract(m, base) for m in models]
    if method == "ties":
        # vote_sgn=True elects the sign by the sum of the deltas (TIES paper), not by the count of signs.
        merged = ties.ties_sum(*deltas, k=0.2, vote_sgn=True)
    elif method == "dgmla":
        merged = ties.ties_sum_with_dropout(*deltas, probability=0.1, della_eps=0.1, rescale=True, k=1.0,
                                            vote_sgn=False, apply_median=True, eps=1e-6, maxiter=100, ftol=1e-20,
                                            seed=0)
    elif method == "tgmd":
        merged = ties.ties_sum_extended(*deltas, k=1.0, vote_sgn=False, apply_median=True,
                                        eps=1e-6, maxiter=100, ftol=1e-20)
    else:
        raise SystemExit(f"sd-mecha worker: unknown method {method!r}; choose from {METHODS}")
    return linear.add_difference(base, merged, alpha=1.0)


def mecha_worker(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_merge.py mecha-worker")
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--base", required=True)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args(argv)

    import sd_mecha
    import torch

    recipe = mecha_recipe(args.method, args.base, args.models)
    sd_mecha.merge(
        recipe,
        merge_dtype=torch.float64,
        output_dtype=torch.float16,
        merge_device="cpu",
        output_device="cpu",
        threads=args.threads,
        output=args.output,
    )
    return 0


# --------------------------------------------------------------------------------------------------
# Measuring a subprocess
# --------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    tool: str
    wall_s: float = 0.0
    peak_rss_gb: float = 0.0
    peak_anon_gb: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    load_avg: float = 0.0  # 1-minute load average of the machine at the end of the run
    log_tail: str = ""


def _tree_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes summed over pid and its descendants, from /proc."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rss = anon = 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue
    return rss, anon


def run_measured(tool: str, cmd: list[str], timeout_s: float, log_path: Path, cwd: Path = REPO) -> RunResult:
    """Run cmd, polling the process tree's memory every 50 ms; kill it after timeout_s."""
    result = RunResult(tool)
    peaks = [0, 0]
    done = threading.Event()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env)

        def poll() -> None:
            while not done.is_set():
                rss, anon = _tree_memory(proc.pid)
                peaks[0], peaks[1] = max(peaks[0], rss), max(peaks[1], anon)
                done.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            result.returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            result.timed_out = True
            proc.kill()
            result.returncode = proc.wait()
        result.wall_s = time.perf_counter() - start
        done.set()
        poller.join()
    result.peak_rss_gb, result.peak_anon_gb = peaks[0] / 2**30, peaks[1] / 2**30
    result.load_avg = os.getloadavg()[0]
    text = log_path.read_bytes().decode(errors="replace").replace("\r", "\n")
    result.log_tail = "\n".join(line for line in text.splitlines()[-15:] if line.strip())
    return result


# --------------------------------------------------------------------------------------------------
# Comparing outputs
# --------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    keys_compared: int = 0
    only_ours: list[str] = field(default_factory=list)
    only_mecha: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    max_ulp_diff: float = 0.0  # in units of the fp16 spacing at the reference value
    frac_elements_differing: float = 0.0
    worst_key: str = ""


def compare_outputs(ours: Path, mecha: Path) -> Comparison:
    """Key-by-key max |ours - mecha| (as fp64) over the keys both files hold."""
    import torch
    from safetensors import safe_open

    cmp = Comparison()
    differing = total = 0
    with safe_open(str(ours), "pt") as a, safe_open(str(mecha), "pt") as b:
        ka, kb = set(a.keys()), set(b.keys())
        cmp.only_ours, cmp.only_mecha = sorted(ka - kb), sorted(kb - ka)
        for key in sorted(ka & kb):
            x, y = a.get_tensor(key), b.get_tensor(key)
            if x.shape != y.shape:
                cmp.only_ours.append(f"{key} (shape {tuple(x.shape)} vs {tuple(y.shape)})")
                continue
            if not x.is_floating_point():
                continue
            diff = (x.double() - y.double()).abs()
            ulp = torch.finfo(torch.float16).eps * y.double().abs().clamp(min=2.0**-14)
            m = float(diff.max()) if diff.numel() else 0.0
            if m > cmp.max_abs_diff:
                cmp.max_abs_diff, cmp.worst_key = m, key
            if diff.numel():
                cmp.max_ulp_diff = max(cmp.max_ulp_diff, float((diff / ulp).max()))
            differing += int((diff > 0).sum())
            total += diff.numel()
            cmp.keys_compared += 1
    cmp.frac_elements_differing = differing / max(total, 1)
    return cmp


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    arch: str
    n: int
    method: str
    ours: RunResult | None = None
    mecha: RunResult | None = None
    baseline: RunResult | None = None  # ours from --ours-baseline-tree (an earlier commit), same settings
    comparison: Comparison | None = None
    read_s: float = 0.0  # seconds to read every input once from the warm page cache (the floor for any tool)
    note: str = ""


def family_paths(data: Path, arch: str, n: int) -> tuple[Path, list[Path]]:
    folder = data / arch
    base = folder / "base.safetensors"
    models = [folder / f"model_{i:02d}.safetensors" for i in range(n)]
    missing = [str(p) for p in [base, *models] if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"benchmark inputs missing: {missing[:3]}{' ...' if len(missing) > 3 else ''}; generate them with "
            f"bench/make_synthetic_checkpoints.py --arch {arch} -n {n} -o {folder}"
        )
    return base, models


def prewarm(paths: list[Path]) -> float:
    """Read the inputs once so every tool starts from the same (warm) page cache when they fit in it; returns
    the seconds that read took (0 when they do not fit)."""
    import psutil

    size = sum(p.stat().st_size for p in paths)
    if size > 0.5 * psutil.virtual_memory().available:
        return 0.0
    buf = bytearray(64 << 20)
    start = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def run_case(case: Case, args: argparse.Namespace) -> None:
    base, models = family_paths(args.data, case.arch, case.n)
    out_dir = args.data / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{case.arch}_n{case.n}_{case.method}"
    ours_out, mecha_out = out_dir / f"{stem}_ours.safetensors", out_dir / f"{stem}_mecha.safetensors"
    if not args.skip_ours:
        ours_out.unlink(missing_ok=True)
    if not args.skip_mecha:
        mecha_out.unlink(missing_ok=True)
    inputs = [str(p) for p in models]
    ours_cmd = [
        str(OUR_PYTHON), "-m", "merge_tools", *OUR_ARGS[case.method],
        *(["--base", str(base)] if case.method in OUR_USES_BASE else []), *inputs, "-o", str(ours_out),
        "--threads", str(args.threads), "--dtype", "fp16", "--no-progress",
    ]
    if args.memory_budget:
        ours_cmd += ["--memory-budget", args.memory_budget]
    mecha_cmd = [
        str(MECHA_PYTHON), str(Path(__file__).resolve()), "mecha-worker", case.method, "--base", str(base),
        *inputs, "-o", str(mecha_out), "--threads", str(args.threads),
    ]
    runs: list[tuple[str, list[str], Path]] = []
    if not args.skip_ours:
        runs.append(("ours", ours_cmd, REPO))
    if args.ours_baseline_tree is not None:
        old_out = out_dir / f"{stem}_baseline.safetensors"
        old_cmd = [*ours_cmd[:ours_cmd.index("-o") + 1], str(old_out), *ours_cmd[ours_cmd.index("-o") + 2:]]
        runs.append(("baseline", old_cmd, args.ours_baseline_tree))
    if not args.skip_mecha:
        runs.append(("mecha", mecha_cmd, REPO))
    for tool, cmd, cwd in runs:
        prewarm([base, *models])
        if not case.read_s:  # the warm read once more, timed: the floor every run is compared with
            case.read_s = prewarm([base, *models] if case.method in OUR_USES_BASE else models)
        timeout = args.timeout
        if tool == "mecha" and args.mecha_timeout_factor and case.ours is not None and not case.ours.returncode:
            # enough to show the ratio's lower bound without waiting for very slow baseline runs
            timeout = min(timeout, max(60.0, args.mecha_timeout_factor * case.ours.wall_s))
        print(f"[{stem}] {tool}: {' '.join(cmd[:6])} ... (timeout {timeout:.0f} s)", flush=True)
        result = run_measured(tool, cmd, timeout, out_dir / f"{stem}_{tool}.log", cwd)
        setattr(case, tool, result)
        status = "TIMEOUT" if result.timed_out else f"rc={result.returncode}"
        print(f"[{stem}] {tool}: {result.wall_s:.1f} s, peak RSS {result.peak_rss_gb:.2f} GB "
              f"(anon {result.peak_anon_gb:.2f} GB), {status}, load avg {result.load_avg:.1f}", flush=True)
        if result.returncode and not result.timed_out:
            print(result.log_tail, flush=True)
    failed = [r for r in (case.ours, case.mecha) if r is not None and (r.timed_out or r.returncode)]
    if ours_out.is_file() and mecha_out.is_file() and not failed:
        case.comparison = compare_outputs(ours_out, mecha_out)
        c = case.comparison
        print(f"[{stem}] max |ours - mecha| = {c.max_abs_diff:.3g} ({c.max_ulp_diff:.1f} fp16 ulp) at "
              f"{c.worst_key}; {c.frac_elements_differing:.2%} of entries differ", flush=True)
    case.note = DEFINITION_NOTES[case.method]
    if case.baseline is not None and case.ours is not None and ours_out.is_file():
        old_out = out_dir / f"{stem}_baseline.safetensors"
        if old_out.is_file():
            same = old_out.read_bytes() == ours_out.read_bytes()
            print(f"[{stem}] baseline tree output {'byte-identical to' if same else 'DIFFERS from'} ours", flush=True)
        old_out.unlink(missing_ok=True)
    if not args.keep_outputs:
        for p in (ours_out, mecha_out):
            p.unlink(missing_ok=True)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def _fmt_run(r: RunResult | None) -> tuple[str, str]:
    if r is None:
        return "-", "-"
    if r.timed_out:
        return f">{r.wall_s:.0f}", f"{r.peak_anon_gb:.2f}/{r.peak_rss_gb:.2f}"
    if r.returncode:
        return "fail", "-"
    return f"{r.wall_s:.1f}", f"{r.peak_anon_gb:.2f}/{r.peak_rss_gb:.2f}"


def table(cases: list[Case]) -> str:
    """Markdown table: times, peak memory (anon/RSS GB), ratios mecha/ours, max abs diff."""
    with_base = any(c.baseline is not None for c in cases)
    head = ("| arch | N | method | read s | ours s | ours/read | mecha s | time mecha/ours | ours GB anon/RSS "
            "| mecha GB anon/RSS | RSS mecha/ours | max abs diff (ulp) |"
            + (" baseline s | baseline/ours | baseline GB anon/RSS |" if with_base else ""))
    lines = [head, "|" + "---|" * (12 + 3 * with_base)]
    for c in cases:
        ot, om = _fmt_run(c.ours)
        per_read = _ratio(c.ours.wall_s, c.read_s) if c.ours is not None and not c.ours.returncode else "-"
        mt, mm = _fmt_run(c.mecha)
        ok = [r for r in (c.ours, c.mecha) if r is not None and not r.returncode]
        t_ratio = rss_ratio = "-"
        if len(ok) == 2:
            t_ratio = _ratio(c.mecha.wall_s, c.ours.wall_s)
            rss_ratio = _ratio(c.mecha.peak_rss_gb, c.ours.peak_rss_gb)
        elif c.mecha is not None and c.mecha.timed_out and c.ours is not None and not c.ours.returncode:
            t_ratio = ">" + _ratio(c.mecha.wall_s, c.ours.wall_s)
        diff = "-"
        if c.comparison is not None:
            diff = f"{c.comparison.max_abs_diff:.2g} ({c.comparison.max_ulp_diff:.0f})"
        row = (f"| {c.arch} | {c.n} | {c.method} | {c.read_s:.1f} | {ot} | {per_read} | {mt} | {t_ratio} | {om} "
               f"| {mm} | {rss_ratio} | {diff} |")
        if with_base:
            bt, bm = _fmt_run(c.baseline)
            ok_b = c.baseline is not None and not c.baseline.returncode and c.ours is not None
            row += f" {bt} | {_ratio(c.baseline.wall_s, c.ours.wall_s) if ok_b else '-'} | {bm} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "mecha-worker":
        return mecha_worker(argv[1:])
    ap = argparse.ArgumentParser(description="merge benchmark: ours vs sd-mecha, same files, same threads")
    ap.add_argument("--data", type=Path, default=Path("/work/bench_data"), help="folder with <arch>/ families")
    ap.add_argument("--arch", nargs="+", default=["sd1"], choices=["sd1", "sdxl"])
    ap.add_argument("--n", nargs="+", type=int, default=[4, 16])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--memory-budget", default="", help="passed to our CLI, e.g. 3GB (default: its own)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is killed")
    ap.add_argument("--mecha-timeout-factor", type=float, default=0.0,
                    help="stop sd-mecha after this many times our wall time (0: only --timeout)")
    ap.add_argument("--quick", action="store_true", help="SD1, N = 4, all methods")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--skip-mecha", action="store_true")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the merged files in <data>/out")
    ap.add_argument("--json", type=Path, default=None, help="also write all results here")
    ap.add_argument("--ours-baseline-tree", type=Path, default=None,
                    help="also run our CLI from this checkout (e.g. a git worktree of an earlier commit), same "
                    "settings, and check its output is byte-identical")
    args = ap.parse_args(argv)
    if args.quick:
        args.arch, args.n = ["sd1"], [4]
    if not args.skip_mecha and not MECHA_PYTHON.is_file():
        ap.error(f"{MECHA_PYTHON} missing: run bench/setup_bench_venv.sh first (or pass --skip-mecha)")

    cases = [Case(arch, n, method) for arch in args.arch for n in args.n for method in args.methods]
    print(f"{len(cases)} cases, threads={args.threads}, timeout {args.timeout:.0f} s per run", flush=True)
    for case in cases:
        try:
            run_case(case, args)
        except FileNotFoundError as exc:
            case.note = str(exc)
            print(f"[{case.arch}_n{case.n}_{case.method}] skipped: {exc}", flush=True)
        if args.json:
            args.json.write_text(json.dumps([asdict(c) for c in cases], indent=1))
    print()
    print(table(cases))
    print()
    for method in args.methods:
        print(f"- {method}: {DEFINITION_NOTES[method]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
