"""Teacher flavor cache: reuse, rebuild on key change, corrupt/truncated shards, cached == live loss."""

from __future__ import annotations

import json

import pytest
import torch
from surge_helpers import perturbed_copy, restore_threads, tiny_probes, tiny_teacher, use_one_thread

from sd_scripts_surge.surge.capture import CaptureOptions, UnitCapture, capture_flavor
from sd_scripts_surge.surge.flavors import (
    build_or_load_flavors,
    flavor_from_tensors,
    flavor_to_tensors,
    hash_state_dict,
    lora_set_key,
    make_cache_key,
)
from sd_scripts_surge.surge.losses import (
    alpha_sigma,
    output_kd_loss,
    scaled_linear_alphas_cumprod,
    teacher_scales,
    trajectory_loss,
)
from sd_scripts_surge.surge.units import mbw_unit_map

setup_module, teardown_module = use_one_thread, restore_threads


class Counter:
    def __init__(self, unet):
        self.calls = 0
        unet.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


@pytest.fixture()
def setup(tmp_path):
    teacher = tiny_teacher(0)
    unit_map = mbw_unit_map(teacher)
    probes = tiny_probes(num_conditions=1, seeds=(0, 1))  # 4 probes
    options = CaptureOptions()
    key = make_cache_key(teacher, probes, unit_map, torch.float32, options)
    return teacher, unit_map, probes, options, key, tmp_path / "flavors"


def build(setup, log=None, **kw):
    teacher, unit_map, probes, options, key, directory = setup
    messages = []
    kw.setdefault("estimate", False)  # the meta-device size estimate is tested on its own
    store = build_or_load_flavors(directory, teacher, unit_map, probes, kw.pop("key", key), batch_size=2,
                                  options=options, log=messages.append, **kw)
    return store, messages


def test_build_then_reuse(setup):
    teacher = setup[0]
    counter = Counter(teacher)
    store, messages = build(setup, estimate=True)
    assert counter.calls == 2 and len(store) == 2
    assert "about" in messages[0] and "MB per batch" in messages[0]  # size estimate before any capture
    assert any("first batch took" in m for m in messages)  # time extrapolation after the first batch
    manifest = json.loads((setup[5] / "manifest.json").read_text())
    assert manifest["complete"] and all(len(s["sha256"]) == 64 for s in manifest["shards"])
    store2, messages = build(setup)
    assert counter.calls == 2  # nothing recaptured
    assert "reusing" in messages[-1]
    a, b = store.load(1), store2.load(1)
    assert torch.equal(a.units["OUT03"].output, b.units["OUT03"].output)
    assert store.probe_indices(1) == [2, 3]


def test_key_change_rebuilds(setup):
    teacher, unit_map, probes, options, key, directory = setup
    build(setup)
    counter = Counter(teacher)
    with torch.no_grad():
        teacher.conv_in.bias.add_(0.01)
    new_key = make_cache_key(teacher, probes, unit_map, torch.float32, options)
    assert new_key.digest() != key.digest()
    _, messages = build(setup, key=new_key)
    assert counter.calls == 2 and any("rebuilding" in m for m in messages)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_detected_and_rebuilt(setup, damage):
    store, _ = build(setup)
    original = store.load(0).units["M00"].output.clone()
    shard = setup[5] / store.manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF  # inside tensor data: header still parses, checksum does not
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    counter = Counter(setup[0])
    store2, messages = build(setup)
    assert counter.calls == 1  # only the damaged shard
    assert any("invalid" in m for m in messages)
    assert torch.equal(store2.load(0).units["M00"].output, original)


def test_hashes():
    a, b = tiny_teacher(0), tiny_teacher(0)
    assert hash_state_dict(a) == hash_state_dict(b)
    with torch.no_grad():
        b.conv_out.weight[0, 0, 0, 0] += 1e-6
    assert hash_state_dict(a) != hash_state_dict(b)


def test_lora_set_key(tmp_path):
    f = tmp_path / "a.safetensors"
    f.write_bytes(b"abc")
    key = lora_set_key([(f, 0.5)])
    assert key[0][1] == 0.5 and len(key[0][0]) == 64
    assert lora_set_key([(f, 0.7)]) != key


def test_flavor_tensor_round_trip():
    teacher = tiny_teacher(0)
    probes = tiny_probes(num_conditions=1, seeds=(0,), timesteps=(300,))
    with torch.no_grad():
        _, flavor = capture_flavor(teacher, mbw_unit_map(teacher), probes.unet_kwargs([0]))
    back = flavor_from_tensors(flavor_to_tensors(flavor))
    for name, f in flavor.units.items():
        g = back.units[name]
        assert torch.equal(f.output, g.output) and torch.equal(f.input, g.input) and torch.equal(f.topk, g.topk)
        assert f.time_s == g.time_s and set(f.side) == set(g.side) and set(f.heads) == set(g.heads)
        assert f.in_shape == g.in_shape and f.out_shape == g.out_shape and f.in_shape is not None
    assert torch.equal(back.shared["temb"], flavor.shared["temb"])
    assert torch.equal(back.model_output, flavor.model_output)


def test_loss_from_cache_equals_loss_from_live_teacher(setup):
    teacher, unit_map, probes, options, key, directory = setup
    store, _ = build(setup)
    student = perturbed_copy(teacher, unit_map, ["IN05"], seed=3)
    acp = scaled_linear_alphas_cumprod()
    units = ["IN04", "IN05", "IN06", "OUT03"]

    def loss_against(teacher_flavor, idx):
        with UnitCapture(student, unit_map, CaptureOptions(keep_graph=True, head_stats=False)) as cap:
            student(**probes.unet_kwargs(idx))
            s = cap.take()
        a, sg = alpha_sigma(acp, probes.timesteps[idx])
        t_pairs = {u: (teacher_flavor.units[u].input, teacher_flavor.units[u].output) for u in units}
        s_pairs = {u: (s.units[u].input, s.units[u].output) for u in units}
        scales = teacher_scales({u: t_pairs[u][1] for u in units})
        return output_kd_loss(s.model_output, teacher_flavor.model_output) + trajectory_loss(
            s_pairs, t_pairs, a, sg, scales, traj_weight=0.5)

    for i in range(len(store)):
        idx = store.probe_indices(i)
        cached = loss_against(store.load(i), idx)
        with torch.no_grad():
            _, live = capture_flavor(teacher, unit_map, probes.unet_kwargs(idx), options)
        assert cached.item() > 0
        assert torch.equal(cached, loss_against(live, idx))


def test_probe_set_layout_and_fingerprint():
    from sd_scripts_surge.surge.losses import add_noise
    from sd_scripts_surge.surge.probes import make_probes

    contexts = torch.randn(2, 77, 64)
    acp = scaled_linear_alphas_cumprod()
    probes = make_probes(contexts, [100, 900], [5, 6, 7], acp, (4, 8, 8))
    assert len(probes) == 12 and probes.num_seeds == 3
    assert probes.seed_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # seed-major
    assert probes.timesteps.tolist()[:4] == [100, 900, 100, 900]
    assert torch.equal(probes.context[1], contexts[0]) and torch.equal(probes.context[2], contexts[1])
    torch.testing.assert_close(probes.sample, add_noise(probes.latents, probes.noise, probes.timesteps, acp))
    assert not torch.equal(probes.noise[0], probes.noise[4])  # another seed, other noise
    again = make_probes(contexts, [100, 900], [5, 6, 7], acp, (4, 8, 8))
    assert again.fingerprint() == probes.fingerprint()
    assert make_probes(contexts, [100, 901], [5, 6, 7], acp, (4, 8, 8)).fingerprint() != probes.fingerprint()
    kwargs = probes.unet_kwargs([0, 5])
    assert kwargs["sample"].shape == (2, 4, 8, 8) and "added_cond_kwargs" not in kwargs


def test_size_estimate_from_meta_device_matches_real_shard_payload():
    from sd_scripts_surge.surge.flavors import estimate_flavor_bytes

    teacher = tiny_teacher(0)
    unit_map = mbw_unit_map(teacher)
    probes = tiny_probes(num_conditions=1, seeds=(0,))
    for options in (CaptureOptions(), CaptureOptions(pool_to=2)):
        kwargs = probes.unet_kwargs([0, 1])
        estimate = estimate_flavor_bytes(teacher, unit_map, kwargs, options)
        with torch.no_grad():
            _, flavor = capture_flavor(teacher, unit_map, kwargs, options)
        assert estimate == sum(t.numel() * t.element_size() for t in flavor_to_tensors(flavor).values())
    assert all(p.device.type == "cpu" for p in teacher.parameters())  # the real model was not touched


def test_loading_a_unit_window_reads_only_those_units_and_replays_the_same(setup):
    """Replay of one unit reads only its window's share of the cache, and trains exactly as on the whole cache."""
    from surge_helpers import perturbed_copy

    from sd_scripts_surge.surge.replay import replay_unit, window_units

    store, _ = build(setup)
    teacher, unit_map = setup[0], setup[1]
    names = window_units(unit_map, "IN05", pre_change_layers=1, post_change_layers=2)
    assert names == ["IN04", "IN05", "IN06", "IN07"]
    full, part = store.load(0), store.load(0, units=names)
    assert set(part.units) == set(names) and len(full.units) > len(names)
    assert part.shared.keys() == full.shared.keys()
    for n in names:
        assert torch.equal(part.units[n].output, full.units[n].output)
        assert torch.equal(part.units[n].input, full.units[n].input)
    results = []
    for flavors in ([store.load(i) for i in range(len(store))],
                    [store.load(i, units=names) for i in range(len(store))]):
        student = perturbed_copy(teacher, unit_map, ["IN05"], scale=0.3)
        r = replay_unit(student, unit_map, "IN05", flavors, replay_steps=5, lr=1e-3, pre_change_layers=1,
                        post_change_layers=2)
        results.append((r.before, r.after, [p.detach().clone() for p in student.parameters()]))
    assert results[0][:2] == results[1][:2]
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))
