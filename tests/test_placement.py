"""The teacher on its own device (model.teacher_device, sekd.models.loading.PlacedTeacher): its outputs reach the
student's device, and the loss and gradients are those of the teacher beside the student."""

import pytest
import torch

from sekd.core.errors import ConfigError
from sekd.training.batches import micro_batches
from sekd.models.loading import PlacedTeacher, place_teacher, teacher_device
from tests.training.test_trainer import V, packed, tiny_model, trainer


def grads_of(tr):
    loss = tr.accumulate(micro_batches(tr.data, 2, tr.seed, tr.prog)).loss
    return loss, {n: p.grad.clone() for n, p in tr.student.named_parameters()}


@pytest.mark.parametrize("flow", ["dense", "chunked"])
@pytest.mark.parametrize("policy,signal", [("all", None), ("top_k", "student_entropy"), ("top_k", "kl")])
def test_a_placed_teacher_gives_the_same_loss_and_gradients(flow, policy, signal):
    """Wrapped (inputs to its device, hidden states or logits back, a copy of its head on the student's
    device) it computes exactly what the teacher itself does: with the selective head (top_k by the
    student's entropy), and with a signal that needs the teacher everywhere (kl)."""
    here = trainer(2, 2, policy, signal, "per_sequence", flow)
    placed = trainer(2, 2, policy, signal, "per_sequence", flow)
    placed.teacher = PlacedTeacher(placed.teacher, torch.device("cpu"))  # forced: cpu is its own device too
    loss0, g0 = grads_of(here)
    loss1, g1 = grads_of(placed)
    assert loss1 == loss0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0)


def test_the_teachers_outputs_land_on_the_students_device():
    """The teacher computes on its own device (cpu) and hands its output back there; the step moves what the
    loss reads to the student's (meta here: a second device every machine has) once the student's body is
    queued (sekd.training.trainer.arrived), and the teacher's weights stay where they are."""
    from sekd.training.trainer import arrived

    teacher = tiny_model(1).eval()
    placed = PlacedTeacher(teacher, torch.device("meta"))
    x = packed().input_ids[:2]
    with torch.no_grad():
        h = placed.get_decoder()(input_ids=x, use_cache=False).last_hidden_state
        z = placed(input_ids=x).logits
    assert h.device.type == z.device.type == "cpu"
    h, z = arrived(h, torch.device("meta")), arrived(z, torch.device("meta"))
    assert h.device.type == "meta" and h.shape == (2, x.shape[1], 32)
    assert z.device.type == "meta" and z.shape[-1] >= V
    head = placed.get_output_embeddings()
    assert head.weight.device.type == "meta" and not head.weight.requires_grad
    assert placed.get_output_embeddings() is head  # copied once
    assert all(p.device.type == "cpu" for p in teacher.parameters())


def test_a_teacher_beside_the_student_is_not_wrapped():
    teacher = tiny_model(1)
    assert place_teacher(teacher, torch.device("cpu")) is teacher
    assert isinstance(place_teacher(teacher, torch.device("meta")), PlacedTeacher)


def test_teacher_device_names_the_key():
    cpu = torch.device("cpu")
    assert teacher_device(None, cpu) == cpu
    assert teacher_device("cpu", torch.device("meta")) == cpu
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:3"):
            with pytest.raises(ConfigError, match=rf"^model.teacher_device={name} but this machine has no CUDA"):
                teacher_device(name, cpu)
    else:
        count = torch.cuda.device_count()
        with pytest.raises(ConfigError, match=rf"has {count} CUDA device\(s\)"):
            teacher_device(f"cuda:{count}", cpu)


def test_a_run_with_its_teacher_placed_records_its_world_size_devices_and_throughput(tmp_path_factory, tmp_path):
    """Through the real CLI: model.teacher_device=cpu (the student's device here) trains, and the record
    says one process, both devices and the tokens per second per device."""
    import json

    from tests.helpers import TINY, sekd_train, tiny_cache

    tiny_cache(tmp_path_factory, tmp_path / "cache")  # the pair prebuilt: this test is not about building it

    res = sekd_train(
        [
            *TINY,
            "train.steps=2",
            "eval.suite=none",
            "model.teacher_device=cpu",
            f"paths.root={tmp_path}/root",
            f"paths.cache={tmp_path}/cache",
        ],
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (path,) = (tmp_path / "root").rglob("record.json")
    rec = json.loads(path.read_text())
    assert rec["world_size"] == 1 and rec["device_count"] == 1
    assert rec["devices"] == {"student": "cpu", "teacher": "cpu"}
    assert list(rec["peak_memory_mb_per_device"]) == ["cpu"] and rec["peak_memory_mb_per_device"]["cpu"] > 0
    assert rec["tokens_per_s_per_device"] == pytest.approx(rec["tokens_seen"] / rec["train_time_s"], rel=0.02)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (benchmarks/gpu_smoke.sh runs it)")
@pytest.mark.parametrize("flow", ["dense", "chunked"])
def test_a_teacher_on_another_gpu_gives_the_loss_and_gradients_of_one_beside_the_student(flow):
    """Student on cuda:0, teacher on cuda:1 (float32): the step of the teacher beside the student."""

    def on_cuda(teacher_device: str):
        tr = trainer(2, 2, "top_k", "student_entropy", "per_sequence", flow)
        tr.student.to("cuda:0")
        tr.params = [p for p in tr.student.parameters() if p.requires_grad]
        tr.teacher = place_teacher(tr.teacher.to(teacher_device), torch.device("cuda:0"))
        tr.device = torch.device("cuda:0")
        return grads_of(tr)

    loss0, g0 = on_cuda("cuda:0")
    loss1, g1 = on_cuda("cuda:1")
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


@pytest.mark.xdist_group("ddp")  # the 2-rank full_kd run of tests/test_distributed.py, built once a session
def test_a_two_rank_run_records_its_world_size_and_tokens_per_second_per_device(tmp_path_factory):
    """torchrun, 2 gloo ranks: the record (rank 0's) says world size 2 over 2 devices, and tokens/s per device
    is every rank's tokens over the distillation time over both devices."""
    import json

    from tests.test_distributed import run_of, two_ranks

    run = run_of(two_ranks(tmp_path_factory, "full_kd"), "full_kd")  # 2 steps, micro-batch 2 a rank, ddp
    (path,) = run.rglob("record.json")
    rec = json.loads(path.read_text())
    assert (rec["world_size"], rec["device_count"]) == (2, 2)
    assert rec["devices"] == {"student": "cpu", "teacher": "cpu"}
    peaks = rec["peak_memory_mb_per_device"]  # every rank's card, not rank 0's alone
    assert sorted(peaks) == ["rank0/cpu", "rank1/cpu"] and all(mb > 0 for mb in peaks.values())
    assert rec["tokens_seen"] == 2 * 2 * 2 * 64 * 2  # steps x accumulation x micro-batch x seq_len x ranks
    assert rec["tokens_per_s_per_device"] == pytest.approx(rec["tokens_seen"] / rec["train_time_s"] / 2, rel=0.02)


@pytest.mark.parametrize("flow", ["dense", "chunked"])
def test_a_placed_teachers_output_moves_after_the_students_body_is_queued(flow, monkeypatch):
    """Two cards overlap only if the student's body is queued on its card before the copy of the teacher's
    output (which waits for the teacher's card): the teacher's pass hands its output back where it computed
    it (test above), and the step moves it (sekd.training.trainer.arrived) after the student's body ran. On CPU
    the order of the calls is what can be checked."""
    import sekd.training.trainer

    log: list[str] = []
    move = sekd.training.trainer.arrived
    monkeypatch.setattr(
        sekd.training.trainer, "arrived", lambda out, device: log.append("teacher output moved") or move(out, device)
    )
    tr = trainer(2, 1, "top_k", "student_entropy", "per_sequence", flow)
    tr.teacher = PlacedTeacher(tr.teacher, torch.device("cpu"))
    teacher_part = tr.teacher.model.get_decoder() if flow == "chunked" else tr.teacher.model
    teacher_part.register_forward_hook(lambda *a: log.append("teacher"))
    tr.student.get_decoder().register_forward_hook(lambda *a: log.append("student body"))
    tr.forward(next(micro_batches(tr.data, 2, tr.seed, tr.prog)))
    assert log == ["teacher", "student body", "teacher output moved"]


def test_devices_are_spelled_one_way_and_counted_once():
    from sekd.app.record import throughput
    from sekd.models.loading import canonical_device

    assert canonical_device("cuda", current=0) == canonical_device("cuda:0") == torch.device("cuda", 0)
    assert canonical_device("cuda", current=1) == torch.device("cuda", 1)
    assert canonical_device("cpu") == torch.device("cpu")
    stats = {"tokens_seen": 1000, "train_time_s": 10.0, "world_size": 1}
    # model.teacher_device=cuda:0 beside train.device=cuda (stats from before spelling was fixed): one card
    assert throughput({**stats, "devices": {"student": "cuda", "teacher": "cuda:0"}})["device_count"] == 1
    assert throughput({**stats, "devices": {"student": "cuda:0", "teacher": "cuda:1"}})["device_count"] == 2
    assert throughput({**stats, "devices": {"student": "cuda:0", "teacher": None}})["device_count"] == 1
