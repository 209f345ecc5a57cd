"""The peer methods (mergekit, sd-mecha, supermerger), MBW presets, elemental rules and typed parameters,
each pinned to its formula on small tensors worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_tools import methods
from merge_tools.engine import MergeOptions, merge
from merge_tools.methods import ChunkContext, get, uniform_for
from merge_tools.peer_methods import breadcrumb_counts, crossover_filter
from merge_tools.recipe import single_method
from sd_scripts_surge.models.keymap import (
    SD1_BLOCKS,
    SDXL_BLOCKS,
    Architecture,
    elemental_value,
    parse_elemental,
    preset_weights,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    return torch.allclose(a, b, atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------ mergekit


def test_breadcrumb_counts() -> None:
    assert breadcrumb_counts(10, 0.5, 0.1) == (4, 1)  # keep 5, drop the largest 1 and the smallest 4
    assert breadcrumb_counts(10, 0.95, 0.2) == (0, 1)  # too many outliers asked: fewer removed, density met


def test_breadcrumbs_and_breadcrumbs_ties() -> None:
    base = torch.zeros(10, dtype=torch.float64)
    m1 = t(*range(1, 11))  # |τ| 1..10: keep ascending ranks 4..8 → 5..9
    m2 = -t(*range(10, 0, -1))  # |τ| 10..1: keep |τ| in 5..9 → indices 1..5
    out = get("breadcrumbs")([base, m1, m2], density=0.5, gamma=0.1)
    assert torch.equal(out, t(0, -9, -8, -7, -1, 1, 7, 8, 9, 0))
    out = get("breadcrumbs_ties")([base, m1, m2], density=0.5, gamma=0.1)
    assert torch.equal(out, t(0, -9, -8, -7, -6, 6, 7, 8, 9, 0))
    assert torch.equal(get("breadcrumbs")([base, m1, m2], density=1.0, lam=0.5), (m1 + m2) * 0.5)


def test_della_linear_is_a_rescaled_masked_sum() -> None:
    g = torch.Generator().manual_seed(3)
    base, m1, m2 = (torch.randn(4, 50, generator=g, dtype=torch.float64) for _ in range(3))
    assert close(get("della_linear")([base, m1, m2], p=0.0, eps=0.0, lam=1.0), m1 + m2 - base)
    out = get("della_linear")([base, m1, m2], key="k", seed=5, p=0.5, eps=0.0, lam=2.0)
    ctx = ChunkContext("k", (4, 50), 0, 200, 5)
    expected = base.reshape(-1).clone()
    for i, m in enumerate((m1, m2)):
        keep = (uniform_for(ctx, i) >= 0.5).double()
        expected += 2.0 * (m - base).reshape(-1) * keep / 0.5
    assert close(out.reshape(-1), expected)


def test_sce_select_calculate_erase() -> None:
    base = torch.zeros(4, dtype=torch.float64)
    m1, m2 = t(1, 2, 0, -1), t(3, -2, 0, 1)
    # w ∝ mean τ²: 1.5 and 3.5 → 0.3, 0.7; majority sign of Στ = [4,0,0,0] → all +; zeros never agree
    assert close(get("sce")([base, m1, m2]), t(2.4, 2.0, 0.0, 1.0))
    # select_topk 0.5: variances [1,4,0,1], 3 non-zero → k = 1 → only element 1 kept; weights 0.5/0.5
    assert close(get("sce")([base, m1, m2], select_topk=0.5), t(0, 2, 0, 0))
    # mergekit's quirk kept: Σ of the mean squares below 1e-6 → equal weights
    tiny = get("sce")([base, m1 * 1e-4, m2 * 1e-4])
    assert close(tiny, t(2.0, 2.0, 0.0, 1.0) * 1e-4, 1e-15)


def test_karcher_mean_is_the_mean_angle_on_the_circle() -> None:
    x1, x2, x3 = t(2, 0, 0), t(0, 1, 0), t(0, 1, 0)  # angles 0°, 90°, 90° → Karcher mean 60°; mean norm 4/3
    out = get("karcher")([x1, x2, x3])
    assert close(out, (4 / 3) * t(0.5, math.sqrt(3) / 2, 0), 1e-7)
    sym = get("karcher")([t(2, 0), t(0, 2)])
    assert close(sym, t(math.sqrt(2), math.sqrt(2)))


def test_multislerp_is_the_normalised_weighted_mean_of_units_times_the_mean_norm() -> None:
    base = t(1, 1)
    # the weighted tangent sum vanishes by construction, so mergekit's formula reduces to this closed form
    out = get("multislerp")([base, base + t(2, 0), base + t(0, 1)], weights=[0.75, 0.25])
    m = t(0.75, 0.25) / math.hypot(0.75, 0.25)
    assert close(out, base + 1.75 * m, 1e-7)


def test_nuslerp_whole_and_row_wise() -> None:
    base = torch.zeros(2, 2, dtype=torch.float64)
    m1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    m2 = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    rows = get("nuslerp")([base, m1, m2], t=0.5, row_wise=True)
    s = math.sin(math.pi / 4)
    assert close(rows, torch.tensor([[s, s], [1.5, 0.0]], dtype=torch.float64))  # row 1 colinear: LERP
    whole = get("nuslerp")([base, m1, m2], t=0.5)
    omega = math.acos(2 / math.sqrt(10))
    w = math.sin(omega / 2) / math.sin(omega)
    assert close(whole, (m1 + m2) * w)
    with pytest.raises(ValueError, match="at most 2"):
        get("nuslerp")([base, m1, m2, m2])


def test_nearswap() -> None:
    a, b = t(0, 0, 0), t(1e-5, 1e-3, -2e-4)
    assert close(get("nearswap")([a, b], t=1e-4), t(1e-5, 1e-4, -1e-4), 1e-15)


# ---------------------------------------------------------------------------- sd-mecha / supermerger


def test_train_difference() -> None:
    a, b, c = t(1, 0, 2, 5), t(3, 1, 2, 5), t(1, 1, 0, 5)
    # scale = |B−A| / (|B−A| + |B−C|) = [0.5, 1, 0, 0/0 → 0]
    assert close(get("train_difference")([a, b, c]), t(2.8, 0.0, 2.0, 5.0))
    assert close(get("train_difference")([a, b, c], alpha=0.5), t(1.9, 0.0, 2.0, 5.0))


def test_add_perpendicular() -> None:
    a, b, c = t(1, 0), t(1, 1), t(0, 0)
    assert close(get("add_perpendicular")([a, b, c], alpha=0.5), t(1, 0.5))
    assert torch.equal(get("add_perpendicular")([c, b, c]), c)  # A = C: no direction, A unchanged


def test_add_cosine_a_and_b() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    # column cosines [1, 0]; k = 1 − clamp(cos − α, 0, 1) = [0.5, 1]
    assert close(get("add_cosine_a")([a, b], alpha=0.5), torch.tensor([[1.5, 1.0], [0.0, 0.0]], dtype=torch.float64))
    # add_cosine_b: s = (column cos + whole cos 2/√10) / 2
    kb = 1 - ((1 + 2 / math.sqrt(10)) / 2 - 0.5)
    expected = torch.tensor([[1 + kb, 1.0], [0.0, 0.0]], dtype=torch.float64)
    assert close(get("add_cosine_b")([a, b], alpha=0.5), expected)


def test_cosine_a_and_b_by_hand() -> None:
    """Three keys: x with column cosines 1 and 0, y = (3, 4) vs (4, 3) (cosine 0.96), z orthogonal. The model's
    range drops the values under the 1st and over the 99th (midpoint) percentile: with 4 values, the smallest
    (unless tied) and the largest. k → A, 1 − k → B."""
    a = {"x": torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), "y": t(3, 4), "z": t(1, 0)}
    b = {"x": torch.tensor([[2.0, 1.0], [0.0, 0.0]], dtype=torch.float64), "y": t(4, 3), "z": t(0, 1)}
    pairs = {k: [a[k], b[k]] for k in a}
    # cosine_b: s = (cos₀ + cos)/2 = x: [(1 + 2/√10)/2, (2/√10)/2], y: 0.96, z: 0 → range [s_x1, s_x0]
    s0, s1 = (1 + 2 / math.sqrt(10)) / 2, (2 / math.sqrt(10)) / 2
    out = get("cosine_b").over_model(pairs, alpha=0.1)
    k0 = (s0 - s1) / (s0 - s1) - 0.1  # 0.9; column 1 and z: below the range → 0 (B); y above it → 1 (A)
    assert close(out["x"], torch.tensor([[2 - k0, 1.0], [0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(out["y"], a["y"]) and torch.equal(out["z"], b["z"])
    # cosine_a: the range is of cos₀: [1, 0, 0.96, 0] → [0, 0.96] (the 0s tie, nothing under the 1st
    # percentile); s of the column-normalised tensors: x: cos = 1/2 → s = [0.75, 0.25]; y: 0.96; z: 0
    out = get("cosine_a").over_model(pairs, alpha=-0.25)  # |α| = 0.25
    ka = [0.75 / 0.96 - 0.25, 0.25 / 0.96 - 0.25]
    assert close(out["x"], torch.tensor([[2 - ka[0], 1 - ka[1]], [0.0, ka[1]]], dtype=torch.float64))
    assert close(out["y"], b["y"] + 0.75 * (a["y"] - b["y"])) and torch.equal(out["z"], b["z"])
    assert get("cosineA") is get("cosine_a") and get("cosineB") is get("cosine_b")


def _supermerger_cosine(mode: str, a: dict, b: dict, alpha: float) -> dict:
    """supermerger's calcmode cosineA / cosineB written out step by step (scripts/mergers/mergers.py: precosine,
    cosine): the reference the methods must match."""
    import numpy as np
    from torch import nn

    sim = nn.CosineSimilarity(dim=0)
    sims = np.array([], dtype=np.float64)
    for key in a:
        if "first_stage_model" in key:
            continue
        if mode == "A":
            sims = np.append(sims, sim(nn.functional.normalize(a[key], p=2, dim=0),
                                       nn.functional.normalize(b[key], p=2, dim=0)).numpy())
        else:
            mag = torch.dot(a[key].view(-1), b[key].view(-1)) / (torch.norm(a[key]) * torch.norm(b[key]))
            sims = np.append(sims, ((sim(a[key], b[key]) + mag) / 2.0).numpy())
    sims = sims[~np.isnan(sims)]
    sims = np.delete(sims, np.where(sims < np.percentile(sims, 1, method="midpoint")))
    sims = np.delete(sims, np.where(sims > np.percentile(sims, 99, method="midpoint")))
    out = {}
    for key in a:
        x, y = a[key], b[key]
        if mode == "A":
            x, y = nn.functional.normalize(x, p=2, dim=0), nn.functional.normalize(y, p=2, dim=0)
        mag = torch.dot(x.reshape(-1), y.reshape(-1)) / (torch.norm(x) * torch.norm(y))
        k = ((sim(x, y) + mag) / 2.0 - sims.min()) / (sims.max() - sims.min()) - (abs(alpha) if mode == "A" else alpha)
        k = k.clip(min=0, max=1.0)
        out[key] = b[key] * (1 - k) + a[key] * k
    return out


@pytest.mark.parametrize("mode", ["A", "B"])
def test_cosine_modes_match_supermergers_procedure_in_the_engine(tmp_path: Path, mode: str) -> None:
    """Random SD1-layout tensors (conv, linear, bias, a VAE key left out of the range) merged by the streaming
    engine equal supermerger's procedure; the statistics span the whole model, not each tensor."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (8, 6, 3, 3),
              "model.diffusion_model.input_blocks.1.1.proj_in.weight": (12, 16),
              "model.diffusion_model.output_blocks.2.0.out_layers.3.bias": (16,),
              "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": (20, 8),
              "first_stage_model.decoder.conv_in.weight": (4, 4, 3, 3)}
    a = {k: torch.randn(v, generator=gen, dtype=torch.float64) for k, v in shapes.items()}
    b = {k: a[k] + 0.8 * torch.randn(v, generator=gen, dtype=torch.float64) for k, v in shapes.items()}
    expected = _supermerger_cosine(mode, a, b, 0.2)
    method = f"cosine_{mode.lower()}"
    pure = get(method).over_model({k: [a[k], b[k]] for k in a}, alpha=0.2)
    assert all(close(pure[k], expected[k], 1e-7) for k in a)
    linear = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert not close(get(method)([a[linear], b[linear]], alpha=0.2), expected[linear], 1e-3)  # one tensor ≠ model
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.float() for k, v in a.items()}, str(pa))
    save_file({k: v.float() for k, v in b.items()}, str(pb))
    opts = MergeOptions(progress=False, log=lambda s: None, output_dtype="fp32")
    merge(single_method(method, [str(pa), str(pb)], {"alpha": 0.2}), tmp_path / "m.safetensors", opts)
    out = load_file(str(tmp_path / "m.safetensors"))
    a32 = {k: v.float().double() for k, v in a.items()}
    b32 = {k: v.float().double() for k, v in b.items()}
    reference = _supermerger_cosine(mode, a32, b32, 0.2)
    assert all(close(out[k].double(), reference[k], 1e-6) for k in a)


def _rot(phi: float) -> torch.Tensor:
    return torch.tensor([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]], dtype=torch.float64)


def test_rotate_procrustes_and_fractional_alignment() -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 2, generator=g, dtype=torch.float64)
    phi = 0.8
    a = b @ _rot(-phi)
    assert close(get("rotate")([a, b], centralization=0.0), b)  # full alignment recovers B
    assert close(get("rotate")([a, b], alignment=0.0, alpha=0.0), a)
    assert close(get("rotate")([a, b], alignment=0.5, centralization=0.0), b @ _rot(-phi / 2), 1e-9)
    other = torch.randn(6, 2, generator=g, dtype=torch.float64)
    assert close(get("rotate")([other, b], alignment=1.0, alpha=1.0), b)  # alignment = alpha = 1 → B
    assert close(get("rotate")([t(1, 2), t(3, 4)], alpha=0.5), t(2, 3))  # 1-D: plain lerp


def test_crossover_takes_high_frequencies_from_b() -> None:
    n = torch.arange(8, dtype=torch.float64)
    a = torch.ones(8, dtype=torch.float64)
    high = torch.cos(2 * math.pi * 3 * n / 8)  # frequency 3 of 0..4: above the cut at α = 0.5
    low = torch.cos(2 * math.pi * 1 * n / 8)
    assert torch.equal(crossover_filter((8,), 0.5, 0.0, torch.float64), t(0, 0, 0, 1, 1))
    assert close(get("crossover")([a, high], alpha=0.5), a + high)
    assert close(get("crossover")([a, low], alpha=0.5), a)
    assert close(get("crossover")([a, low], alpha=0.3, tilt=1.0), torch.lerp(a, low, 0.3))
    assert torch.equal(get("crossover")([a, low], alpha=1.0), low)


def test_clamp_and_stiffness() -> None:
    a = t(5, -5, 0)
    assert torch.equal(get("clamp")([a, t(1, 2, 3), t(-1, 0, 1)]), t(1, 0, 1))
    bounds = [t(0, 0, 0), t(1, 1, 1), t(4, 4, 4)]  # mean 5/3: nearest bounds above/below are 4 and 1
    assert torch.equal(get("clamp")([t(10, -3, 2), *bounds], stiffness=1.0), t(4, 1, 2))


def test_smooth_add() -> None:
    a = torch.zeros(5, 5, dtype=torch.float64)
    impulse = torch.zeros(5, 5, dtype=torch.float64)
    impulse[2, 2] = 1.0
    zero = torch.zeros(5, 5, dtype=torch.float64)
    assert torch.equal(get("smooth_add")([a, impulse, zero]), a)  # the median filter removes a lone spike
    flat = torch.full((5, 5), 2.0, dtype=torch.float64)
    assert close(get("smooth_add")([a, flat, zero], alpha=0.5), torch.ones(5, 5, dtype=torch.float64))


# ------------------------------------------------------------------------------ typed parameters


def test_parameters_are_typed_and_range_checked() -> None:
    base, m = t(0, 0), t(1, 2)
    with pytest.raises(ValueError, match=r"ties: k=1.5 is outside its range \(0, 1\]"):
        get("ties")([base, m], k=1.5)
    with pytest.raises(ValueError, match="whole number"):
        get("geometric_median")([m, m], maxiter=2.5)
    with pytest.raises(ValueError, match="true or false"):
        get("model_stock")([base, m], per_channel="yes")
    with pytest.raises(ValueError, match="did you mean 'alpha'"):
        get("weighted_pair")([base, m], alhpa=0.3)
    with pytest.raises(ValueError, match="block weight"):
        methods.get("ties").resolve_params({"lam": [0.5, "x"]})


def test_every_method_documents_its_source_and_parameters() -> None:
    readme = (Path(__file__).resolve().parents[1] / "merge_tools" / "README.md").read_text()
    for name, spec in methods.REGISTRY.items():
        assert spec.source, name
        assert f"`{name}`" in readme, f"{name} is not in merge_tools/README.md"
        for pname, param in spec.params.items():
            assert param.kind in ("float", "int", "bool", "floats"), (name, pname)


# -------------------------------------------------------------------------- MBW presets, elemental


def test_presets_reproduce_supermergers_table_for_sd1() -> None:
    n = len(SD1_BLOCKS)
    assert preset_weights("GRAD_V", n)[:3] == pytest.approx([0, 1, 0.9166666667])
    assert preset_weights("SMOOTHSTEP", n)[2] == pytest.approx(0.00506365740740741)
    assert preset_weights("SMOOTHSTEP", n)[13] == pytest.approx(0.5)
    assert preset_weights("COSINE", n)[2] == pytest.approx(0.995722430686905)
    assert preset_weights("SMOOTHSTEP*3", n)[11] == pytest.approx(0.871527777777778)
    assert preset_weights("SMOOTHSTEP/3", n)[6] == pytest.approx(0.68359375)
    assert preset_weights("R_SMOOTHSTEP*2", n)[13] == pytest.approx(0.0)
    assert preset_weights("WRAP08", n) == [0] + [1] * 4 + [0] * 17 + [1] * 4
    assert preset_weights("OUT12_5", n) == [0] * 13 + [0.5] + [1] * 12
    # the cubic Hermite, ring and MID presets: whole rows of supermerger's scripts/mbwpresets_master.txt
    true_hermite = [0, 0, 0.199031876929012, 0.325761959876543, 0.424641927083333, 0.498456790123457,
                    0.549991560570988, 0.58203125, 0.597360869984568, 0.598765432098765, 0.589029947916667,
                    0.570939429012346, 0.547278886959876, 0.520833333333333, 0.49438777970679, 0.470727237654321,
                    0.45263671875, 0.442901234567901, 0.444305796682099, 0.459635416666667, 0.491675106095678,
                    0.543209876543211, 0.617024739583333, 0.715904706790124, 0.842634789737655, 1]
    fake_hermite = [0, 0, 0.157576195987654, 0.28491512345679, 0.384765625, 0.459876543209877, 0.512996720679012,
                    0.546875, 0.564260223765432, 0.567901234567901, 0.560546875, 0.544945987654321,
                    0.523847415123457, 0.5, 0.476152584876543, 0.455054012345679, 0.439453125, 0.432098765432099,
                    0.435739776234568, 0.453125, 0.487003279320987, 0.540123456790124, 0.615234375,
                    0.71508487654321, 0.842423804012347, 1]
    assert preset_weights("TRUE_CUBIC_HERMITE", n) == pytest.approx(true_hermite, abs=1e-12)
    assert preset_weights("TRUE_REVERSE_CUBIC_HERMITE", n) == pytest.approx([0] + [1 - v for v in true_hermite[1:]])
    assert preset_weights("FAKE_CUBIC_HERMITE", n) == pytest.approx(fake_hermite, abs=1e-12)
    assert preset_weights("FAKE_REVERSE_CUBIC_HERMITE", n) == pytest.approx([0] + [1 - v for v in fake_hermite[1:]])
    rings = {  # the table's rows, as strings of 26 values (h = 0.5)
        "RING08_SOFT": "000000h111h00000h111h00000", "RING08_5": "00000001111000001111000000",
        "RING10_5": "00000011111000001111100000", "RING10_3": "00000001111100011111000000"}
    for name, row in rings.items():
        assert preset_weights(name, n) == [0.5 if c == "h" else float(c) for c in row], name
    assert preset_weights("MID12_50", n) == [0] * 6 + [0.5] * 14 + [0] * 6
    ring = preset_weights("RING08_5", len(SDXL_BLOCKS))  # SDXL: 4 blocks each side of M00, as in SD1
    assert ring == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]  # IN03–IN06, OUT02–OUT05
    xl = preset_weights("GRAD_A", len(SDXL_BLOCKS))
    assert len(xl) == 20 and xl[10] == 1.0 and xl[1] == 0.0 and xl[-1] == 0.0  # M00 peak on 19 points
    with pytest.raises(ValueError, match="unknown MBW preset"):
        preset_weights("NOPE", n)


def test_elemental_rules() -> None:
    arch = Architecture("sd1", "ldm", SD1_BLOCKS)
    rules = parse_elemental("NOT OUT04::1\nOUT03 OUT04:attn2 attn1.to_out:0.5, OUT04:attn2.to_k:0.2", arch)
    assert elemental_value(rules, "OUT03", "x.attn2.to_q.weight", 0.9) == 0.5
    assert elemental_value(rules, "OUT04", "x.attn2.to_k.weight", 0.9) == 0.2  # later rule wins
    assert elemental_value(rules, "OUT04", "x.ff.net.weight", 0.9) == 0.9
    assert elemental_value(rules, "IN01", "x.ff.net.weight", 0.9) == 1.0  # NOT OUT04: every other block
    rules = parse_elemental("OUT05:NOT attn proj:0.2", arch)
    assert elemental_value(rules, "OUT05", "x.norm.weight", 1.0) == 0.2
    assert elemental_value(rules, "OUT05", "x.attn1.to_k.weight", 1.0) == 1.0
    with pytest.raises(ValueError, match="unknown block"):
        parse_elemental("OUT99:attn:1", arch)


SD1_KEYS = {
    "model.diffusion_model.input_blocks.11.0.in_layers.0.weight": (4, 4),
    "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight": (4, 4),
    "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_k.weight": (4, 4),
}


def _sd1_pair(tmp: Path) -> tuple[Path, Path]:
    a = {k: torch.zeros(s) for k, s in SD1_KEYS.items()}
    b = {k: torch.ones(s) for k, s in SD1_KEYS.items()}
    pa, pb = tmp / "a.safetensors", tmp / "b.safetensors"
    save_file(a, str(pa))
    save_file(b, str(pb))
    return pa, pb


def test_engine_applies_presets_and_elemental_rules_per_key(tmp_path: Path) -> None:
    pa, pb = _sd1_pair(tmp_path)
    opts = MergeOptions(progress=False, log=lambda s: None, output_dtype="fp32")
    alpha = {"default": 0.5, "elemental": "OUT05:attn2:0.0"}
    merge(single_method("weighted_pair", [str(pa), str(pb)], {"alpha": alpha}), tmp_path / "e.safetensors", opts)
    out = load_file(str(tmp_path / "e.safetensors"))
    keys = list(SD1_KEYS)
    assert torch.equal(out[keys[1]], torch.zeros(4, 4))  # attn2 in OUT05: α = 0 → A
    assert torch.equal(out[keys[2]], torch.full((4, 4), 0.5))
    assert torch.equal(out[keys[0]], torch.full((4, 4), 0.5))
    merge(single_method("weighted_pair", [str(pa), str(pb)], {"alpha": "OUT12"}), tmp_path / "p.safetensors", opts)
    out = load_file(str(tmp_path / "p.safetensors"))
    assert torch.equal(out[keys[0]], torch.zeros(4, 4))  # IN11 is 0 in OUT12
    assert torch.equal(out[keys[1]], torch.ones(4, 4))  # OUT05 is 1
