"""The trainer on a small generated dataset: the run directory, resuming from the middle of an
epoch to bitwise the same parameters, the non-finite stop, no host reads inside training steps,
evaluation that never drops samples, missing-modality evaluation and linear probes."""
import json
import math

import pytest
import torch

from mmfast.config import load_config
from mmfast.data import generate
from mmfast.trainer import NonFiniteError, Trainer, resolve_precision, resume
from support import count_step_reads, small_run_config as make_config

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("trainer") / "cremad", clips=30, seed=2)




def parameters(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_fit_writes_the_run_directory(dataset, tmp_path):
    out = tmp_path / "run"
    summary = Trainer(make_config(dataset, out, "method=ogm_ge", "hparams.alpha=0.5")).fit()
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "last.pt").exists()
    assert (out / "checkpoints" / "best.pt").exists()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1]
    for key in ("train/loss", "train/acc", "train/ratio/audio", "train/coeff/visual", "val/acc", "val/acc/visual",
                "val/f1", "val/map", "time/epoch_s", "throughput/samples_per_s"):
        assert key in lines[0], key
    saved = json.loads((out / "summary.json").read_text())
    assert saved.pop("methods") == summary.pop("methods")
    assert saved == pytest.approx(summary, nan_ok=True)
    assert saved["best_epoch"] in (0, 1) and 0 <= saved["test/acc"] <= 1
    # evaluation never drops samples: every test clip is counted
    assert saved["test/samples"] == 6
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(make_config(dataset, out))


@pytest.mark.parametrize("method,extra,steps", [("ogm_ge", ["hparams.alpha=1.0"], 2), ("opm", ["hparams.p_exe=1.0"], 2),
                                               ("opm_ogm", [], 4), ("agm", [], 4), ("pmr", [], 4), ("cml", [], 2),
                                               ("mslr", ["hparams.lr_scales={audio: 0.5}"], 4), ("mmpareto", [], 2),
                                               ("mla", [], 4), ("reconboost", ["hparams.phase1_epochs=1"], 4),
                                               ("gblending", ["hparams.super_epoch=2"], 4),
                                               ("relearning", ["hparams.interval=1", "hparams.times=1", "epochs=3"], 4),
                                               ("lfm", [], 2), ("amco", [], 4), ("greedy", [], 4),
                                               ("lfm", ["hparams.schedule=learned", "hparams.held_out_clips=4",
                                                        "hparams.held_out_batch=2"], 4),
                                               ("umt", ["hparams.teacher_epochs=1"], 2),
                                               ("resample", ["hparams.warmup_epochs=1"], 4)])
def test_resume_mid_epoch_gives_bitwise_the_same_parameters(dataset, tmp_path, method, extra, steps):
    full = Trainer(make_config(dataset, tmp_path / "full", f"method={method}", *extra))
    full.fit()
    killed = Trainer(make_config(dataset, tmp_path / "killed", f"method={method}", *extra))
    assert killed.fit(max_steps=steps) is None  # stopped in the middle of an epoch (3 steps an epoch)
    assert (killed.epoch, killed.batch_in_epoch) == divmod(steps, 3)
    # (decoding threads may change on resume: the clips and their augmentations do not depend on them)
    resumed = resume(tmp_path / "killed", ["data.num_workers=2"] if method == "opm" else [])
    parts = len(resumed.balancer.update_parts())  # (an optimizer step per part: mla's modalities in turn)
    assert resumed.batch_in_epoch == steps % 3 and int(resumed.balancer.state.step) == steps * parts
    decoded = []
    loader = resumed.loaders["train"]
    original = loader.draw if hasattr(loader, "draw") else None
    if original is not None:  # the resumed pass reads (or decodes) only the batches still to train on
        loader.draw = lambda i, epoch: decoded.append(epoch) or original(i, epoch)
    resumed.fit()
    if original is not None:
        per_epoch = {e: decoded.count(e) for e in set(decoded)}
        held_out = 0 if loader.held_out is None else len(loader.held_out)  # (lfm's learned schedule)
        assert per_epoch[steps // 3] == len(loader.clips) - held_out - 8 * (steps % 3)
    a, b = parameters(full), parameters(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lines_resumed = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "throughput/"))}  # noqa: E731
    assert [strip(x) for x in lines_full] == [strip(x) for x in lines_resumed]


def test_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    trainer = Trainer(make_config(dataset, tmp_path / "nan", "method=ogm", "checkpoint_every=1"))
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 3 and module.training:
            fused, unimodal = output
            return fused * float("nan"), unimodal
        return output

    trainer.model.fusion.register_forward_hook(poison)
    with pytest.raises(NonFiniteError, match="training step 2"):
        trainer.fit()
    state = torch.load(tmp_path / "nan" / "checkpoints" / "last.pt", weights_only=False)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("method", ["ogm_ge", "opm"])
def test_under_a_grad_scaler_a_non_finite_step_is_skipped_and_counted(dataset, tmp_path, method):
    trainer = Trainer(make_config(dataset, tmp_path / "fp16", f"method={method}", "precision=fp16", "epochs=1"))
    calls = {"n": 0}
    poisoned = []

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 2 and module.training:  # the second training step's loss is Inf
            poisoned.append(True)
            fused, unimodal = output
            return fused * float("inf"), unimodal
        return output

    original = trainer.train_step

    def weights():  # (not the BatchNorm statistics, which the forward pass updates)
        return {k: p.detach().clone() for k, p in trainer.model.named_parameters()}

    def checked_step(batch, **kw):
        before = weights()
        original(batch, **kw)
        if poisoned and poisoned.pop():  # the skipped step left every parameter as it was
            after = weights()
            assert all(torch.equal(before[k], after[k]) for k in before)
            checked.append(True)

    checked = []
    trainer.model.fusion.register_forward_hook(poison)
    trainer.train_step = checked_step
    trainer.fit()
    line = json.loads((tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["train/skipped_steps"] == 1 and checked == [True]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("method", ["joint", "unimodal", "ogm_ge", "opm", "opm_ogm", "moddrop", "olm", "olm_irfb",
                                    "boost", "boost_alternating", "mmcosine", "mbsd", "cml", "agm", "mmpareto", "pmr",
                                    "mslr", "mla", "reconboost", "gblending"])
def test_training_steps_read_nothing_on_the_host(dataset, tmp_path, method):
    hp = {"moddrop": ["hparams.probs={audio: 0.3}"], "unimodal": ["hparams.modality=audio"],
          "olm_irfb": ["model.fusion=irfb", "model.irfb={dim: 16, depth: 1}"],
          "boost_alternating": ["hparams.update=alternating"], "mslr": ["hparams.lr_scales={audio: 0.5}"]}.get(method, [])
    trainer = Trainer(make_config(dataset, tmp_path / method, f"method={method.split('_')[0]}", "epochs=1", *hp))
    reads = count_step_reads(trainer)
    trainer.fit()
    assert len(reads) == 3 and all(r == {} for r in reads), reads


def test_relearning_resumed_between_its_diagnosis_and_its_mix(dataset, tmp_path):
    """A run that ends right after a diagnosis keeps the mix pending in its checkpoint: trained
    further, it applies it when the next epoch starts, as one run straight through does."""
    extra = ["method=relearning", "hparams.interval=1", "hparams.times=1"]
    full = Trainer(make_config(dataset, tmp_path / "full", *extra, "epochs=3"))
    full.fit()
    first = Trainer(make_config(dataset, tmp_path / "two", *extra))
    first.fit()
    assert first.balancer.methods[0].pending is not None  # (diagnosed after epoch 1, not yet applied)
    resumed = resume(tmp_path / "two", ["epochs=3"])
    assert resumed.balancer.methods[0].pending == first.balancer.methods[0].pending
    resumed.fit()
    a, b = parameters(full), parameters(resumed)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_missing_modality_evaluation_and_linear_probe(dataset, tmp_path):
    trainer = Trainer(make_config(dataset, tmp_path / "eval", "epochs=1"))
    trainer.fit()
    plain = trainer.evaluate("test")
    no_audio = trainer.evaluate("test", missing={"audio": 1.0})
    assert no_audio["test/samples"] == plain["test/samples"] == 6
    # with every audio feature dropped, the audio estimate is the bias alone: one class for all clips
    assert no_audio["test/acc/audio"] in {k / 6 for k in range(7)}
    with pytest.raises(ValueError, match=r"names \['depth'\]"):
        trainer.evaluate("test", missing={"depth": 0.5})
    probe = trainer.linear_probe()
    assert set(probe) == {"probe/acc/audio", "probe/acc/visual"} and all(0 <= v <= 1 for v in probe.values())


@pytest.mark.parametrize("overrides,needle", [
    (["method=ogm_ge", "hparams.alpha=-1"], "hparams"),
    (["method=unimodal", "hparams.modality=depth"], "unimodal.modality='depth'"),
    (["method=moddrop", "hparams.probs={depth: 0.5}"], "moddrop.probs names"),
    (["method=boost", "model.fusion=concat"], "method 'boost' works with fusion boost"),
    (["method=ogm_ge", "model.fusion=boost"], "method 'ogm_ge' works with fusion concat"),  # (joint only, and boost)
    (["method=opm", "model.fusion=irfb"], "method 'opm' works with fusion concat or sum"),
    (["method=olm", "model.estimator=zero_out"], "has a classifier per modality"),
    (["model.irfb={dim: 15}", "model.fusion=irfb", "method=olm"], "dim must be a multiple"),
    (["recipes={ogm_x: {hparams: {alpha: 1}}}"], "'ogm_x' is not a method"),
    (["method=ogm_ge", "recipes={ogm_ge: {hparams: {alpha: -1}}}"], "alpha must be >= 0"),
    (["method=ogm_ge", "recipes={ogm_ge: {method: opm}}"], "other than method and recipes"),
    (["method=boost", "hparams.update=alternating", "grad_accum=2"], "grad_accum"),
    (["method=boost", "hparams.update=both"], "boost.update must be one of"),
    (["method=mmpareto", "grad_accum=2"], "grad_accum"),
    (["method=cml", "grad_accum=2"], "grad_accum"),
    (["method=gblending", "hparams.super_epoch=1"], "super_epoch must be >= 2"),
    (["method=mla", "grad_accum=2"], "grad_accum"),
    (["method=mla", "model.fusion=ensemble"], "method 'mla' works with fusion shared"),
    (["method=mmcosine", "model.fusion=concat"], "method 'mmcosine' works with fusion cosine"),
    (["method=mslr", "hparams.lr_scales={depth: 2}"], r"mslr.lr_scales names \['depth'\]"),
])
def test_configuration_errors_fail_at_start_up_naming_the_key(dataset, tmp_path, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        Trainer(make_config(dataset, tmp_path / "bad", *overrides))




def test_tensorboard_events_when_tensorboard_is_installed(dataset, tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class RecordingWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter))
    Trainer(make_config(dataset, tmp_path / "tb", "epochs=1")).fit()
    assert ("train/loss", 0) in written and ("val/acc", 0) in written


@pytest.mark.parametrize("overrides", [
    ["precision=bf16", "method=ogm_ge"], ["precision=fp16", "method=opm"], ["channels_last=true", "method=ogm_ge"],
    ["grad_accum=2", "method=opm_ogm"], ["optim.name=adamw", "optim.scheduler=cosine"],
    ["data.backend=naive", "data.num_workers=0"], ["model.fusion=mlp", "method=ogm"],
    ["model.fusion=late", "method=ogm_ge"], ["model.fusion=irfb", "model.irfb={dim: 16, depth: 1}", "method=ogm"],
])
def test_engine_options_train(dataset, tmp_path, overrides):
    trainer = Trainer(make_config(dataset, tmp_path / "opt", "epochs=1", *overrides))
    summary = trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "opt" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(lines[0]["train/loss"]) and 0 <= summary["test/acc"] <= 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    if "grad_accum=2" in overrides:
        assert trainer.global_step == 2  # 3 micro-batches: two optimizer steps


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(False, False, "fp32"), (True, False, "bf16"), (False, True, "bf16")])
def test_precision_auto_is_bf16_only_on_cpus_with_bf16_units(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    for name in ("fp32", "bf16", "fp16"):  # an explicit precision is kept, whatever the machine
        assert resolve_precision(name, torch.device("cpu")) == name


@pytest.mark.parametrize("capability,expected", [((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("native", [False, True])
def test_a_run_with_precision_auto_trains_in_the_resolved_precision(dataset, tmp_path, monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    trainer = Trainer(make_config(dataset, tmp_path / "auto", "precision=auto", "method=ogm_ge", "epochs=1"))
    assert trainer.precision == ("bf16" if native else "fp32")
    assert trainer.autocast_dtype == (torch.bfloat16 if native else None) and trainer.scaler is None
    conv = next(m for m in trainer.model.encoders["audio"].modules() if isinstance(m, torch.nn.Conv2d))
    seen = []
    hook = conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.train_step(next(iter(trainer.loaders["train"])))
    hook.remove()
    assert seen == [torch.bfloat16 if native else torch.float32]  # the convolutions ran in that precision
    summary = trainer.fit()
    assert summary["precision"] == trainer.precision and 0 <= summary["test/acc"] <= 1
    assert load_config(tmp_path / "auto" / "config.yaml").precision == "auto"  # what the user asked, kept


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_runs_keep_freed_memory_unless_told_not_to(dataset, tmp_path, monkeypatch, retain):
    calls = []
    monkeypatch.setattr("mmfast.trainer.retain_freed_memory", lambda: calls.append("retain") or True)
    Trainer(make_config(dataset, tmp_path / "m", f"retain_freed_memory={str(retain).lower()}"))
    assert calls == (["retain"] if retain else [])


def test_clips_failing_during_training_are_skipped_and_evaluation_names_them(dataset, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    trainer = Trainer(make_config(root, tmp_path / "faults", "data.on_error=skip", "epochs=1"))
    broken = {split: trainer.loaders[split].clips[0] for split in ("train", "test")}
    for clip in broken.values():  # probed fine when the run started, unreadable now
        clip.files["audio"].write_bytes(b"RIFF" + b"\x00" * 40)
    summary = trainer.fit()
    assert trainer.loaders["train"].last_epoch_skipped.names == [broken["train"].clip_id]
    line = json.loads((tmp_path / "faults" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["train/skipped"] == 1 and line["val/skipped"] == 0
    assert summary["test/skipped"] == 1 and summary["test/skipped_clips"] == [broken["test"].clip_id]
    assert summary["test/samples"] == len(trainer.loaders["test"].clips) - 1


def test_unimodal_runs_neither_train_nor_consult_the_other_encoder(dataset, tmp_path):
    trainer = Trainer(make_config(dataset, tmp_path / "uni", "method=unimodal", "hparams.modality=audio",
                                  "epochs=1"))
    visual = trainer.model.encoders["visual"]
    start = {k: v.clone() for k, v in visual.state_dict().items()}
    calls = []
    visual.register_forward_hook(lambda *args: calls.append(1))
    trainer.fit()
    assert not calls  # never encoded in training or evaluation
    assert all(torch.equal(start[k], v) for k, v in visual.state_dict().items())
    before = trainer.evaluate("test")
    with torch.no_grad():
        for p in visual.parameters():
            p.add_(torch.randn_like(p))
    assert trainer.evaluate("test")["test/acc"] == before["test/acc"]


def test_compiled_encoders_train_like_eager_and_keep_checkpoint_keys(dataset, tmp_path):
    """compile=true compiles each encoder in place: same parameters after two steps (up to
    the compiled kernels' rounding), same state-dict keys, so checkpoints stay interchangeable."""
    eager = Trainer(make_config(dataset, tmp_path / "eager", "method=ogm_ge", "compile=false"))
    compiled = Trainer(make_config(dataset, tmp_path / "compiled", "method=ogm_ge", "compile=true"))
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
    batch = next(iter(eager.loaders["train"].batches()))
    for trainer in (eager, compiled):
        trainer.model.train()
        trainer.balancer.start_epoch(0)
        for _ in range(2):
            trainer.train_step(batch)
    for (name, a), b in zip(parameters(eager).items(), parameters(compiled).values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("fusion", ["late", "boost"])
def test_joint_on_heads_of_their_own_trains_every_heads_cross_entropy(dataset, tmp_path, fusion):
    """joint with late heads or boost's classifiers (the same-model baselines of olm and boost):
    the gradient is that of CE(fused) + sum over modalities of CE(the modality's logits)."""
    import copy

    import torch.nn.functional as F

    trainer = Trainer(make_config(dataset, tmp_path / fusion, "method=joint", f"model.fusion={fusion}", "epochs=1"))
    trainer.model.train()
    batch = next(iter(trainer.loaders["train"].batches()))
    reference = copy.deepcopy(trainer.model)
    inputs, labels = trainer._inputs(batch)
    fused, unimodal, *_ = reference.head(reference.encode(inputs))
    loss = F.cross_entropy(fused, labels) + sum(F.cross_entropy(z, labels) for z in unimodal)
    loss.backward()
    grads = {}
    original_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                                            if p.grad is not None}), original_step(*a, **k))[1]
    trainer.train_step(batch)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected) and any(n.startswith("fusion.") for n in grads)
    for name, g in expected.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["mmcosine", "mbsd", "cml", "agm", "mmpareto", "pmr", "mslr", "mla", "reconboost",
                                    "gblending", "greedy", "umt", "resample", "lfm learned"])
def test_the_peers_methods_train_under_bf16_autocast(dataset, tmp_path, method):
    """Their extra logits (weight split, subsets, prototypes, reruns) mix bf16 features with fp32
    weights (Greedy: the MMTM gates; UMT: fp32 teachers; re-sampling: an epoch with copies; LFM's
    learned schedule: its held-out forward in float32 beside bf16 steps)."""
    hp = {"mslr": ["hparams.lr_scales={audio: 0.5}"], "umt": ["hparams.teacher_epochs=1"],
          "resample": ["hparams.warmup_epochs=1", "epochs=2"],
          "lfm learned": ["hparams.schedule=learned", "hparams.held_out_clips=4", "hparams.held_out_batch=2",
                          "epochs=2"]}.get(method, [])
    summary = Trainer(make_config(dataset, tmp_path / method.replace(" ", "_"), f"method={method.split()[0]}",
                                  "precision=bf16", "epochs=1", *hp)).fit()
    assert summary["precision"] == "bf16" and math.isfinite(summary["test/loss"])


def test_scratch_runs_leave_the_run_untouched_and_a_unimodal_one_reads_only_its_modality(dataset, tmp_path):
    """mmfast/scratch.py: a copy trains apart (the run's weights, optimizer state and random
    state unchanged); a uni-modal copy never runs the other encoders (their inputs do not
    change its curves); the fused copy's do."""
    from mmfast.methods import ScratchRun
    from mmfast.scratch import run_scratch

    trainer = Trainer(make_config(dataset, tmp_path / "scratch", "method=gblending", "hparams.super_epoch=2"))
    before, rng = parameters(trainer), torch.get_rng_state()
    audio = run_scratch(trainer, ScratchRun("audio", 2))
    fused = run_scratch(trainer, ScratchRun(None, 2))
    assert all(torch.equal(v, parameters(trainer)[k]) for k, v in before.items())
    assert torch.equal(rng, torch.get_rng_state()) and not trainer.optimizer.state
    assert all(len(c[k]) == 2 for c in (audio, fused) for k in ("train", "val", "train_batch_sum", "val_batch_sum"))
    assert audio["train"][1] < audio["train"][0]  # (it trains)
    original = trainer.steps.inputs

    def scrambled(batch):  # the visual frames replaced by noise
        inputs, labels = original(batch)
        return {**inputs, "visual": torch.randn_like(inputs["visual"])}, labels

    trainer.steps.inputs = scrambled
    assert run_scratch(trainer, ScratchRun("audio", 2)) == audio
    assert run_scratch(trainer, ScratchRun(None, 2)) != fused
