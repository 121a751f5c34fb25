"""training.py and runtime.py on the CPU with stand-ins: a tiny conv net with BatchNorm and
dropout (so buffers and the dropout RNG matter for exact resume), BCE + soft Dice offering
`.parts()`, a map-style slice set whose item i of epoch e depends only on (seed, e, i), and
two small validation studies (one tumour-free)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import checkpoint
import runtime
import training

REPO = Path(__file__).resolve().parents[1]
S = 16  # image size of the stand-ins


class TinyNet(nn.Module):
    def __init__(self, in_channels: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.Dropout2d(0.3), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PartsLoss(nn.Module):
    """BCE + soft Dice with `.parts()`; `hook(call_index, parts)` may alter or signal."""

    def __init__(self, hook=None) -> None:
        super().__init__()
        self.hook, self.calls, self.totals = hook, 0, []

    def parts(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        bce = nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
        p = torch.sigmoid(logits.float())
        dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
        parts = {"bce": bce, "dice": dice, "total": bce + dice}
        self.calls += 1
        if self.hook is not None:
            parts = self.hook(self.calls, parts)
        self.totals.append(parts["total"].item())
        return parts

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.parts(logits, target)["total"]


class SliceSet(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image = rng.normal(size=(2, S, S)).astype(np.float32)
        mask = (image[1:] > 1.0).astype(np.float32)  # (1, S, S): "tumour" = bright PET
        return torch.from_numpy(image), torch.from_numpy(mask)


class FakeStudy:
    """The part of data.CachedStudy that validation reads; `on_mask` is called on mask()."""

    def __init__(self, case_id: str, tumour: bool, seed: int, on_mask=None) -> None:
        rng = np.random.default_rng(seed)
        self.case_id, self.spacing, self.on_mask = case_id, (4.0, 4.0, 4.0), on_mask
        self._image = rng.uniform(-1, 1, size=(5, 2, S, S)).astype(np.float16)  # (Z, 2, X, Y)
        self._mask = ((self._image[:, 1] > 0.6) & tumour).astype(np.uint8)  # (Z, X, Y)
        self.shape, self.has_tumor = (S, S, 5), tumour

    def image(self) -> np.ndarray:
        return self._image

    def mask(self) -> np.ndarray:
        if self.on_mask is not None:
            self.on_mask()
        return self._mask


def run(run_dir, *, loss_fn=None, resume=False, model_seed=0, studies=None, **overrides) -> dict:
    torch.manual_seed(model_seed)
    settings = dict(epochs=2, steps_per_epoch=3, batch_size=4, optimizer="adamw", lr=1e-2,
                    weight_decay=1e-4, schedule="cosine", warmup_steps=2, img_size=S,
                    eval_batch_size=4, seed=0)
    settings.update(overrides)
    device = settings.pop("device", "cpu")
    studies = studies if studies is not None else [FakeStudy("a", True, 1), FakeStudy("b", False, 2)]
    return training.train(model=TinyNet(), loss_fn=loss_fn or PartsLoss(),
                          train_set=SliceSet(settings["steps_per_epoch"] * settings["batch_size"]),
                          val_studies=studies, run_dir=run_dir, resume=resume, device=device,
                          settings=training.TrainSettings(**settings),
                          run_config={"ct_window": (-1000.0, 1000.0)})


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where="") -> None:
    """Exact equality of nested checkpoint contents (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


def send_sigterm_at(call: int):
    def hook(i, parts):
        if i == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return parts
    return hook


# ---- schedule ------------------------------------------------------------------------------


def test_lr_factor_values():
    poly = [training.lr_factor(i, total_steps=10, schedule="poly") for i in range(11)]
    assert poly[0] == 1.0 and poly[10] == 0.0
    assert poly[3] == pytest.approx((1 - 3 / 10) ** 0.9)  # official TransUNet: (1 - i/max_i)^0.9
    warm = [training.lr_factor(i, total_steps=10, schedule="cosine", warmup_steps=4) for i in range(11)]
    assert warm[:4] == [0.25, 0.5, 0.75, 1.0]
    assert warm[4] == 1.0 and warm[7] == pytest.approx(0.5) and warm[10] == pytest.approx(0.0)
    assert training.lr_factor(9, total_steps=10, schedule="constant") == 1.0
    with pytest.raises(training.TrainingError, match="schedule"):
        training.lr_factor(0, total_steps=10, schedule="step")


def test_scheduler_lr_follows_poly_per_iteration(tmp_path):
    run(tmp_path / "r", epochs=1, optimizer="sgd", schedule="poly", warmup_steps=0, lr=0.01,
        studies=[])
    ckpt = load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ckpt["scheduler"]["last_epoch"] == 3
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * (1 - 3 / 3) ** 0.9)
    assert ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9


# ---- determinism and exact resume ----------------------------------------------------------


def test_same_seed_same_first_losses(tmp_path):
    first, second, other = PartsLoss(), PartsLoss(), PartsLoss()
    run(tmp_path / "a", loss_fn=first, epochs=1, studies=[])
    run(tmp_path / "b", loss_fn=second, epochs=1, studies=[])
    run(tmp_path / "c", loss_fn=other, epochs=1, studies=[], seed=1)
    assert first.totals == second.totals and len(first.totals) == 3
    assert first.totals != other.totals  # the seed matters (dropout and data)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[dict, Path]:
    """The run never stopped (2 epochs x 3 steps, validation after each epoch)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run(run_dir), run_dir


@pytest.mark.parametrize("stop_at", [2, 3, 5, "validation"])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, reference_run, stop_at):
    reference, reference_dir = reference_run
    if stop_at == "validation":  # SIGTERM while the first validation is running
        fired = []
        hook = lambda: fired or (fired.append(1), os.kill(os.getpid(), signal.SIGTERM))  # noqa: E731
        studies = [FakeStudy("a", True, 1, on_mask=hook), FakeStudy("b", False, 2)]
        stopped = run(tmp_path / "run", studies=studies)
    else:
        stopped = run(tmp_path / "run", loss_fn=PartsLoss(send_sigterm_at(stop_at)))
    assert stopped["interrupted"] and stopped["signal"] == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.pt")
    expected = {2: (0, 2), 3: (0, 3), 5: (1, 2), "validation": (0, 3)}[stop_at]
    assert (ckpt["epoch"], ckpt["step_in_epoch"]) == expected
    # a fresh process would build the model from another init: the checkpoint must win
    resumed = run(tmp_path / "run", resume=True, model_seed=123)
    assert not resumed["interrupted"] and resumed["steps"] == reference["steps"] == 6
    a = load(reference_dir / "checkpoints" / "last.pt")
    b = load(tmp_path / "run" / "checkpoints" / "last.pt")
    for key in ("model", "optimizer", "scheduler", "rng_states", "step", "best_key"):
        assert_same(a[key], b[key], key)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_resume_refusals(tmp_path):
    run(tmp_path / "r", epochs=1, studies=[])
    with pytest.raises(training.TrainingError, match="--resume"):
        run(tmp_path / "r", epochs=1, studies=[])  # would overwrite a run
    with pytest.raises(training.TrainingError, match="batch_size"):
        run(tmp_path / "r", epochs=1, studies=[], resume=True, batch_size=2)
    with pytest.raises(training.TrainingError, match="nothing to resume"):
        run(tmp_path / "none", resume=True)


# ---- non-finite guard ------------------------------------------------------------------------


def nan_at(calls):
    def hook(i, parts):
        if i in calls:
            parts = {k: v * float("nan") for k, v in parts.items()}
        return parts
    return hook


def test_nonfinite_loss_is_skipped_and_reported(tmp_path):
    result = run(tmp_path / "r", loss_fn=PartsLoss(nan_at({2})), epochs=1)
    assert result["nonfinite_skipped"] == 1 and result["steps"] == 3
    ckpt = load(tmp_path / "r" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
    assert record["nonfinite_skipped"] == 1 and math.isfinite(record["train_loss"])
    assert "non-finite loss" in (tmp_path / "r" / "train.log").read_text()


class _NanGradient(torch.autograd.Function):
    """A finite value (0) whose gradient is NaN: what an overflow inside a loss looks like."""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.sum() * 0.0

    @staticmethod
    def backward(ctx, grad):
        return torch.full(ctx.shape, float("nan"))


def nan_gradient_at(calls):
    def hook(i, parts):
        if i in calls:
            parts = dict(parts, total=parts["total"] + _NanGradient.apply(parts["total"].reshape(1)))
        return parts
    return hook


def test_nonfinite_gradient_is_skipped_and_weights_stay_finite(tmp_path):
    for clip in (1.0, 0.0):  # with and without gradient clipping
        result = run(tmp_path / f"r{clip}", loss_fn=PartsLoss(nan_gradient_at({2})), epochs=1,
                     grad_clip=clip)
        assert result["nonfinite_skipped"] == 1 and result["steps"] == 3
        ckpt = load(tmp_path / f"r{clip}" / "checkpoints" / "last.pt")
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
        assert "non-finite gradient" in (tmp_path / f"r{clip}" / "train.log").read_text()


def test_repeated_nonfinite_losses_stop_the_run(tmp_path):
    with pytest.raises(training.TrainingError, match="not finite for 3 steps in a row") as err:
        run(tmp_path / "r", loss_fn=PartsLoss(nan_at({2, 3, 4, 5})), max_nonfinite=2)
    assert runtime.is_user_error(err.value)


# ---- checkpoint files and run-directory outputs -----------------------------------------------


def test_checkpoints_and_outputs(tmp_path):
    run_dir = tmp_path / "r"
    result = run(run_dir)
    assert result["epochs_run"] == 2 and not result["interrupted"] and result["best_epoch"] >= 1
    for name in ("last.pt", "best.pt"):
        ckpt = load(run_dir / "checkpoints" / name)  # weights_only=True
        assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng_states",
                "config", "history", "best_score"} <= ckpt.keys()
        assert ckpt["config"]["ct_window"] == (-1000.0, 1000.0)
        TinyNet().load_state_dict(ckpt["model"])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 6
    assert {"train_loss", "train_bce", "train_dice", "val_pseudo_dice", "val_mean_dice",
            "val_fpv_ml", "lr", "seconds", "nonfinite_skipped"} <= records[0].keys()
    assert 0.0 <= records[0]["val_pseudo_dice"] <= 1.0
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert "epoch 2/2 step 6" in (run_dir / "train.log").read_text()


def test_epoch_checkpoints_hold_the_weights_after_every_validation(tmp_path):
    run_dir = tmp_path / "r"
    run(run_dir, epochs=3, val_every=2, keep_epoch_checkpoints=True)  # validates epochs 2 and 3
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch_2.pt", "epoch_3.pt", "last.pt"]
    epoch_3 = load(run_dir / "checkpoints" / "epoch_3.pt")
    assert set(epoch_3) == {"model", "epoch", "step"}
    assert (epoch_3["epoch"], epoch_3["step"]) == (3, 9)
    assert_same(epoch_3["model"], load(run_dir / "checkpoints" / "last.pt")["model"])
    assert load(run_dir / "checkpoints" / "epoch_2.pt")["step"] == 6
    checkpoint.load_weights(TinyNet(), run_dir / "checkpoints" / "epoch_2.pt")  # as test.py does


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint({"step": 2}, path)
    assert load(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_validation_counts_match_hand_computed_dice():
    class Half(nn.Module):  # predicts tumour wherever PET > 0.2: a known, imperfect model
        def forward(self, x):
            return (x[:, 1:2] - 0.2) * 50

    study, empty = FakeStudy("a", True, 1), FakeStudy("b", False, 2)
    loop = training.Loop(Half(), Half(), None, None, None, None, torch.device("cpu"), None, False,
                         0.0, 0, training.StopSignal(),
                         validation=dict(img_size=S, batch_size=2, amp_dtype=None, context_slices=0))
    rows = [training.validate_study(loop, s, threshold=0.5) for s in (study, empty)]
    pred = np.moveaxis(study.image()[:, 1].astype(np.float32) > 0.2, 0, -1)
    ref = np.moveaxis(study.mask() > 0, 0, -1)
    tp, fp, fn = (pred & ref).sum(), (pred & ~ref).sum(), (~pred & ref).sum()
    assert (rows[0]["tp"], rows[0]["fp"], rows[0]["fn"]) == (tp, fp, fn)
    summary = training.summarise_validation(rows)
    fp_empty = (empty.image()[:, 1].astype(np.float32) > 0.2).sum()
    assert summary["val_pseudo_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fp_empty + fn))
    assert summary["val_mean_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert summary["val_fpv_ml"] == pytest.approx(fp_empty * 64 / 1000)  # 4 mm voxels = 0.064 ml


def test_tuned_pseudo_dice_is_blind_to_calibration():
    class Shy(nn.Module):  # the Half mask, but with probability 0.28 inside it: nothing at 0.5
        def forward(self, x):
            inside = x[:, 1:2] > 0.2
            return torch.where(inside, torch.logit(torch.tensor(0.28)), torch.logit(torch.tensor(0.02)))

    study, empty = FakeStudy("a", True, 1), FakeStudy("b", False, 2)
    loop = training.Loop(Shy(), Shy(), None, None, None, None, torch.device("cpu"), None, False,
                         0.0, 0, training.StopSignal(),
                         validation=dict(img_size=S, batch_size=2, amp_dtype=None, context_slices=0))
    summary = training.summarise_validation([training.validate_study(loop, s, threshold=0.5)
                                             for s in (study, empty)])
    pred = np.moveaxis(study.image()[:, 1].astype(np.float32) > 0.2, 0, -1)
    ref = np.moveaxis(study.mask() > 0, 0, -1)
    tp, fp, fn = (pred & ref).sum(), (pred & ~ref).sum(), (~pred & ref).sum()
    fp_empty = (empty.image()[:, 1].astype(np.float32) > 0.2).sum()
    assert summary["val_pseudo_dice"] == 0.0  # nothing above 0.5
    assert summary["val_tuned_pseudo_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fp_empty + fn))
    assert summary["val_tuned_threshold"] == 0.25  # 0.05 .. 0.25 give the same mask: the highest


def test_select_by_chooses_the_epoch_by_its_criterion():
    records = [dict(epoch=1, val_pseudo_dice=0.40, val_tuned_pseudo_dice=0.45, val_fpv_ml=1.0),
               dict(epoch=2, val_pseudo_dice=0.20, val_tuned_pseudo_dice=0.60, val_fpv_ml=9.0)]
    best = {}
    for select_by in ("pseudo_dice", "tuned_pseudo_dice"):
        state = training.LoopState()
        for record in records:
            training._update_best(state, record, has_val=True, validated=True, patience=0,
                                  select_by=select_by)
        best[select_by] = (state.best_epoch, state.best_key[0])
    assert best == {"pseudo_dice": (1, 0.40), "tuned_pseudo_dice": (2, 0.60)}


# ---- runtime helpers -------------------------------------------------------------------------


def test_runtime_device_seed_and_facts():
    assert runtime.resolve_device("cpu") == torch.device("cpu")
    assert runtime.resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        from config import ConfigError
        with pytest.raises(ConfigError, match="--device=cpu"):
            runtime.resolve_device("cuda:1")
    runtime.seed_everything(3)
    a = (torch.rand(2), np.random.rand(), __import__("random").random())
    runtime.seed_everything(3)
    assert torch.equal(a[0], torch.rand(2)) and a[1:] == (np.random.rand(), __import__("random").random())
    facts = runtime.environment_facts()
    assert facts["torch"] == torch.__version__ and facts["cpu_count"] >= 1 and "git_commit" in facts


def test_resolve_amp_on_a_cpu(monkeypatch):
    """auto: bf16 exactly when the CPU has bf16 in hardware; bf16 forced anywhere; fp16 and True
    need CUDA; False is float32."""
    from config import ConfigError
    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda native=native: native)
        assert runtime.resolve_amp("auto", cpu) is expected
        assert runtime.resolve_amp("bf16", cpu) is torch.bfloat16
        assert runtime.resolve_amp("False", cpu) is None and runtime.resolve_amp(False, cpu) is None
        with pytest.raises(ConfigError, match="--amp=fp16 needs a CUDA device"):
            runtime.resolve_amp("fp16", cpu)
        with pytest.raises(ConfigError, match="--amp=True needs a CUDA device"):
            runtime.resolve_amp("True", cpu)
    with pytest.raises(ConfigError, match="choose auto"):
        runtime.resolve_amp("half", cpu)
    assert isinstance(runtime.cpu_has_native_bf16(), bool)
    assert runtime.environment_facts()["cpu_native_bf16"] == runtime.cpu_has_native_bf16()


class AutocastProbe(TinyNet):
    """TinyNet that records the autocast dtype (or None) of every forward, by mode."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set] = {"train": set(), "eval": set()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on = torch.is_autocast_enabled("cpu")
        self.seen["train" if self.training else "eval"].add(
            torch.get_autocast_dtype("cpu") if on else None)
        return super().forward(x)


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("False", None)])
def test_training_and_validation_run_in_the_resolved_dtype(tmp_path, amp, dtype):
    """--amp=bf16 on a CPU: every training step and every validation forward under bf16
    autocast (the loss still in float32); --amp=False: none."""
    model, seen_loss = AutocastProbe(), []

    class DtypeLoss(PartsLoss):
        def parts(self, logits, target):
            seen_loss.append(logits.dtype)
            return super().parts(logits, target)

    torch.manual_seed(0)
    training.train(model=model, loss_fn=DtypeLoss(), train_set=SliceSet(12),
                   val_studies=[FakeStudy("a", True, 1)], run_dir=tmp_path / "r", device="cpu",
                   settings=training.TrainSettings(epochs=1, steps_per_epoch=3, batch_size=4,
                                                   img_size=S, eval_batch_size=4, amp=amp,
                                                   lr=1e-2, weight_decay=1e-4),
                   run_config={"ct_window": (-1000.0, 1000.0)})
    assert model.seen == {"train": {dtype}, "eval": {dtype}}
    assert seen_loss and set(seen_loss) == {torch.float32}


def test_exit_on_user_error_prints_message_and_exits_2(capsys):
    with pytest.raises(SystemExit) as stop:
        with runtime.exit_on_user_error():
            raise training.TrainingError("bad setting; do X")
    assert stop.value.code == 2 and capsys.readouterr().err == "error: bad setting; do X\n"
    with pytest.raises(SystemExit) as stop:
        with runtime.exit_on_user_error():
            raise KeyboardInterrupt
    assert stop.value.code == 130
    with pytest.raises(KeyError):  # a bug keeps its traceback
        with runtime.exit_on_user_error():
            raise KeyError("bug")


# ---- DDP ---------------------------------------------------------------------------------------


DDP_SCRIPT = """
import os, sys, json, signal
sys.path[:0] = [{repo!r}, {tests!r}]
import torch, runtime, training
from test_training import TinyNet, PartsLoss, SliceSet, FakeStudy
rank, world, device = runtime.distributed_setup("cpu")

def hook(stop_at, nan):  # NaN on rank 1 only at step 2; SIGTERM to rank 0 only at stop_at
    def h(i, parts):
        if rank == 1 and i == 2 and nan:
            parts = {{k: v * float("nan") for k, v in parts.items()}}
        if rank == 0 and i == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return parts
    return h

def run(name, stop_at=0, resume=False):
    torch.manual_seed(rank + 10 * resume)  # different inits: DDP / the checkpoint must win
    model = TinyNet()
    result = training.train(model=model, loss_fn=PartsLoss(hook(stop_at, not resume)), train_set=SliceSet(12),
        val_studies=[FakeStudy("a", True, 1), FakeStudy("b", False, 2)], run_dir={tmp!r} + name,
        device=device, settings=training.TrainSettings(epochs=2, steps_per_epoch=3, batch_size=4,
        lr=1e-2, weight_decay=1e-4, img_size=16, eval_batch_size=4), resume=resume)
    return result, [p.detach().flatten().tolist() for p in model.parameters()]

reference, weights = run("/ref")
stopped, _ = run("/run", stop_at=4)
resumed, resumed_weights = run("/run", resume=True)
print(json.dumps({{"rank": rank, "reference": reference, "stopped": stopped, "resumed": resumed,
                  "weights": weights, "resumed_weights": resumed_weights}}))
runtime.distributed_cleanup()
"""


@pytest.mark.slow
def test_two_process_gloo_ddp_skip_stop_and_resume(tmp_path):
    """torchrun, 2 CPU processes (gloo): a NaN loss on one rank is skipped on both, a SIGTERM to
    rank 0 alone stops both at the same step, and the resumed run equals the one never stopped."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"), tmp=str(tmp_path)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted((json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        assert r["reference"]["steps"] == 6 and r["reference"]["nonfinite_skipped"] == 1
        assert r["stopped"]["interrupted"] and r["stopped"]["steps"] == 4
        assert r["resumed"]["steps"] == 6 and not r["resumed"]["interrupted"]
        assert r["resumed"]["nonfinite_skipped"] == 1  # counted before the stop, restored
    assert reports[0]["stopped"]["signal"] == signal.SIGTERM and reports[1]["stopped"]["signal"] == 0
    assert reports[0]["weights"] == reports[1]["weights"]  # one model, kept in sync by DDP
    a, b = load(tmp_path / "ref" / "checkpoints" / "last.pt"), load(tmp_path / "run" / "checkpoints" / "last.pt")
    for key in ("model", "optimizer", "scheduler", "rng_states", "step"):
        assert_same(a[key], b[key], key)
    assert a["world_size"] == 2 and len(a["rng_states"]) == 2
    saved = [p.flatten().tolist() for k, p in a["model"].items()
             if "running" not in k and "num_batches" not in k]
    assert saved == reports[0]["weights"] == reports[0]["resumed_weights"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ref", "run"]


class ThresholdStudy:
    """A validation study whose tumour is exactly 'PET channel > 0.5': learnable by a conv."""

    def __init__(self, case_id: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.case_id, self.spacing, self.shape = case_id, (4.0, 4.0, 4.0), (S, S, 6)
        self._image = rng.uniform(-1, 1, size=(6, 2, S, S)).astype(np.float16)  # (Z, 2, X, Y)
        self._mask = (self._image[:, 1] > 0.5).astype(np.uint8)
        self.has_tumor = True

    def image(self) -> np.ndarray:
        return self._image

    def mask(self) -> np.ndarray:
        return self._mask


class ThresholdSet(SliceSet):
    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        image = rng.uniform(-1, 1, size=(2, S, S)).astype(np.float16).astype(np.float32)
        return torch.from_numpy(image), torch.from_numpy((image[1:] > 0.5).astype(np.float32))


def test_training_learns(tmp_path):
    """A handful of steps on a learnable rule reach a high validation Dice, from a low one: the
    test fails when the optimizer step, the loss or the schedule does not update the weights."""
    studies = [ThresholdStudy("a", 1), ThresholdStudy("b", 2)]
    settings = training.TrainSettings(epochs=4, steps_per_epoch=50, batch_size=8, lr=3e-2,
                                      weight_decay=0.0, warmup_steps=2, img_size=S,
                                      eval_batch_size=8, grad_clip=0.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1))
    untrained = training.summarise_validation(
        [training.validate_study(training.Loop(model, model, None, None, None, None,
                                               torch.device("cpu"), None, False, 0.0, 0,
                                               training.StopSignal(),
                                               validation=dict(img_size=S, batch_size=8,
                                                               amp_dtype=None, context_slices=0)),
                                 s, threshold=0.5) for s in studies])["val_pseudo_dice"]
    result = training.train(model=model, loss_fn=PartsLoss(), train_set=ThresholdSet(400),
                            val_studies=studies, run_dir=tmp_path / "r", device="cpu",
                            settings=settings)
    assert untrained < 0.5
    assert result["best_score"] > 0.9, (untrained, result)


def test_ema_update_by_hand():
    model, ema = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(2.0), ema.weight.fill_(0.0), ema.bias.fill_(0.0)
    training.update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.1)) and torch.allclose(ema.bias, torch.tensor([0.2]))
    # warm-up: the first steps follow the model more closely than the final decay says
    assert training.ema_decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert training.ema_decay_at(10_000, 0.999) == 0.999


def test_ema_is_validated_saved_and_resumed_exactly(tmp_path):
    reference = run(tmp_path / "ref", ema_decay=0.9)
    a = load(tmp_path / "ref" / "checkpoints" / "last.pt")
    assert "ema_model" in a
    assert not all(torch.equal(a["ema_model"][k], a["model"][k]) for k in a["model"]
                   if a["model"][k].dtype.is_floating_point)
    stopped = run(tmp_path / "run", loss_fn=PartsLoss(send_sigterm_at(4)), ema_decay=0.9)
    assert stopped["interrupted"]
    resumed = run(tmp_path / "run", resume=True, model_seed=123, ema_decay=0.9)
    b = load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert resumed["steps"] == reference["steps"]
    for key in ("model", "ema_model", "optimizer"):
        assert_same(a[key], b[key], key)
    # evaluation loads the averaged weights
    import checkpoint
    net = TinyNet()
    checkpoint.load_weights(net, tmp_path / "ref" / "checkpoints" / "last.pt")
    assert all(torch.equal(v, a["ema_model"][k]) for k, v in net.state_dict().items())


def test_sync_bn_rule():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert training.use_sync_bn("auto", cuda, 3)  # the paper preset on 8 GPUs: 24 / 8 = 3
    assert not training.use_sync_bn("auto", cuda, 32)
    assert not training.use_sync_bn("auto", cpu, 3)  # SyncBatchNorm is GPU-only in torch
    assert training.use_sync_bn("True", cuda, 64) and not training.use_sync_bn("False", cuda, 3)
    with pytest.raises(training.TrainingError, match="needs CUDA"):
        training.use_sync_bn("True", cpu, 3)
