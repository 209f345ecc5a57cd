"""--surge_teacher_placement cpu: the teacher UNet stays in CPU memory and each block visits the device only while
it runs; results equal the resident teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sd_scripts_surge.surge.placement import is_streamed, stream_from_cpu, streamed_blocks
from sd_scripts_surge.surge.precision import frozen_copy, set_unet_precision
from tests.test_teachers import inputs, plain, tiny_bundle


def test_streamed_blocks_cover_every_parameter_once() -> None:
    unet = tiny_bundle(0).unet
    seen: list[int] = []
    for _, block in streamed_blocks(unet):
        seen += [id(p) for p in block.parameters()]
    assert len(seen) == len(set(seen)) == len(list(unet.parameters()))


def test_streamed_teacher_moves_each_block_in_and_out_and_answers_the_same(monkeypatch) -> None:
    unet = tiny_bundle(0).unet.eval().requires_grad_(False)
    x, t, ctx, add = inputs([10, 500])
    want = plain(unet, x, t, ctx, add)
    streamed = copy.deepcopy(unet)
    names = stream_from_cpu(streamed, "cpu")
    assert is_streamed(streamed) and stream_from_cpu(streamed, "cpu") == names  # idempotent
    blocks = {id(b): n for n, b in streamed_blocks(streamed)}
    moves: list[tuple[str, str]] = []
    real_to = nn.Module.to

    def recording_to(self, *args, **kwargs):
        if id(self) in blocks:
            moves.append((blocks[id(self)], str(args[0] if args else kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", recording_to)
    got = plain(streamed, x, t, ctx, add)
    assert torch.equal(got, want)
    arrived = [n for n, d in moves[0::2]]
    assert sorted(arrived) == sorted(names)  # every block visited once per forward
    for (n_in, d_in), (n_out, d_out) in zip(moves[0::2], moves[1::2]):
        assert n_in == n_out and d_in == "cpu" and d_out == "cpu"  # in (to the execution device), then out


def test_streamed_teacher_is_not_moved_whole_and_a_shared_base_is_refused() -> None:
    from sd_scripts_surge.surge.teachers import TeacherSpec, build_teacher

    student = tiny_bundle(0)
    teacher = build_teacher([TeacherSpec(path=None)], base=frozen_copy(student, share=False))
    stream_from_cpu(teacher.unet, "cpu")
    teacher.to("meta")  # a device move leaves the streamed UNet in CPU memory
    assert all(p.device.type == "cpu" for p in teacher.unet.parameters())
    student.unet.requires_grad_(False)
    with pytest.raises(ValueError, match="shares the LoRA student's base"):
        stream_from_cpu(frozen_copy(student).unet, "cpu")


def test_streamed_fp8_teacher_answers_like_the_resident_fp8_teacher() -> None:
    x, t, ctx, add = inputs([10, 500])
    resident = set_unet_precision(copy.deepcopy(tiny_bundle(0).unet).eval(), "fp8")
    streamed = set_unet_precision(copy.deepcopy(tiny_bundle(0).unet).eval(), "fp8")
    stream_from_cpu(streamed, "cpu")
    assert torch.equal(plain(streamed, x, t, ctx, add), plain(resident, x, t, ctx, add))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: on the CPU the device is the same RAM")
def test_on_cuda_the_device_holds_one_block_at_a_time() -> None:
    unet = tiny_bundle(0).unet.eval().requires_grad_(False)
    x, t, ctx, add = (v.cuda() if torch.is_tensor(v) else {k: w.cuda() for k, w in v.items()}
                      for v in inputs([10, 500]))
    want = plain(copy.deepcopy(unet).cuda(), x, t, ctx, add)
    stream_from_cpu(unet, "cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    got = plain(unet, x, t, ctx, add)
    assert torch.allclose(got, want, atol=1e-5)
    assert all(p.device.type == "cpu" for p in unet.parameters())
    assert torch.cuda.memory_allocated() - before < sum(p.numel() * 4 for p in unet.parameters())
