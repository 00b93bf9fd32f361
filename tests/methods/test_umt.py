"""``umt`` (mmfast/methods/umt.py) and its uni-modal teachers (mmfast/teachers.py): the step
against the toolkit's formula written out (peer-methods step-level test: teachers unchanged by a
step, the loss, the student's gradients), the teachers trained before the first step, kept in the
run folder and reused by a resumed run and by another run pointed at them, refused when trained
on other settings."""
import pytest
import torch
import torch.nn.functional as F

import mmfast
from support import small_run_config
from mmfast.diagnostics import count_host_reads
from mmfast.methods import TeacherRun
from mmfast.models import build_model
from mmfast.teachers import Teacher, teacher_file
from mmfast.models.multimodal import make_encoder

C = 5


def make(gen):
    torch.manual_seed(int(torch.randint(1 << 30, (), generator=gen)))
    model = build_model({"audio": "audio", "visual": "frames"}, C, width=4)
    teachers = {m: Teacher(m, make_encoder(m, k, width=4), C).eval().requires_grad_(False)
                for m, k in (("audio", "audio"), ("visual", "frames"))}
    batch = {"audio": torch.randn(6, 32, 24, generator=gen), "visual": torch.randn(6, 2, 3, 32, 32, generator=gen)}
    return model, teachers, batch, torch.randint(0, C, (6,), generator=gen)


def test_umt_step_follows_the_toolkits_formula_and_leaves_the_teachers_alone(gen):
    model, teachers, batch, y = make(gen)
    for t in teachers.values():  # (running statistics that differ from a fresh batch's)
        for bn in t.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    s = float(torch.empty(()).uniform_(0.5, 20.0, generator=gen))
    bal = mmfast.Balancer("umt", dict(model.encoders.items()), head=model.fusion, scaling=s, epochs=3)
    assert [(r.modality, r.epochs) for r in bal.teacher_runs()] == [("audio", 3), ("visual", 3)]
    for run in bal.teacher_runs():
        bal.observe_teacher(run, teachers[run.modality])
    before = {m: {k: v.clone() for k, v in t.state_dict().items()} for m, t in teachers.items()}
    model.train()
    bal.start_epoch(0)
    with count_host_reads() as counts:  # (the teachers' forwards included)
        features = bal.drop(model.encode(batch))
        fused, unimodal = model.fusion(features)
        bal.after_forward(unimodal, y, fused=fused, inputs=batch)
        loss = bal.loss(F.cross_entropy(fused, y, reduction="none"))
    assert counts == {}, f"host reads {counts}"
    params = [p for m in (*model.encoders.values(), model.fusion) for p in m.parameters()]
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    # the reference: teachers' features in eval mode, MSE over samples and dimensions, x s
    with torch.no_grad():
        targets = [teachers["audio"].encoder(batch["audio"].unsqueeze(1)), teachers["visual"].encoder(batch["visual"])]
    expected = F.cross_entropy(fused, y) + s * sum(((f - t) ** 2).mean() for f, t in zip(features, targets))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # the distillation's gradient at the features: 2 s (phi - phiT) / (B d)
    phi = [f.detach().requires_grad_() for f in features]
    term = s * sum(((p - t) ** 2).mean() for p, t in zip(phi, targets))
    for p, t, g in zip(phi, targets, torch.autograd.grad(term, phi)):
        torch.testing.assert_close(g, 2 * s * (p - t) / p.numel(), rtol=1e-5, atol=1e-8)
    for m, t in teachers.items():  # frozen, eval mode: nothing moved, not even batch-norm statistics
        assert not t.training and all(torch.equal(v, before[m][k]) for k, v in t.state_dict().items())
        assert all(p.grad is None for p in t.parameters())


def test_umt_needs_the_inputs_and_its_teachers(gen):
    model, teachers, batch, y = make(gen)
    bal = mmfast.Balancer("umt", dict(model.encoders.items()), head=model.fusion, teacher_epochs=2)
    assert [r.epochs for r in bal.teacher_runs()] == [2, 2]
    features = bal.drop(model.encode(batch))
    fused, unimodal = model.fusion(features)
    with pytest.raises(ValueError, match="pass inputs="):
        bal.after_forward(unimodal, y, fused=fused)
    with pytest.raises(RuntimeError, match="no teacher for"):
        bal.after_forward(unimodal, y, fused=fused, inputs=batch)
    with pytest.raises(ValueError, match="teacher_epochs"):
        mmfast.Balancer("umt", dict(model.encoders.items()), head=model.fusion).teacher_runs()
    with pytest.raises(ValueError, match="umt.scaling"):
        mmfast.Balancer("umt", dict(model.encoders.items()), scaling=-1.0)


# ---- the teachers in the trainer ----------------------------------------------------------------

pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmfast.data import generate

    return generate(tmp_path_factory.mktemp("umt") / "cremad", clips=30, seed=3)


def config(dataset, out, *overrides):
    return small_run_config(dataset, out, "epochs=1", "method=umt", *overrides)


def test_teachers_are_trained_once_kept_and_reused_by_another_run(dataset, tmp_path, monkeypatch):
    from mmfast import teachers as teachers_mod
    from mmfast.trainer import Trainer, resume

    first = Trainer(config(dataset, tmp_path / "first"))
    first.fit()
    for m in ("audio", "visual"):
        assert teacher_file(tmp_path / "first", m).is_file()
    kept = {m: t.state_dict() for m, t in first.balancer.state.teachers.items()}
    # each teacher trained from its seeded initial weights (the run's seed, the modality's position)
    for position, m in enumerate(("audio", "visual")):
        with torch.random.fork_rng():
            torch.manual_seed(first.cfg.seed * 1009 + position + 1)
            initial = teachers_mod._build(first, TeacherRun(m, 1)).state_dict()
        moved = [k for k, v in first.balancer.state.teachers[m].state_dict().items()
                 if v.is_floating_point() and not torch.equal(v, initial[k])]
        assert "classifier.weight" in moved and any(k.startswith("encoder.") for k in moved)

    def refuse(*args, **kwargs):
        raise AssertionError("a kept teacher was trained again")

    monkeypatch.setattr(teachers_mod, "train_teacher", refuse)
    second = Trainer(config(dataset, tmp_path / "second", f"hparams.teachers={tmp_path / 'first'}"))
    second.fit()
    for m, t in second.balancer.state.teachers.items():
        assert all(torch.equal(v, kept[m][k]) for k, v in t.state_dict().items())
    # the student trained alike: training a teacher left the run's random state and data order alone
    for k, v in second.model.state_dict().items():
        assert torch.equal(v, first.model.state_dict()[k]), k
    resumed = resume(tmp_path / "first", ["epochs=2"])  # (more epochs: the teachers' budget was fixed at the start)
    resumed.fit()
    assert all(torch.equal(v, kept["audio"][k]) for k, v in resumed.balancer.state.teachers["audio"].state_dict().items())
    with pytest.raises(ValueError, match="epochs"):  # kept teachers of another budget are refused by name
        Trainer(config(dataset, tmp_path / "third", f"hparams.teachers={tmp_path / 'first'}",
                       "hparams.teacher_epochs=2")).fit()
    with pytest.raises(FileNotFoundError, match="no teacher for"):
        Trainer(config(dataset, tmp_path / "fourth", f"hparams.teachers={tmp_path / 'second'}")).fit()


def test_teacher_run_is_hashable_and_named():
    assert len({TeacherRun("audio", 2), TeacherRun("audio", 2)}) == 1
