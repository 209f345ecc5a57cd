"""Capture hooks: exactness, what is recorded, attention head statistics, pooling, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from surge_helpers import restore_threads, tiny_kwargs, tiny_teacher, use_one_thread

from sd_scripts_surge.surge.capture import (
    CaptureOptions,
    UnitCapture,
    attention_head_summary,
    capture_flavor,
    channel_activity,
    pool_tensor,
    top_channels,
)
from sd_scripts_surge.surge.units import fine_unit_map, mbw_unit_map

setup_module, teardown_module = use_one_thread, restore_threads


@pytest.fixture(scope="module")
def unet():
    return tiny_teacher(0)


@pytest.mark.parametrize("map_builder", [mbw_unit_map, fine_unit_map])
def test_output_unchanged_and_processors_restored(unet, map_builder):
    kwargs = tiny_kwargs()
    unit_map = map_builder(unet)
    with torch.no_grad():
        reference = unet(**kwargs).sample
        before = {n: type(m.processor) for n, m in unet.named_modules() if hasattr(m, "processor")}
        out, flavor = capture_flavor(unet, unit_map, kwargs)
        assert torch.equal(out, reference)  # bitwise: the recording processor calls the original one
        assert torch.equal(flavor.model_output, reference)
        after = {n: type(m.processor) for n, m in unet.named_modules() if hasattr(m, "processor")}
        assert before == after
        assert torch.equal(unet(**kwargs).sample, reference)
    assert set(flavor.units) == set(unit_map.names)


def test_recorded_tensors_and_side_inputs(unet):
    unit_map = mbw_unit_map(unet)
    with torch.no_grad():
        _, flavor = capture_flavor(unet, unit_map, tiny_kwargs(batch=3))
    u = flavor.units
    assert u["IN00"].input.shape == (3, 4, 8, 8) and u["IN00"].output.shape == (3, 32, 8, 8)
    assert u["IN03"].output.shape == (3, 32, 4, 4)  # downsampler
    assert u["OUT00"].input.shape == (3, 128, 2, 2)  # M00 output ⊕ IN08 skip
    assert torch.equal(u["OUT00"].input[:, :64], u["M00"].output)
    assert torch.equal(u["OUT00"].input[:, 64:], u["IN08"].output)
    assert torch.equal(u["IN01"].input, u["IN00"].output)
    assert u["BASE"].side["add_embeds"].shape == (3, 80)
    assert torch.equal(flavor.shared["temb"], u["BASE"].output)
    assert flavor.shared["context"].shape == (3, 77, 64)
    assert u["out"].output.shape == (3, 4, 8, 8)
    for name, f in u.items():
        assert f.topk.shape[0] == 3 and f.topk.dtype == torch.int64, name
        assert f.time_s >= 0 and math.isfinite(f.time_s), name
    # attention units expose per-head statistics for each attention module (4 heads at level 1)
    heads = u["IN04"].heads
    assert set(heads) == {"down_blocks.1.attentions.0.transformer_blocks.0.attn1",
                          "down_blocks.1.attentions.0.transformer_blocks.0.attn2"}
    for stats in heads.values():
        assert stats["entropy"].shape == (3, 4) and stats["buckets"].shape == (3, 4, 4)
        torch.testing.assert_close(stats["buckets"].sum(-1), torch.ones(3, 4))
    assert not u["IN01"].heads


def test_head_statistics_match_explicit_attention(unet):
    """Entropy / bucket mass from the processor equal a hand-computed softmax(q·kᵀ·scale) over the context."""
    kwargs = tiny_kwargs(batch=2)
    attn_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn = unet.get_submodule(attn_name)
    seen = {}
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], ctx=kw["encoder_hidden_states"]),
                                            with_kwargs=True)
    try:
        with torch.no_grad():
            _, flavor = capture_flavor(unet, mbw_unit_map(unet), kwargs, CaptureOptions(token_buckets=7))
    finally:
        handle.remove()
    with torch.no_grad():
        q = attn.to_q(seen["x"]).view(2, -1, attn.heads, 16).transpose(1, 2)
        k = attn.to_k(seen["ctx"]).view(2, -1, attn.heads, 16).transpose(1, 2)
        p = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)  # head_dim 16 → scale 1/4
    entropy = -(p * p.log()).sum(-1).mean(-1)
    buckets = torch.stack([p[..., a:b].sum(-1).mean(-1) for a, b in [(0, 11), (11, 22), (22, 33), (33, 44),
                                                                        (44, 55), (55, 66), (66, 77)]], -1)
    stats = flavor.units["IN04"].heads[attn_name]
    torch.testing.assert_close(stats["entropy"], entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats["buckets"], buckets, rtol=1e-5, atol=1e-6)


def test_encoder_attention_mask_and_query_chunks(unet, monkeypatch):
    """With a token mask the output is still unchanged, and masked tokens get no attention mass."""
    from sd_scripts_surge.surge import capture

    monkeypatch.setattr(capture, "QUERY_CHUNK", 3)  # 16 queries at level 1 → several chunks
    kwargs = tiny_kwargs(batch=2)
    mask = torch.ones(2, 77)
    mask[:, 40:] = 0  # last two of four buckets (≥ token 39) mostly masked
    kwargs["encoder_attention_mask"] = mask
    with torch.no_grad():
        reference = unet(**kwargs).sample
        out, flavor = capture_flavor(unet, mbw_unit_map(unet), kwargs)
    assert torch.equal(out, reference)
    assert flavor.shared["encoder_attention_mask"].shape[-1] == 77
    cross = flavor.units["IN04"].heads["down_blocks.1.attentions.0.transformer_blocks.0.attn2"]["buckets"]
    assert float(cross[..., 3].max()) < 1e-6  # tokens 58–76: all masked
    torch.testing.assert_close(cross.sum(-1), torch.ones(2, 4))


def test_pure_helpers():
    p = torch.full((1, 1, 2, 4), 0.25)
    entropy, mass = attention_head_summary(p, 2)
    torch.testing.assert_close(entropy, torch.full((1, 1), math.log(4)))
    torch.testing.assert_close(mass, torch.full((1, 1, 2), 0.5))
    x = torch.zeros(2, 5, 3, 3)
    x[0, 3] = -4.0
    x[0, 1] = 2.0
    x[1, 0] = 1.0
    assert top_channels(x, 2)[0].tolist() == [3, 1]
    assert top_channels(x, 1)[1].tolist() == [0]
    assert channel_activity(torch.ones(2, 9, 5)).shape == (2, 5)  # tokens: channels last
    assert pool_tensor(torch.ones(1, 2, 8, 8), 2).shape == (1, 2, 2, 2)
    assert pool_tensor(torch.ones(1, 64, 3), 2).shape == (1, 4, 3)
    assert pool_tensor(torch.ones(1, 2, 2, 2), 4).shape == (1, 2, 2, 2)


def test_pooling_to_flavor_resolution(unet):
    with torch.no_grad():
        _, flavor = capture_flavor(unet, fine_unit_map(unet), tiny_kwargs(), CaptureOptions(pool_to=2))
    assert flavor.units["conv_in"].output.shape == (2, 32, 2, 2)
    assert flavor.units["down_blocks.1.attentions.0.transformer_blocks.0"].output.shape == (2, 4, 64)
    assert flavor.shared["context"].shape == (2, 77, 64)  # shared side inputs are not spatial: never pooled
    down = flavor.units["down_blocks.0.downsamplers.0"]
    assert down.input.shape == down.output.shape == (2, 32, 2, 2)  # pooled alike …
    assert down.in_shape == (2, 32, 8, 8) and down.out_shape == (2, 32, 4, 4)  # … the exact shapes are kept
    assert down.changes_shape and down.trajectory_pair()[0] is None
    block = flavor.units["down_blocks.1.attentions.0.transformer_blocks.0"]
    assert not block.changes_shape and block.trajectory_pair()[0] is block.input
    torch.testing.assert_close(flavor.units["conv_in"].output.mean(dim=(2, 3)),
                               capture_flavor(unet, fine_unit_map(unet), tiny_kwargs())[1]
                               .units["conv_in"].output.mean(dim=(2, 3)))


def test_student_capture_keeps_graph(unet):
    unit_map = mbw_unit_map(unet)
    with UnitCapture(unet, unit_map, CaptureOptions(keep_graph=True, head_stats=False)) as cap:
        unet(**tiny_kwargs())
        flavor = cap.take()
    assert flavor.units["IN05"].output.requires_grad
    flavor.units["IN05"].output.pow(2).mean().backward()
    assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0
    assert unet.conv_out.weight.grad is None  # downstream of IN05: not in its graph
    unet.zero_grad(set_to_none=True)
    with torch.no_grad():
        _, teacher = capture_flavor(unet, unit_map, tiny_kwargs())
    assert not teacher.units["IN05"].output.requires_grad


def test_take_without_forward_raises(unet):
    with UnitCapture(unet, mbw_unit_map(unet)) as cap, pytest.raises(RuntimeError, match="no output"):
        cap.take()
