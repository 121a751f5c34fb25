"""Averaged checkpoints (config average_from, test.py --checkpoint=average): which epoch
checkpoints are averaged, the mean itself against hand-computed values, the configuration rules,
and a tiny run evaluated with them as main.py and test.py do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_tiny_run
from torch import nn

import checkpoint
import config
import sweep
import test as evaluation

ROOT = Path(__file__).resolve().parents[1]


def small_net(fill: float, batches: int) -> dict:
    """A conv + BatchNorm state dict whose floating tensors all hold `fill`."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    state = net.state_dict()
    for name, value in state.items():
        if value.is_floating_point():
            value.fill_(fill)
    state["1.num_batches_tracked"].fill_(batches)
    return state


def write_epochs(folder: Path, fills: dict[int, float], step_per_epoch: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for epoch, fill in fills.items():
        checkpoint.save_checkpoint({"model": small_net(fill, epoch), "epoch": epoch,
                                    "step": epoch * step_per_epoch}, folder / f"epoch_{epoch}.pt")


def test_the_epochs_after_the_fraction_are_averaged(tmp_path):
    write_epochs(tmp_path, {2: 0.0, 4: 0.0, 6: 0.0, 8: 0.0})
    names = [p.name for p in checkpoint.averaged_epochs(tmp_path, 0.5, 8, 10)]
    assert names == ["epoch_6.pt", "epoch_8.pt"]  # step 40 is the half: epoch 4 is not after it
    assert [p.name for p in checkpoint.averaged_epochs(tmp_path, 0.25, 8, 10)] == \
        ["epoch_4.pt", "epoch_6.pt", "epoch_8.pt"]
    assert [p.name for p in checkpoint.averaged_epochs(tmp_path, 0.9, 8, 10)] == ["epoch_8.pt"]
    # an unfinished run (no checkpoint of its last epoch) or none kept at all: said so
    with pytest.raises(checkpoint.CheckpointError, match="resume the run to its end"):
        checkpoint.averaged_epochs(tmp_path, 0.5, 10, 10)
    with pytest.raises(checkpoint.CheckpointError, match="keep_epoch_checkpoints=True"):
        checkpoint.averaged_epochs(tmp_path / "none", 0.5, 8, 10)


def test_the_average_is_the_mean_of_the_weights(tmp_path):
    write_epochs(tmp_path, {2: 1.0, 4: 2.0, 6: 6.0})
    paths = checkpoint.averaged_epochs(tmp_path, 0.0, 6, 10)
    mean = checkpoint.average_weights(paths)["model"]
    for name, value in mean.items():
        if value.is_floating_point():
            assert torch.equal(value, torch.full_like(value, 3.0)), name  # (1 + 2 + 6) / 3
    assert int(mean["1.num_batches_tracked"]) == 6  # an integer buffer: the last file's
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    checkpoint.load_weights(net, paths)  # as test.py loads an averaged checkpoint
    assert torch.equal(net[0].weight, torch.full_like(net[0].weight, 3.0))
    assert torch.equal(net[1].running_var, torch.full((3,), 3.0))
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint to average"):
        checkpoint.average_weights([])


@pytest.mark.parametrize("overrides, message", [
    ({"average_from": 0.75}, "--keep_epoch_checkpoints=True"),
    ({"average_from": 0.75, "keep_epoch_checkpoints": True, "early_stop_patience": 3},
     "early_stop_patience"),
    ({"average_from": 0.75, "keep_epoch_checkpoints": True, "n_val": 0}, "--n_val >= 1"),
    ({"average_from": 1.0, "keep_epoch_checkpoints": True}, "out of range"),
])
def test_average_from_is_refused_where_it_cannot_work(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.make_config({"preset": "tiny", **overrides})


def test_average_from_at_its_default_leaves_recorded_fingerprints_alone():
    cfg = config.make_config({"preset": "tiny"}).to_dict()
    before = {k: v for k, v in cfg.items() if k != "average_from"}  # a run recorded before it
    assert sweep.settings_fingerprint(before) == sweep.settings_fingerprint(cfg)
    averaged = {**cfg, "keep_epoch_checkpoints": True, "average_from": 0.75}
    assert sweep.settings_fingerprint(averaged)["average_from"] == 0.75


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory):
    """A tiny run of 3 epochs, every epoch validated and kept, evaluated by main.py with the
    mean of epochs 2 and 3 (average_from=0.4: steps 4-9 of 9)."""
    base = tmp_path_factory.mktemp("avg")
    return train_tiny_run(base, "avg", "--epochs=3", "--average_from=0.4"), base


def test_main_evaluates_the_mean_of_the_last_epochs(averaged_run):
    run_dir, _ = averaged_run
    settings = json.loads((run_dir / "eval" / "summary.json").read_text())["settings"]
    assert settings["checkpoint"] == "average0.4" and settings["averaged_epochs"] == [2, 3]
    cfg = config.load_config(run_dir)
    model = evaluation.load_run_model(run_dir, cfg, "average0.4", torch.device("cpu"))
    two, three = (torch.load(run_dir / "checkpoints" / f"epoch_{k}.pt", weights_only=True)["model"]
                  for k in (2, 3))
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            expected = ((two[name].double() + three[name].double()) / 2).to(value.dtype)
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(two[k], three[k]) for k in two if two[k].is_floating_point())


def test_test_py_evaluates_best_and_other_averages_beside_the_runs_own(averaged_run):
    run_dir, _ = averaged_run
    own = evaluation.evaluate(run_dir, progress=False)
    assert own["status"] == "reproduced" and Path(own["output_dir"]).name == "eval"
    best = evaluation.evaluate(run_dir, checkpoint="best", progress=False)
    assert Path(best["output_dir"]).name == "eval-best" and best["settings"]["checkpoint"] == "best"
    other = evaluation.evaluate(run_dir, checkpoint="average", average_from=0.7, progress=False)
    assert Path(other["output_dir"]).name == "eval-average0.7"
    assert other["settings"]["averaged_epochs"] == [3]  # step 9 is the only one after 6.3
    with pytest.raises(evaluation.EvaluationError, match="not of --checkpoint=last"):
        evaluation.evaluate(run_dir, checkpoint="last", average_from=0.5, progress=False)


def test_a_run_trained_without_averaging_is_averaged_when_asked(tmp_path):
    run_dir = train_tiny_run(tmp_path, "plain", "--epochs=3")
    assert json.loads((run_dir / "eval" / "summary.json").read_text())["settings"]["checkpoint"] \
        == "best"
    with pytest.raises(evaluation.EvaluationError, match="needs --average_from"):
        evaluation.evaluate(run_dir, checkpoint="average", progress=False)
    done = subprocess.run([sys.executable, "test.py", f"--run_dir={run_dir}", "--checkpoint=average",
                           "--average_from=0.4", "--tta=True"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "eval-average0.4-tta" / "summary.json").read_text())
    assert summary["settings"]["averaged_epochs"] == [2, 3] and summary["settings"]["tta"] is True
    refused = subprocess.run([sys.executable, "test.py", f"--run_dir={run_dir}",
                              "--checkpoint=average"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "needs --average_from" in refused.stderr
    assert "Traceback" not in refused.stderr
