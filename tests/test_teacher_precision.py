"""--surge_teacher_dtype: a teacher stored in bf16/fp16/fp8 speaks fp32, stays close to fp32, takes less memory;
frozen_copy casts the UNet while copying and shares the frozen text encoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sd_scripts_surge.surge.capture import CaptureOptions, capture_flavor
from sd_scripts_surge.surge.precision import frozen_copy, set_unet_precision, storage_bytes
from sd_scripts_surge.surge.teachers import LoRARef, TeacherSpec, build_teacher
from sd_scripts_surge.surge.units import mbw_unit_map
from tests.test_teachers import inputs, plain, tiny_bundle, write_lora

TOLERANCE = {"fp16": 5e-3, "bf16": 3e-2, "fp8": 1.5e-1}  # relative error of the prediction vs fp32


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def unet_bytes(unet: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in unet.parameters())


@pytest.mark.parametrize("storage", ["fp16", "bf16", "fp8"])
def test_stored_teacher_speaks_fp32_and_stays_close(storage: str) -> None:
    reference = tiny_bundle(0).unet.eval()
    x, t, ctx, add = inputs([10, 500])
    want = plain(reference, x, t, ctx, add)
    unet = frozen_copy(reference)
    fp32_bytes = unet_bytes(unet)
    set_unet_precision(unet, storage)
    got = plain(unet, x, t, ctx, add)  # fp32 inputs in, fp32 prediction out
    assert got.dtype == torch.float32
    assert 0 < relative(got, want) < TOLERANCE[storage]
    weights = sum(m.weight.numel() for m in unet.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    others = sum(p.numel() for p in unet.parameters()) - weights
    assert unet_bytes(unet) == storage_bytes(storage, weights, others) < fp32_bytes // 2 + 1
    if storage == "fp8":
        assert {m.weight.dtype for m in unet.modules() if isinstance(m, nn.Linear | nn.Conv2d)} == {torch.float8_e4m3fn}
    # the capture hooks inside store fp32, so flavors compare with an fp32 student
    with torch.no_grad():
        out, flavor = capture_flavor(unet, mbw_unit_map(unet), {"sample": x, "timestep": t,
                                     "encoder_hidden_states": ctx, "added_cond_kwargs": add}, CaptureOptions())
    assert out.dtype == torch.float32 and {u.output.dtype for u in flavor.units.values()} == {torch.float32}


def test_fp8_teacher_with_a_hooked_lora(tmp_path) -> None:
    """LoRA wrappers call the layer's forward directly: the fp8 weight must still be widened for that call."""
    lora = write_lora(tmp_path / "l.safetensors", tiny_bundle(0), seed=1)
    spec = TeacherSpec(path=None, loras=(LoRARef(lora, 1.0),))
    x, t, ctx, add = inputs([10, 700])
    want = build_teacher([spec], base=frozen_copy(tiny_bundle(0))).unet_forward(x, t, ctx, add)
    teacher = build_teacher([spec], base=frozen_copy(tiny_bundle(0), torch.bfloat16))
    set_unet_precision(teacher.unet, "fp8", teacher.experts[0].networks)
    got = teacher.unet_forward(x, t, ctx, add)
    assert got.dtype == torch.float32 and 0 < relative(got, want) < TOLERANCE["fp8"]


def test_frozen_copy_casts_the_unet_and_shares_the_text_encoders(tmp_path) -> None:
    student = tiny_bundle(0)
    copy = frozen_copy(student, torch.bfloat16)
    assert {p.dtype for p in copy.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.unet.parameters()} == {torch.float32}
    for a, b in zip(student.unet.parameters(), copy.unet.parameters()):
        assert a.data_ptr() != b.data_ptr() and not b.requires_grad
    for part in ("text_encoder_1", "text_encoder_2", "vae"):
        for a, b in zip(getattr(student, part).parameters(), getattr(copy, part).parameters()):
            assert a is b  # shared: neither side trains them
        assert getattr(copy, part) is not getattr(student, part)  # modules copied: hooks stay on the teacher
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(9))
    before = student.text_encoder_1(ids).last_hidden_state
    lora = write_lora(tmp_path / "l.safetensors", student, seed=2)
    teacher = build_teacher([TeacherSpec(path=None, loras=(LoRARef(lora, 1.0),))], base=copy)
    teacher.to("cpu")
    assert torch.equal(student.text_encoder_1(ids).last_hidden_state, before)  # the teacher's TE LoRA stays there
    assert not torch.equal(teacher.experts[0].text_encoders[0](ids).last_hidden_state, before)


def test_a_lora_students_base_is_shared_and_its_lora_is_not_copied(tmp_path) -> None:
    """A LoRA student trains no UNet weight: the teacher base shares the UNet's tensors (no second UNet), and
    the student's own LoRA (hooked before the teacher is built) is not part of the teacher."""
    from networks.lora import create_network

    student = tiny_bundle(0)
    x, t, ctx, add = inputs([10, 500])
    want = plain(student.unet, x, t, ctx, add)
    student.unet.requires_grad_(False)
    network = create_network(1.0, 4, 4.0, None, [], student.unet)
    network.apply_to([], student.unet, apply_text_encoder=False, apply_unet=True)
    with torch.no_grad():
        for lora in network.unet_loras:
            lora.lora_up.weight.normal_()  # a LoRA that changes the output (as --network_weights would)
    assert relative(plain(student.unet, x, t, ctx, add), want) > 1e-3
    base = frozen_copy(student)
    assert base.unet._surge_shared
    for a, b in zip(student.unet.parameters(), base.unet.parameters()):
        assert a is b  # shared, not copied
    assert relative(plain(base.unet, x, t, ctx, add), want) < 1e-6  # the base without the student's LoRA
    assert relative(plain(student.unet, x, t, ctx, add), want) > 1e-3  # the student keeps its LoRA hooked
    lora_file = write_lora(tmp_path / "l.safetensors", student, seed=2)
    teacher = build_teacher([TeacherSpec(path=None, loras=(LoRARef(lora_file, 1.0),))], base=base)
    expected = build_teacher([TeacherSpec(path=None, loras=(LoRARef(lora_file, 1.0),))],
                             base=frozen_copy(tiny_bundle(0))).unet_forward(x, t, ctx, add)
    assert relative(teacher.unet_forward(x, t, ctx, add), expected) < 1e-6
    teacher.to("meta")  # Teacher.to leaves the shared UNet where the student keeps it
    assert all(p.device.type == "cpu" for p in student.unet.parameters())
    with pytest.raises(ValueError, match="shares the student's weights"):
        set_unet_precision(frozen_copy(student).unet, "fp8")
    unshared = frozen_copy(student, share=False)
    assert all(a is not b for a, b in zip(student.unet.parameters(), unshared.unet.parameters()))


def test_precision_is_set_once() -> None:
    unet = frozen_copy(tiny_bundle(0).unet)
    set_unet_precision(unet, "bf16")
    set_unet_precision(unet, "bf16")  # idempotent
    with pytest.raises(ValueError, match="already stored as bf16"):
        set_unet_precision(unet, "fp8")
