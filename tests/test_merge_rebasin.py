"""Re-Basin: a randomly permuted copy (function-identical, run to check) is re-aligned exactly, and merging
after alignment beats merging without."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment

from merge_tools.cli import main as sd_merge
from merge_tools.engine import MergeOptions, merge
from merge_tools.rebasin import Part, PermGroup, _assign, _certified_bf16_match, rebasin, solve_group
from merge_tools.recipe import single_method
from sd_scripts_surge.models import io
from sd_scripts_surge.models.fileio import CheckpointError
from tests.test_lora import run_unet, unet_inputs
from tests.test_models_io import tiny_sdxl

U = "model.diffusion_model."
HEAD, GROUPS = 16, 16  # the tiny UNet: 16-wide heads, GroupNorm(16)


def _take(t: torch.Tensor, axis: int, idx: np.ndarray, offset: int = 0) -> torch.Tensor:
    full = torch.arange(t.shape[axis])
    full[offset : offset + idx.size] = torch.from_numpy(idx) + offset
    return t.index_select(axis, full)


def _block_perm(rng: np.random.Generator, size: int, block: int, per_block: int = 1) -> list[np.ndarray]:
    """Random permutations that move blocks whole and shuffle inside each block (one per 'per_block' part)."""
    outer = rng.permutation(size // block)
    out = []
    for _ in range(per_block):
        perm = np.concatenate([b * block + rng.permutation(block) for b in outer])
        out.append(perm)
    return out


def permute_unet(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A function-identical reordering of hidden units, written independently of merge_tools.rebasin."""
    rng = np.random.default_rng(seed)
    sd = dict(sd)
    for key in list(sd):
        if key.startswith(U) and key.endswith(".in_layers.2.weight"):
            p = key[: -len("in_layers.2.weight")]
            (perm,) = _block_perm(rng, sd[key].shape[0], sd[key].shape[0] // GROUPS)
            for name, axis in (("in_layers.2.weight", 0), ("in_layers.2.bias", 0), ("emb_layers.1.weight", 0),
                               ("emb_layers.1.bias", 0), ("out_layers.0.weight", 0), ("out_layers.0.bias", 0),
                               ("out_layers.3.weight", 1)):
                sd[p + name] = _take(sd[p + name], axis, perm)
        elif key.startswith(U) and re.search(r"attn[12]\.to_q\.weight$", key):
            p = key[: -len("to_q.weight")]
            qk, v = _block_perm(rng, sd[key].shape[0], HEAD, per_block=2)
            for name in ("to_q.weight", "to_k.weight"):
                sd[p + name] = _take(sd[p + name], 0, qk)
            sd[p + "to_v.weight"] = _take(sd[p + "to_v.weight"], 0, v)
            sd[p + "to_out.0.weight"] = _take(sd[p + "to_out.0.weight"], 1, v)
        elif key.startswith(U) and key.endswith("ff.net.0.proj.weight"):
            p = key[: -len("ff.net.0.proj.weight")]
            hidden = sd[key].shape[0] // 2
            perm = rng.permutation(hidden)
            for name in ("ff.net.0.proj.weight", "ff.net.0.proj.bias"):
                sd[p + name] = _take(_take(sd[p + name], 0, perm), 0, perm, hidden)
            sd[p + "ff.net.2.weight"] = _take(sd[p + "ff.net.2.weight"], 1, perm)
    return sd


@pytest.fixture(scope="module")
def model_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return io.save_single_file(tiny_sdxl(0), tmp_path_factory.mktemp("rebasin") / "a.safetensors", precision="float")


def _save_like(sd: dict[str, torch.Tensor], path: Path, like: Path) -> Path:
    """Save with `like`'s metadata (it carries the model configs, which weights alone do not show)."""
    with safe_open(str(like), framework="pt") as f:
        save_file(sd, str(path), metadata=f.metadata())
    return path


def _unet_out(path: Path) -> torch.Tensor:
    return run_unet(io.load_single_file(path).unet, unet_inputs())


def test_permuted_copy_is_function_identical_and_realigned_exactly(model_a: Path, tmp_path: Path) -> None:
    sd = load_file(str(model_a))
    permuted = permute_unet(sd, seed=1)
    b = _save_like(permuted, tmp_path / "b.safetensors", model_a)
    assert sum(not torch.equal(sd[k], permuted[k]) for k in sd) > 50  # many tensors really moved
    torch.testing.assert_close(_unet_out(b), _unet_out(model_a), atol=1e-5, rtol=1e-5)  # same function
    out = tmp_path / "b_aligned.safetensors"
    report = rebasin(model_a, b, out, head_dim=HEAD, norm_groups=GROUPS, progress=False, log=lambda s: None)
    aligned = load_file(str(out))
    assert all(torch.equal(aligned[k], sd[k]) for k in sd), [k for k in sd if not torch.equal(aligned[k], sd[k])][:3]
    assert report.changed > 0 and all(g.after >= g.before - 1e-9 for g in report.groups)


def test_merging_after_alignment_beats_merging_without(model_a: Path, tmp_path: Path) -> None:
    sd = load_file(str(model_a))
    g = torch.Generator().manual_seed(7)
    noisy = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
             else v for k, v in sd.items()}  # a "fine-tune" of A, stored in another basis
    b = _save_like(permute_unet(noisy, seed=2), tmp_path / "b.safetensors", model_a)
    aligned = tmp_path / "b_aligned.safetensors"
    assert sd_merge(["rebasin", str(model_a), str(b), "-o", str(aligned), "--head-dim", str(HEAD),
                     "--norm-groups", str(GROUPS), "--no-progress"]) == 0
    opts = MergeOptions(progress=False, log=lambda s: None, output_dtype="fp32")
    plain, realigned = tmp_path / "plain.safetensors", tmp_path / "realigned.safetensors"
    merge(single_method("soup", [str(model_a), str(b)], {}), plain, opts)
    merge(single_method("soup", [str(model_a), str(aligned)], {}), realigned, opts)
    ideal = _save_like(noisy, tmp_path / "noisy.safetensors", model_a)  # the fine-tune in A's own basis
    best = tmp_path / "best.safetensors"
    merge(single_method("soup", [str(model_a), str(ideal)], {}), best, opts)
    ref = _unet_out(model_a)

    def err_of(p: Path) -> float:  # merge outputs carry merge metadata, not the configs: restore them first
        out = _unet_out(_save_like(load_file(str(p)), p.with_suffix(".cfg.safetensors"), model_a))
        return float((out - ref).norm() / ref.norm())

    err = {name: err_of(p) for name, p in (("plain", plain), ("aligned", realigned), ("ideal", best))}
    assert err["aligned"] == pytest.approx(err["ideal"], rel=1e-3), err  # alignment undoes the reordering
    assert err["plain"] > 3 * err["aligned"], err



def test_recipe_rebasin_node_aligns_then_merges(model_a: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SURGE_CACHE_DIR", str(tmp_path / "cache"))
    sd = load_file(str(model_a))
    b = _save_like(permute_unet(sd, seed=4), tmp_path / "b.safetensors", model_a)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f"""
[models]
a = "{model_a}"
b = "{b}"
[nodes.aligned]
method = "rebasin"
inputs = ["a", "b"]
head_dim = {HEAD}
norm_groups = {GROUPS}
[nodes.final]
method = "soup"
inputs = ["a", "aligned"]
""")
    out = tmp_path / "out.safetensors"
    assert sd_merge(["recipe", str(recipe), "-o", str(out), "--dtype", "fp32", "--no-progress"]) == 0
    got = load_file(str(out))
    assert all(torch.equal(got[k], sd[k]) for k in sd if sd[k].is_floating_point())  # soup(A, A) = A
    cached = list((tmp_path / "cache" / "rebasin").glob("*.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    assert sd_merge(["recipe", str(recipe), "-o", str(tmp_path / "again.safetensors"), "--no-progress"]) == 0
    assert cached[0].stat().st_mtime_ns == mtime  # the aligned file is reused


def test_block_structured_assignment_recovers_a_group_permutation() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 5))
    (perm,) = _block_perm(rng, 12, 3)
    b = np.empty_like(a)
    b[perm] = a  # B's element perm[i] is A's element i
    group = PermGroup("g", 12, 3, [Part([])])
    (found,) = solve_group(group, [a @ b.T])
    assert np.array_equal(b[found], a)
    assert all(set(found[i * 3 : (i + 1) * 3] // 3) == {found[i * 3] // 3} for i in range(4))  # blocks stay whole


def test_refuses_mismatched_models(model_a: Path, tmp_path: Path) -> None:
    sd = load_file(str(model_a))
    key = next(k for k in sd if k.endswith("ff.net.2.weight"))
    sd[key] = sd[key][:, :-1].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    assert sd_merge(["rebasin", str(model_a), str(bad), "-o", str(tmp_path / "o.safetensors"), "--head-dim", "16",
                     "--norm-groups", "16", "--no-progress"]) == 2


def _brute_force_block_value(sims: list[np.ndarray], nb: int, bs: int) -> float:
    """The group optimum the way the first version computed it: every block pair's inner assignments solved."""
    score = np.zeros((nb, nb))
    for s in sims:
        for i in range(nb):
            for j in range(nb):
                r, c = linear_sum_assignment(s[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs], maximize=True)
                score[i, j] += s[i * bs + r, j * bs + c].sum()
    r, c = linear_sum_assignment(score, maximize=True)
    return float(score[r, c].sum())


@pytest.mark.parametrize("related", [False, True])
def test_bounded_block_assignment_reaches_the_full_optimum(related: bool) -> None:
    """The outer problem solved on row-maximum bounds, refined where it picks a bound, reaches the value of
    solving every block pair (unrelated scores: many refinements; related: none), and keeps blocks whole."""
    nb, bs = 5, 4
    group = PermGroup("g", nb * bs, bs, [Part([]), Part([])])
    for seed in range(20):
        rng = np.random.default_rng(seed)
        sims = [rng.standard_normal((nb * bs, nb * bs)) for _ in range(2)]
        if related:
            sims = [s + 6 * np.eye(nb * bs) for s in sims]
        perms = solve_group(group, sims)
        value = sum(float(s[np.arange(nb * bs), p].sum()) for s, p in zip(sims, perms))
        assert value == pytest.approx(_brute_force_block_value(sims, nb, bs), abs=1e-9)
        for p in perms:
            assert sorted(p) == list(range(nb * bs))
            assert all(len(set(p[i * bs : (i + 1) * bs] // bs)) == 1 for i in range(nb))
        assert all(np.array_equal(perms[0] // bs, p // bs) for p in perms)  # parts share the block order


def test_row_maximum_shortcut_is_the_optimal_assignment() -> None:
    rng = np.random.default_rng(3)
    for n, spread in ((40, 5.0), (300, 5.0), (300, 0.0)):
        s = rng.standard_normal((n, n)) + spread * np.eye(n)[rng.permutation(n)]
        perm, value = _assign(s)
        r, c = linear_sum_assignment(s, maximize=True)
        assert value == pytest.approx(float(s[r, c].sum()), abs=1e-9)
        assert sorted(perm) == list(range(n))


def test_bf16_rounding_bound_holds_and_certifies_only_what_fp32_would_pick() -> None:
    g = torch.Generator().manual_seed(0)
    n, k = 96, 3000
    scale = 0.5 + 0.5 * torch.rand(n, 1, generator=g)
    scale[7] = 0.004  # a nearly dead unit: too small for the coarse bound, settled on its own fp32 row
    a = (torch.linalg.qr(torch.randn(k, n, generator=g))[0].T * scale).half().float()  # near-orthogonal units
    exact = a.double() @ a.double().T
    approx = (a.bfloat16() @ a.bfloat16().T).double()
    u, gamma = 2.0**-8, k * 2.0**-24
    bound = u / (1 - u) * approx.abs() + ((1 + u) ** 2 * (1 + gamma) - 1) * torch.outer(a.double().norm(dim=1),
                                                                                        a.double().norm(dim=1))
    assert bool(((approx - exact).abs() <= bound).all())  # the documented bound, on k = 3000 products

    perm = torch.randperm(n, generator=g)
    b = a[perm] + 1e-3 * a[perm].std(dim=1, keepdim=True) * torch.randn(n, k, generator=g)  # a fine-tune, reordered
    found = _certified_bf16_match(a, b)
    assert found is not None
    fp32_perm, fp32_value = _assign((a @ b.T).numpy())
    assert np.array_equal(found[0], fp32_perm) and np.array_equal(found[0], torch.argsort(perm).numpy())
    assert found[2] == pytest.approx(fp32_value, rel=1e-5)
    unrelated = torch.randn(n, k, generator=g)
    assert _certified_bf16_match(a, unrelated) is None  # no clear winners: left to the fp32 path
    twin = a.clone()
    twin[1] = twin[0] + 1e-4 * twin[0].abs().max()  # rows 0 and 1 of B nearly equal: within the bound
    assert _certified_bf16_match(a, twin) is None


def test_bf16_and_fp32_similarities_write_the_same_file(model_a: Path, tmp_path: Path) -> None:
    sd = load_file(str(model_a))
    g = torch.Generator().manual_seed(5)
    noisy = {k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
             else v for k, v in sd.items()}
    b = _save_like(permute_unet(noisy, seed=4), tmp_path / "b.safetensors", model_a)
    reports = {}
    for mode in ("bf16", "fp32"):
        reports[mode] = rebasin(model_a, b, tmp_path / f"{mode}.safetensors", head_dim=HEAD, norm_groups=GROUPS,
                                similarity=mode, progress=False, log=lambda s: None)
    assert reports["bf16"].bf16_parts > 0 and reports["fp32"].bf16_parts == 0
    assert (tmp_path / "bf16.safetensors").read_bytes() == (tmp_path / "fp32.safetensors").read_bytes()
    with pytest.raises(ValueError, match="similarity must be one of"):
        rebasin(model_a, b, tmp_path / "x.safetensors", similarity="fp16", progress=False)


def test_nan_weight_is_a_clear_error_and_writes_nothing(model_a: Path, tmp_path: Path) -> None:
    sd = load_file(str(model_a))
    key = next(k for k in sd if k.endswith("ff.net.2.weight"))
    sd[key] = sd[key].clone()
    sd[key][0, 3] = float("nan")
    bad = _save_like(sd, tmp_path / "bad.safetensors", model_a)
    out = tmp_path / "o.safetensors"
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)} in model B holds NaN or Inf"):
        rebasin(model_a, bad, out, head_dim=HEAD, norm_groups=GROUPS, progress=False, log=lambda s: None)
    assert not out.exists() and not list(tmp_path.glob("o.safetensors*"))
