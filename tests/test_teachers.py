"""Teachers: hooked LoRA == merged LoRA, routing by timestep, weighted experts, frozen, fingerprint."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from networks import lora as L
from sd_scripts_surge.models.bundle import ModelBundle
from sd_scripts_surge.surge.teachers import LoRARef, Teacher, TeacherSpec, build_teacher, freeze, make_expert
from sd_scripts_surge.tiny.architecture import build_tiny_text_encoders, build_tiny_unet, build_tiny_vae

TOL = dict(atol=1e-4, rtol=1e-4)


def tiny_bundle(seed: int = 0) -> ModelBundle:
    te1, te2 = build_tiny_text_encoders(seed)
    return ModelBundle(arch="sdxl", unet=build_tiny_unet(seed), text_encoder_1=te1, vae=build_tiny_vae(seed),
                       text_encoder_2=te2)


def write_lora(path, bundle: ModelBundle, seed: int, dim: int = 4, alpha: float = 2.0) -> str:
    """A kohya LoRA file for the tiny model with non-zero up weights (UNet + both text encoders + conv)."""
    net = L.create_network(1.0, dim, alpha, None, [bundle.text_encoder_1, bundle.text_encoder_2], bundle.unet,
                           conv_dim=2, conv_alpha=1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net.save_weights(path)
    return str(path)


def inputs(timesteps, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    b = len(timesteps)
    return (torch.randn(b, 4, 8, 8, generator=g), torch.tensor(timesteps), torch.randn(b, 5, 64, generator=g),
            {"text_embeds": torch.randn(b, 32, generator=g), "time_ids": torch.randn(b, 6, generator=g)})


@torch.no_grad()
def plain(unet, x, t, ctx, add):
    return unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=add).sample


IDS = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    ref = tiny_bundle()
    return write_lora(d / "a.safetensors", ref, seed=1), write_lora(d / "b.safetensors", ref, seed=2)


@pytest.fixture(scope="module")
def merged_unets(loras):
    """Base + LoRA a merged, base + LoRA b merged (multiplier 1)."""
    return merged_bundle([(loras[0], 1.0)]).unet, merged_bundle([(loras[1], 1.0)]).unet


def merged_bundle(lora_list) -> ModelBundle:
    bundle = tiny_bundle()
    tes = [bundle.text_encoder_1, bundle.text_encoder_2]
    for path, mult in lora_list:
        net, sd = L.create_network_from_weights(mult, path, None, tes, bundle.unet)
        net.merge_to(tes, bundle.unet, sd)
    return bundle


def test_hooked_lora_teacher_equals_merged_weights_unet_and_text_encoders(loras):
    a, b = loras
    spec = TeacherSpec(loras=(LoRARef(a, 0.8), LoRARef(b, -0.5)))
    teacher = build_teacher([spec], base=tiny_bundle())
    merged = merged_bundle([(a, 0.8), (b, -0.5)])

    x, t, ctx, add = inputs([5, 900])
    torch.testing.assert_close(teacher.unet_forward(x, t, ctx, add), plain(merged.unet, x, t, ctx, add), **TOL)
    context, pooled = teacher.encode_text(IDS, IDS)
    with torch.no_grad():
        h1 = merged.text_encoder_1(IDS, output_hidden_states=True).hidden_states[-2]
        out2 = merged.text_encoder_2(IDS, output_hidden_states=True)
    torch.testing.assert_close(context, torch.cat([h1, out2.hidden_states[-2]], -1), **TOL)
    torch.testing.assert_close(pooled, out2.text_embeds, **TOL)
    # and the LoRAs matter: the plain base differs
    assert (plain(tiny_bundle().unet, x, t, ctx, add) - plain(merged.unet, x, t, ctx, add)).abs().max() > 1e-2


def test_teacher_is_frozen_and_never_builds_a_graph(loras):
    teacher = build_teacher([TeacherSpec(loras=(LoRARef(loras[0]),))], base=tiny_bundle())
    e = teacher.experts[0]
    mods = [e.unet, *e.text_encoders, *e.networks]
    assert all(not p.requires_grad for m in mods for p in m.parameters())
    assert all(not m.training for m in mods for m in m.modules())
    x, t, ctx, add = inputs([1, 2])
    with torch.enable_grad():
        out = teacher.unet_forward(x.requires_grad_(True), t, ctx, add)
    assert not out.requires_grad


def test_routed_teacher_picks_the_expert_per_sample(loras, merged_unets):
    a, b = loras
    base = tiny_bundle()
    teacher = build_teacher(
        [TeacherSpec(loras=(LoRARef(a),), timestep_range=(0, 500), name="A"),
         TeacherSpec(loras=(LoRARef(b),), timestep_range=(500, 1000), name="B")],
        base=base,
    )
    assert teacher.mode == "routed"
    ts = [10, 700, 499, 500]
    x, t, ctx, add = inputs(ts)
    out = teacher.unet_forward(x, t, ctx, add)
    pa, pb = (plain(u, x, t, ctx, add) for u in merged_unets)
    for i, ti in enumerate(ts):
        torch.testing.assert_close(out[i], (pa if ti < 500 else pb)[i], **TOL)
    assert (pa - pb).abs().max() > 1e-2  # the experts do differ
    # the shared base module carries both experts' LoRAs; each ran with only its own enabled
    assert teacher.experts[0].unet is teacher.experts[1].unet
    assert all(m.enabled for net in teacher._all_networks() for m in net.loras)


def test_weighted_teacher_is_normalised_weighted_sum(loras, merged_unets):
    a, b = loras
    specs = [TeacherSpec(loras=(LoRARef(a),), weight=1.0), TeacherSpec(loras=(LoRARef(b),), weight=3.0)]
    teacher = build_teacher(specs, base=tiny_bundle())
    assert teacher.mode == "weighted"
    x, t, ctx, add = inputs([100, 800])
    out = teacher.unet_forward(x, t, ctx, add)
    pa, pb = (plain(u, x, t, ctx, add) for u in merged_unets)
    torch.testing.assert_close(out, 0.25 * pa + 0.75 * pb, **TOL)
    torch.testing.assert_close(teacher.mixing_weights(t), torch.tensor([[0.25, 0.75]] * 2, dtype=torch.float64))


def test_overlapping_ranges_mix_and_separate_checkpoints():
    # two different base models (plain UNet experts) with overlapping ranges: mix only where both cover
    ua, ub = build_tiny_unet(0), build_tiny_unet(1)
    ra, rb = copy.deepcopy(ua), copy.deepcopy(ub)
    teacher = Teacher([make_expert(ua, weight=1.0, timestep_range=(0, 600)),
                       make_expert(ub, weight=1.0, timestep_range=(400, 1000))])
    ts = [100, 500, 900]
    x, t, ctx, add = inputs(ts)
    out = teacher.unet_forward(x, t, ctx, add)
    pa, pb = plain(ra, x, t, ctx, add), plain(rb, x, t, ctx, add)
    torch.testing.assert_close(out[0], pa[0], **TOL)
    torch.testing.assert_close(out[1], 0.5 * pa[1] + 0.5 * pb[1], **TOL)
    torch.testing.assert_close(out[2], pb[2], **TOL)
    # per-expert contexts are accepted (experts with different text encoders)
    out2 = teacher.unet_forward(x, t, [ctx, ctx], [add, add])
    torch.testing.assert_close(out2, out)


def test_gaps_in_ranges_are_rejected_at_build():
    with pytest.raises(ValueError, match="499…499"):
        Teacher([make_expert(build_tiny_unet(), timestep_range=(0, 499)),
                 make_expert(build_tiny_unet(), timestep_range=(500, 1000))])
    with pytest.raises(ValueError, match="start < end"):
        TeacherSpec(timestep_range=(500, 100))


def test_single_teacher_without_lora_is_the_checkpoint():
    unet = build_tiny_unet(0)
    ref = freeze(copy.deepcopy(unet))  # requires_grad changes CPU kernels' rounding: compare like with like
    teacher = Teacher([make_expert(unet)])
    x, t, ctx, add = inputs([3, 4])
    assert teacher.mode == "single"
    expected = plain(ref, x, torch.tensor([7, 7]), ctx, add)
    assert torch.equal(teacher.unet_forward(x, 7, ctx, add), expected)
    kwargs = {"sample": x, "timestep": torch.tensor([7, 7]), "encoder_hidden_states": ctx, "added_cond_kwargs": add}
    assert torch.equal(teacher.predict(kwargs), expected)  # distill's TeacherForward form


def test_close_unhooks_the_base(loras):
    base = tiny_bundle()
    ref = freeze(copy.deepcopy(base.unet))
    teacher = build_teacher([TeacherSpec(loras=(LoRARef(loras[0]),))], base=base)
    teacher.close()
    x, t, ctx, add = inputs([1, 2])
    assert torch.equal(plain(base.unet, x, t, ctx, add), plain(ref, x, t, ctx, add))


def test_fingerprint_tracks_weights_loras_and_multipliers(loras, tmp_path):
    a, b = loras
    def fp(*refs, base_seed=0, **kw):
        return build_teacher([TeacherSpec(loras=tuple(refs), **kw)], base=tiny_bundle(base_seed)).fingerprint()

    ref = fp(LoRARef(a, 1.0))
    assert fp(LoRARef(a, 1.0)) == ref
    copy_a = shutil.copy(a, tmp_path / "renamed.safetensors")
    assert fp(LoRARef(str(copy_a), 1.0)) == ref  # content, not file name
    assert fp(LoRARef(a, 0.5)) != ref
    assert fp(LoRARef(b, 1.0)) != ref
    assert fp(LoRARef(a, 1.0), base_seed=1) != ref
    assert fp() != ref


def test_spec_from_config_forms_and_errors():
    spec = TeacherSpec.from_config(
        {"path": "t.safetensors", "loras": ["x.safetensors", ["y.safetensors", 0.5], {"path": "z.safetensors"}],
         "weight": 2, "timestep_range": [0, 500]}
    )
    assert spec.loras == (LoRARef("x.safetensors"), LoRARef("y.safetensors", 0.5), LoRARef("z.safetensors"))
    assert spec.weight == 2.0 and spec.timestep_range == (0.0, 500.0)
    assert TeacherSpec.from_config("m.safetensors").path == "m.safetensors"
    with pytest.raises(ValueError, match="unknown key.*lora_list"):
        TeacherSpec.from_config({"path": "t", "lora_list": []})
    with pytest.raises(ValueError, match="base model"):
        build_teacher([TeacherSpec()])


def test_plain_unet_teacher_skips_text_encoder_parts_of_a_lora(loras, merged_unets):
    a, _ = loras
    unet = build_tiny_unet(0)
    teacher = Teacher([make_expert(unet, [(a, 1.0)])])
    x, t, ctx, add = inputs([20, 600])
    torch.testing.assert_close(teacher.unet_forward(x, t, ctx, add), plain(merged_unets[0], x, t, ctx, add), **TOL)
    assert not teacher.experts[0].networks[0].text_encoder_loras


def test_checkpoint_teacher_loads_once_and_hooks_lora(loras, merged_unets, tmp_path):
    from sd_scripts_surge.models.io import save_single_file

    path = save_single_file(tiny_bundle(), tmp_path / "teacher.safetensors")
    specs = [TeacherSpec(path=str(path), loras=(LoRARef(loras[0]),), timestep_range=(0, 500)),
             TeacherSpec(path=str(path), timestep_range=(500, 1000))]
    teacher = build_teacher(specs)
    assert teacher.experts[0].unet is teacher.experts[1].unet  # one checkpoint in memory
    x, t, ctx, add = inputs([30, 800])
    out = teacher.unet_forward(x, t, ctx, add)
    torch.testing.assert_close(out[0], plain(merged_unets[0], x, t, ctx, add)[0], **TOL)
    torch.testing.assert_close(out[1], plain(tiny_bundle().unet, x, t, ctx, add)[1], **TOL)
