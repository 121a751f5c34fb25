"""bench/precise_bn.py: BatchNorm statistics re-estimated from the run's own training batches
(checked against the batch means a hook records), written to a new checkpoint file and scored by
test.py's own evaluation, the run's own files untouched."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_bench, train_tiny_run


@pytest.fixture(scope="module")
def pbn():
    return load_bench("precise_bn")


def test_statistics_are_the_mean_over_the_training_batches(tmp_path, pbn):
    import test as evaluation

    run_dir = train_tiny_run(tmp_path, "pbn")
    cfg = evaluation.run_config(run_dir)
    model = evaluation.load_run_model(run_dir, cfg, "best", torch.device("cpu"))
    bns = pbn.bn_modules(model)
    assert bns, "the TransUNet decoder normalises with BatchNorm"
    bn = bns[-1]
    stale = bn.running_mean.clone()
    seen = []  # per batch: the per-channel mean of the layer's input
    hook = bn.register_forward_hook(lambda m, inputs, out: seen.append(
        inputs[0].detach().float().mean(dim=(0, 2, 3))))
    studies = evaluation.run_studies(run_dir, cfg, "train")
    pbn.reestimate(model, cfg, studies, 2, None)
    hook.remove()
    assert len(seen) == 2  # two batches forwarded, no more
    # update_bn: momentum None, a cumulative average of the batch means (equal batch sizes)
    assert torch.allclose(bn.running_mean, torch.stack(seen).mean(0), atol=1e-5)
    assert not torch.allclose(bn.running_mean, stale)
    assert not model.training  # left in eval mode
    # the same batches again (same seed, epoch index = cfg.epochs): the same statistics
    again = evaluation.load_run_model(run_dir, cfg, "best", torch.device("cpu"))
    pbn.reestimate(again, cfg, studies, 2, None)
    assert torch.equal(pbn.bn_modules(again)[-1].running_mean, bn.running_mean)


def test_the_bench_adds_a_checkpoint_and_an_evaluation_only(tmp_path, pbn, capsys):
    run_dir = train_tiny_run(tmp_path, "pbn2", "--tune_postprocess=True")
    own = (run_dir / "eval" / "summary.json").read_text()
    best = (run_dir / "checkpoints" / "best.pt").read_bytes()
    capsys.readouterr()  # the training run's own console
    pbn.main([f"--run_dir={run_dir}", "--batches=2"])
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint"] == "bn2-best" and result["status"] == "new"
    summary = json.loads((run_dir / "eval-bn2-best" / "summary.json").read_text())
    assert summary["settings"]["checkpoint"] == "bn2-best"
    assert result["dice"] == pytest.approx(summary["postprocessed"]["metrics"]["dice"]["mean"],
                                           nan_ok=True)
    assert (run_dir / "eval" / "summary.json").read_text() == own
    assert (run_dir / "checkpoints" / "best.pt").read_bytes() == best
    saved = torch.load(run_dir / "checkpoints" / "bn2-best.pt", weights_only=True)
    assert saved["bn_reestimated"]["from"] == "best" and saved["bn_reestimated"]["batches"] == 2
    # the weights other than BatchNorm statistics are the best checkpoint's
    original = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    for key, value in saved["model"].items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, original[key]), key
    # again: the same file is reused and the evaluation reproduced, nothing overwritten
    pbn.main([f"--run_dir={run_dir}", "--batches=2"])
    assert json.loads(capsys.readouterr().out)["status"] == "reproduced"
    # a file of that name with other statistics is refused, not overwritten
    saved["model"][next(k for k in saved["model"] if k.endswith("running_mean"))] += 1.0
    torch.save(saved, run_dir / "checkpoints" / "bn2-best.pt")
    with pytest.raises(SystemExit, match="exists with other weights"):
        pbn.main([f"--run_dir={run_dir}", "--batches=2"])
