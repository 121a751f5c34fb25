"""inference.predict_volume, NIfTI output, post-processing, overlays and the test.py CLI."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PetThreshold, write_toy_run

import checkpoint
import factory
import inference
import metrics
import pictures
import test as evaluation
from data.geometry import save_mask_nifti

ROOT = Path(__file__).resolve().parents[1]


class FakeStudy:
    """The part of data.CachedStudy that predict_volume reads: image() (Z, 2, X, Y), shape."""

    def __init__(self, image: np.ndarray):
        self._image = image.astype(np.float16)
        self.shape = (image.shape[2], image.shape[3], image.shape[0])

    def image(self):
        return self._image


def random_study(z=5, x=12, y=10, seed=0):
    rng = np.random.default_rng(seed)
    return FakeStudy(rng.uniform(-1, 1, (z, 2, x, y)))


def conv_model(in_channels, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(in_channels, 1, 3, padding=1)


def test_predict_volume_shape_and_range():
    study = random_study()
    prob = inference.predict_volume(conv_model(2), study, img_size=16, batch_size=2,
                                    device="cpu")
    assert prob.shape == (12, 10, 5) and prob.dtype == np.float32
    assert (prob > 0).all() and (prob < 1).all()


def test_context_channels_match_the_dataset_and_clamp_at_the_ends():
    # a 1x1 conv that reads PET of slice z+1 (channel 2*2+1 for context 1): output = sigmoid(it)
    study = random_study(z=4, x=8, y=8)
    model = torch.nn.Conv2d(6, 1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 5] = 1.0
    prob = inference.predict_volume(model, study, img_size=8, device="cpu", context_slices=1)
    image = study.image().astype(np.float32)
    for z in range(4):
        expected = 1 / (1 + np.exp(-image[min(z + 1, 3), 1]))  # (X, Y)
        np.testing.assert_allclose(prob[:, :, z], expected, rtol=1e-5)
    np.testing.assert_array_equal(inference.context_indices(3, 1), [[0, 0, 1], [0, 1, 2],
                                                                     [1, 2, 2]])


def test_flip_tta_is_the_mean_of_flipped_predictions():
    study = random_study(x=16, y=12)
    model = conv_model(2, seed=1)  # not flip-equivariant, so each term differs
    kw = dict(img_size=16, batch_size=3, device="cpu")
    tta = inference.predict_volume(model, study, tta=True, **kw)
    plain = inference.predict_volume(model, study, **kw)
    image = study.image()
    fx = inference.predict_volume(model, FakeStudy(image[:, :, ::-1].copy()), **kw)[::-1]
    fy = inference.predict_volume(model, FakeStudy(image[:, :, :, ::-1].copy()), **kw)[:, ::-1]
    np.testing.assert_allclose(tta, (plain + fx + fy) / 3, atol=1e-6)
    assert np.abs(tta - plain).max() > 1e-4


def test_flip_equivariant_model_gives_flipped_prediction():
    # a symmetric kernel commutes with flips; so must slicing, resizing and restacking
    model = torch.nn.Conv2d(2, 1, 3, padding=1)
    with torch.no_grad():
        k = torch.rand(1, 2, 3, 3)
        model.weight.copy_((k + k.flip(-1) + k.flip(-2) + k.flip(-1, -2)) / 4)
    study = random_study(x=20, y=14)
    kw = dict(img_size=32, device="cpu")
    prob = inference.predict_volume(model, study, **kw)
    flipped = inference.predict_volume(model, FakeStudy(study.image()[:, :, ::-1].copy()), **kw)
    np.testing.assert_allclose(flipped[::-1], prob, atol=1e-5)
    tta = inference.predict_volume(model, study, tta=True, **kw)
    np.testing.assert_allclose(tta, prob, atol=1e-5)


def test_model_mode_is_restored():
    model = conv_model(2).train()
    inference.predict_volume(model, random_study(), img_size=16, device="cpu")
    assert model.training


def test_nifti_round_trip_keeps_affine_and_shape(tmp_path):
    affine = np.array([[-2.04, 0, 0, 10.5], [0, 2.04, 0, -200.0], [0, 0, 3.0, -650.25],
                       [0, 0, 0, 1]])
    mask = np.zeros((7, 6, 5), bool)
    mask[2:4, 1:3, 1:4] = True
    path = tmp_path / "pred" / "case_1.nii.gz"
    save_mask_nifti(mask, affine, path)
    image = nib.load(path)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert image.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(image.dataobj), mask.astype(np.uint8))
    assert [p.name for p in path.parent.iterdir()] == ["case_1.nii.gz"]  # no temp file left


def test_postprocess_drops_small_components_and_low_suv():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels = 0.216 ml at 2 mm
    mask[7, 7, 7] = True  # 1 voxel = 0.008 ml
    suv = np.full(mask.shape, 3.0)
    suv[1, 1, 1] = 0.5
    out = metrics.postprocess_mask(mask, spacing=(2, 2, 2), suv=suv, suv_floor=1.0,
                                      min_component_ml=0.1)
    assert out.sum() == 26 and not out[7, 7, 7] and not out[1, 1, 1]
    assert metrics.postprocess_mask(mask, spacing=(2, 2, 2)).sum() == 28  # disabled


def test_overlay_png_written(tmp_path):
    rng = np.random.default_rng(0)
    suv = rng.uniform(0, 5, (16, 12, 10)).astype(np.float32)
    ref = np.zeros(suv.shape, bool)
    ref[4:7, 4:7, 3:6] = True
    pred = np.roll(ref, 1, axis=0)
    png = pictures.overlay_png(suv, ref, pred, (2.0, 2.0, 3.0), title="c")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert pictures.overlay_png(suv, ref * 0, pred * 0, (2.0, 2.0, 3.0))[:8] == png[:8]  # empty: no error


def test_csv_columns_and_nan(tmp_path):
    row = {"case_id": "a", **metrics.case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)),
                                                      (1, 1, 1))}
    evaluation.write_per_case_csv([row], tmp_path / "per_case.csv")
    header, line = (tmp_path / "per_case.csv").read_text().splitlines()
    assert header.split(",")[:13] == list(evaluation.CSV_COLUMNS)
    assert line.split(",")[2] == "nan"


@pytest.mark.slow  # two fresh interpreters importing torch + MedPy: ~30 s on 2 busy cores
def test_cli_user_errors_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "test.py", f"--run_dir={tmp_path / 'missing'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "test.py", f"--run_dir={tmp_path}",
                           f"--predict_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--output_dir" in proc.stderr


# ---- evaluate() / predict_dir() on a small phantom run -------------------------------------

@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    """A run directory as main.py writes it (config.json, split.json, cases.json, a
    checkpoint), built directly from the data package, with a one-layer conv model: studies
    0-1 of the phantom "trained" on (train / val), 2-4 the test studies."""
    import config
    from data.prepare import prepare_data
    from data.phantom import generate

    base = tmp_path_factory.mktemp("evalrun")
    generate(base / "phantom", 5, size="unit", seed=0, progress=False)
    cfg = config.make_config({"preset": "tiny", "cache_dir": str(base / "cache"),
                              "data_dir": str(base / "phantom"), "min_component_ml": 0.05,
                              "n_bootstrap": 20, "n_val": 1, "n_test": 1,
                              # float32: PetThreshold's 'SUV > 3' cut is exact only there (bf16
                              # autocast, amp=auto on a CPU with bf16 in hardware, rounds the
                              # logits of voxels next to the cut)
                              "amp": "False"})
    manifest = prepare_data(data_dir=cfg.data_dir, cache_dir=cfg.cache_dir, n_val=1, n_test=1)
    run_dir = base / "runs" / "tiny"
    model = PetThreshold()
    write_toy_run(run_dir, cfg, manifest, model, config=cfg.to_dict())
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()},
               run_dir / "checkpoints" / "last.pt")
    return run_dir, base




@pytest.fixture()
def toy_models(monkeypatch):
    import models
    monkeypatch.setattr(models, "build_model", lambda name, **kw: PetThreshold(kw["in_channels"]),
                        raising=False)


def test_evaluate_writes_the_run_contract(tiny_run_dir, toy_models):
    import csv
    import json

    run_dir, base = tiny_run_dir
    summary = evaluation.evaluate(run_dir, progress=False)
    rows = list(csv.DictReader(open(run_dir / "eval" / "per_case.csv")))
    assert list(rows[0])[:13] == list(evaluation.CSV_COLUMNS)
    test_ids = json.loads((run_dir / "split.json").read_text())["test"]
    assert [r["case_id"] for r in rows] == test_ids
    assert summary["n_studies"] == 3 and "postprocessed" in summary
    assert json.loads((run_dir / "eval" / "summary.json").read_text())["n_studies"] == 3
    recorded = {r["case_id"]: r for r in json.loads((run_dir / "cases.json").read_text())["studies"]}
    for case_id in test_ids:
        cached = __import__("data").cache.load_cached(recorded[case_id]["directory"])
        image = nib.load(run_dir / "eval" / "predictions" / f"{case_id}.nii.gz")
        assert image.shape == tuple(cached.shape)
        np.testing.assert_allclose(image.affine, np.asarray(cached.affine), atol=1e-5)
        assert (run_dir / "eval" / "overlays" / f"{case_id}.png").is_file()
    assert rows[0]["mask_from"] == "original"
    assert (run_dir / "eval" / "report.html").is_file() and (run_dir / "eval" / "lesions.csv").is_file()
    # the same run evaluated twice: the same numbers, reported as reproduced, nothing rewritten
    before = (run_dir / "eval" / "per_case.csv").stat().st_mtime_ns
    again = evaluation.evaluate(run_dir, progress=False)
    assert again["status"] == "reproduced" and again["output_dir"] == str(run_dir / "eval")
    assert (run_dir / "eval" / "per_case.csv").stat().st_mtime_ns == before


def test_predict_dir_never_writes_into_input(tiny_run_dir, toy_models, tmp_path):
    run_dir, base = tiny_run_dir
    before = sorted(p for p in (base / "phantom").rglob("*"))
    written = evaluation.predict_dir(run_dir, base / "phantom", tmp_path / "masks", progress=False)
    assert len(written) == 5 and all(p.parent == tmp_path / "masks" for p in written)
    assert sorted(p for p in (base / "phantom").rglob("*")) == before
    with pytest.raises(evaluation.EvaluationError, match="inside"):
        evaluation.predict_dir(run_dir, base / "phantom", base / "phantom" / "out")
    with pytest.raises(evaluation.EvaluationError, match="nothing is overwritten"):
        evaluation.predict_dir(run_dir, base / "phantom", tmp_path / "masks", progress=False)


def test_evaluate_missing_checkpoint_is_a_user_error(tiny_run_dir, toy_models):
    run_dir, _ = tiny_run_dir
    with pytest.raises(checkpoint.CheckpointError, match="nope.pt"):
        evaluation.evaluate(run_dir, checkpoint="nope", progress=False)


class PetLogit(torch.nn.Module):
    """logit = 10 * PET channel: probabilities rise with the PET value."""

    def forward(self, x):
        return 10.0 * x[:, 1:2]


def test_choose_threshold_maximises_pooled_validation_dice(monkeypatch):
    studies = [random_study(x=16, y=16, seed=s) for s in range(3)]  # no resizing at img_size 16
    # the reference of each study: PET (cache channel 1) > 0.3, in (X, Y, Z)
    refs = {id(s): np.moveaxis(s.image()[:, 1].astype(np.float32) > 0.3, 0, -1) for s in studies}
    monkeypatch.setattr(evaluation, "study_volumes",
                        lambda cached, suv_max: (None, refs[id(cached)], "original"))
    threshold, curve = evaluation.choose_threshold(
        PetLogit(), studies, img_size=16, batch_size=4, device=torch.device("cpu"), amp_dtype=None,
        tta=False, context_slices=0, suv_max=20.0)
    # prob > t  <=>  PET > logit(t) / 10; the reference is PET > 0.3, i.e. t = sigmoid(3) = 0.953
    assert threshold == 0.95 and curve["0.95"] == max(curve.values())
    assert curve["0.05"] < curve["0.50"] < curve["0.95"]


# ---- trustworthy evaluations ------------------------------------------------------------------

def test_known_prediction_gives_known_metrics(tiny_run_dir, toy_models):
    """PetThreshold predicts 'cached PET channel > -0.7' (SUV > 3): the per-study metrics must be
    the ones computed here by hand from that mask and the study's own SEG file."""
    import csv
    import json

    from scipy import ndimage

    run_dir, base = tiny_run_dir
    summary = evaluation.evaluate(run_dir, progress=False)
    rows = {r["case_id"]: r for r in csv.DictReader(open(Path(summary["output_dir"]) / "per_case.csv"))}
    recorded = {r["case_id"]: r for r in json.loads((run_dir / "cases.json").read_text())["studies"]}
    checked_tumour = 0
    for case_id, row in rows.items():
        cached = __import__("data").cache.load_cached(recorded[case_id]["directory"])
        pred = np.moveaxis(np.asarray(cached.image()[:, 1], np.float32) > -0.7, 0, -1)
        ref = np.asarray(nib.load(Path(cached.source) / "SEG.nii.gz").dataobj) > 0
        voxel_ml = float(np.prod(cached.spacing)) / 1000
        labels, n = ndimage.label(pred, structure=ndimage.generate_binary_structure(3, 2))
        untouched = [k for k in range(1, n + 1) if not ref[labels == k].any()]
        fpv = sum(int((labels == k).sum()) for k in untouched) * voxel_ml
        assert float(row["fpv_ml"]) == pytest.approx(fpv, rel=1e-9), case_id
        assert float(row["pred_volume_ml"]) == pytest.approx(pred.sum() * voxel_ml)
        if ref.any():
            checked_tumour += 1
            dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
            assert float(row["dice"]) == pytest.approx(dice, rel=1e-9), case_id
            assert float(row["sensitivity"]) == pytest.approx((pred & ref).sum() / ref.sum())
        else:
            assert row["dice"] == "nan"
    assert checked_tumour >= 1 and len(rows) == 3


def test_variants_get_their_own_folders_and_never_overwrite(tiny_run_dir, toy_models):
    run_dir, _ = tiny_run_dir
    first = evaluation.evaluate(run_dir, checkpoint="last", progress=False)
    assert Path(first["output_dir"]).name == "eval-last"
    tta = evaluation.evaluate(run_dir, tta=True, progress=False)
    assert Path(tta["output_dir"]).name == "eval-tta"
    floor = evaluation.evaluate(run_dir, postprocess={"suv_floor": 1.5}, progress=False)
    assert Path(floor["output_dir"]).name == "eval-pp-floor1.5-min0.05"
    # an earlier evaluation that no longer matches (here: edited) is kept, the new one goes beside it
    csv_path = run_dir / "eval-last" / "per_case.csv"
    edited = csv_path.read_text().replace("case_id", "case_id ", 1)
    csv_path.write_text(edited)
    (run_dir / "eval-last" / "stale.png").write_bytes(b"old")
    again = evaluation.evaluate(run_dir, checkpoint="last", progress=False)
    assert again["status"] == "differs" and Path(again["output_dir"]).name == "eval-last-2"
    assert csv_path.read_text() == edited  # untouched
    assert not (run_dir / "eval-last-2" / "stale.png").exists()  # a fresh folder: nothing stale
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name or "-tmp-" in p.name]


def test_reuse_reads_the_variants_own_folder_and_evaluates_only_without_one(
        tiny_run_dir, toy_models, monkeypatch):
    import json

    run_dir, _ = tiny_run_dir
    first = evaluation.evaluate(run_dir, checkpoint="last", tta=True, progress=False)
    folder = Path(first["output_dir"])
    assert folder.name == "eval-last-tta"
    stamp = (folder / "summary.json").stat().st_mtime_ns

    def no_model(*args, **kwargs):
        raise AssertionError("reuse loaded a model for an evaluation that is already there")

    monkeypatch.setattr(evaluation, "load_run_model", no_model)
    again = evaluation.evaluate(run_dir, checkpoint="last", tta=True, progress=False,
                                reuse=True)
    assert again["status"] == "existing" and Path(again["output_dir"]) == folder
    on_disk = json.loads((folder / "summary.json").read_text())
    assert again["metrics"] == on_disk["metrics"]
    assert again["metrics"]["dice"]["mean"] == pytest.approx(first["metrics"]["dice"]["mean"])
    assert (folder / "summary.json").stat().st_mtime_ns == stamp
    # another variant of the same checkpoint has no folder yet: reuse evaluates it
    with pytest.raises(AssertionError, match="reuse loaded a model"):
        evaluation.evaluate(run_dir, checkpoint="last", tta=True, threshold=0.35, progress=False,
                            reuse=True)


def test_run_studies_must_be_the_recorded_data(tiny_run_dir, toy_models, tmp_path):
    import json
    import shutil

    run_dir, _ = tiny_run_dir
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    doc = json.loads((copy / "cases.json").read_text())
    test_id = json.loads((copy / "split.json").read_text())["test"][0]
    for record in doc["studies"]:
        if record["case_id"] == test_id:
            record["content_hash"] = "0" * 32  # as if the run had seen other bytes
    (copy / "cases.json").write_text(json.dumps(doc))
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(__import__("data").DataError, match=f"{test_id}: its data changed"):
        evaluation.evaluate(copy, progress=False)
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing written


def test_data_dir_with_the_runs_training_studies_is_refused_or_labelled(tiny_run_dir, toy_models):
    import csv

    run_dir, base = tiny_run_dir
    with pytest.raises(evaluation.EvaluationError, match="trained or validated on"):
        evaluation.evaluate(run_dir, data_dir=str(base / "phantom"), progress=False)
    summary = evaluation.evaluate(run_dir, data_dir=str(base / "phantom"), allow_seen=True,
                                  progress=False)
    assert Path(summary["output_dir"]).name.endswith("-seen")
    rows = list(csv.DictReader(open(Path(summary["output_dir"]) / "per_case.csv")))
    assert sorted(r["seen_in_run"] for r in rows) == ["", "", "", "train", "val"]
    assert summary["seen_in_run"]["n_studies"] == 2


class Overflow(torch.nn.Module):
    """Logits that overflow (inf) in one slice and are NaN in another."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        out = x[:, 1:2].clone()
        out[0] = self.value
        return out


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_nonfinite_logits_are_an_error_naming_the_study(value):
    study = random_study()
    study.case_id = "PETCT_overflow"
    with pytest.raises(inference.NonFiniteError, match="PETCT_overflow"):
        inference.predict_volume(Overflow(value), study, img_size=16, device="cpu")


def test_inference_runs_under_the_training_autocast_dtype():
    class Probe(torch.nn.Module):
        seen = []

        def forward(self, x):
            self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return x[:, 1:2]

    probe = Probe()
    inference.predict_volume(probe, random_study(), img_size=16, device="cpu",
                             amp_dtype=torch.bfloat16)
    assert probe.seen and all(s == (True, torch.bfloat16) for s in probe.seen)
    probe.seen.clear()
    inference.predict_volume(probe, random_study(), img_size=16, device="cpu", amp_dtype=None)
    assert probe.seen and not any(enabled for enabled, _ in probe.seen)


def test_cuda_evaluation_resolves_the_dtype_training_used(monkeypatch):
    """Training and evaluation share runtime.resolve_amp: bf16 where the GPU has it (an older
    evaluation used fp16 autocast there whatever training used)."""
    import runtime

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert runtime.resolve_amp("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert runtime.resolve_amp("auto", cuda) == torch.float16
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_amp("auto", torch.device("cpu")) is None


def test_tune_postprocess_chooses_on_validation_and_applies_it(tiny_run_dir, toy_models, tmp_path):
    import json
    import shutil

    run_dir, _ = tiny_run_dir
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval*"))
    doc = json.loads((copy / "config.json").read_text())
    doc["config"]["tune_postprocess"] = True
    (copy / "config.json").write_text(json.dumps(doc))
    summary = evaluation.evaluate(copy, progress=False)
    chosen = summary["threshold_tuning"]["chosen"]
    assert set(chosen) == {"threshold", "suv_floor", "min_component_ml", "min_component_suvmax"}
    assert summary["threshold_tuning"]["n_val_studies"] == 1
    assert summary["settings"]["threshold"] == chosen["threshold"]
    assert summary["settings"]["postprocess"] == {k: chosen[k] for k in
                                                  ("suv_floor", "min_component_ml",
                                                   "min_component_suvmax")}
    assert Path(summary["output_dir"]).name == "eval"  # the run's own setting
    assert summary["settings"]["pp_thresholds"] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert list(summary["threshold_tuning"]["grid"]["threshold"]) == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    # other threshold candidates (test.py --pp_thresholds): the tuning searches those, in a
    # folder of its own; the run's own evaluation is left as it was
    before = (copy / "eval" / "summary.json").read_text()
    other = evaluation.evaluate(copy, pp_thresholds=[0.93], progress=False)
    assert Path(other["output_dir"]).name == "eval-ppthr0.93"
    assert other["threshold_tuning"]["chosen"]["threshold"] == 0.93
    assert other["settings"]["threshold"] == 0.93 and other["settings"]["pp_thresholds"] == [0.93]
    assert list(other["threshold_tuning"]["grid"]["threshold"]) == [0.93]
    assert (copy / "eval" / "summary.json").read_text() == before
    # nothing to tune: refused before any work, naming the setting
    with pytest.raises(evaluation.EvaluationError, match="--pp_thresholds"):
        evaluation.evaluate(copy, pp_thresholds=[0.5], threshold=0.4, progress=False)
    with pytest.raises(evaluation.EvaluationError, match="--pp_objective"):
        evaluation.evaluate(copy, pp_objective="mean_dice", threshold=0.4, progress=False)
    # the mean of the validation tumour studies' Dice (test.py --pp_objective=mean_dice): its
    # own folder, the objective and the chosen combination's score on the validation studies
    # recorded, and that score is the mean Dice of the chosen post-processing recomputed here
    # this run's one validation study is tumour-free: refused, before any inference
    with pytest.raises(evaluation.EvaluationError, match="none of its 1 has any"):
        evaluation.evaluate(copy, pp_objective="mean_dice", progress=False)
    split = json.loads((copy / "split.json").read_text())
    split["val"] = split["val"] + split["test"]  # validation with a tumour study
    (copy / "split.json").write_text(json.dumps(split))
    by_mean = evaluation.evaluate(copy, pp_objective="mean_dice", progress=False)
    assert Path(by_mean["output_dir"]).name == "eval-ppmeandice"
    tuning = by_mean["threshold_tuning"]
    assert tuning["objective"] == "mean_dice" and by_mean["settings"]["pp_objective"] == "mean_dice"
    assert summary["threshold_tuning"]["objective"] == "pooled_dice"
    assert "val_mean_dice" not in summary["threshold_tuning"]
    cfg = evaluation.run_config(copy)
    model = evaluation.load_run_model(copy, cfg, "best", torch.device("cpu"))

    def validation_scores(result):
        """The validation tumour studies' Dice and the tumour-free studies' volumes in ml of
        the masks `result`'s chosen post-processing gives, recomputed here."""
        dices, volumes = [], []
        for cached in evaluation.run_studies(copy, cfg, subset="val"):
            prob = evaluation.study_probabilities(model, cached, **factory.inference_options(cfg),
                                                  device=torch.device("cpu"), amp_dtype=None,
                                                  tta=result["settings"]["tta"])
            suv, ref, _ = evaluation.study_volumes(cached, cfg.suv_max)
            spacing = evaluation.scoring_grid(cached)[0]
            pred = metrics.postprocess_mask(
                prob > result["threshold_tuning"]["chosen"]["threshold"], spacing=spacing,
                suv=suv, **result["settings"]["postprocess"])
            if ref.any():
                dices.append(2 * (pred & (ref > 0)).sum() / (pred.sum() + (ref > 0).sum()))
            else:
                volumes.append(pred.sum() * float(np.prod(spacing)) / 1000)
        return dices, volumes

    dices, _ = validation_scores(by_mean)
    assert dices and tuning["val_mean_dice"] == pytest.approx(float(np.mean(dices)))
    assert (copy / "eval" / "summary.json").read_text() == before
    # the mean Dice within a false-positive volume on the tumour-free validation studies
    # (test.py --pp_objective=mean_dice_fpv --pp_max_fpv_ml=...): its own folder, named with
    # the limit; what the chosen combination scores there is recorded and recomputed here
    with pytest.raises(evaluation.EvaluationError, match="--pp_max_fpv_ml"):
        evaluation.evaluate(copy, pp_max_fpv_ml=0.5, progress=False)  # the run's: pooled_dice
    with pytest.raises(evaluation.EvaluationError, match="--pp_max_fpv_ml=-1"):
        evaluation.evaluate(copy, pp_objective="mean_dice_fpv", pp_max_fpv_ml=-1, progress=False)
    limited = evaluation.evaluate(copy, pp_objective="mean_dice_fpv", pp_max_fpv_ml=0.5,
                                  progress=False)
    assert Path(limited["output_dir"]).name == "eval-ppmeandicefpv0.5"
    assert limited["settings"]["pp_max_fpv_ml"] == 0.5
    tuning = limited["threshold_tuning"]
    dices, volumes = validation_scores(limited)
    assert dices and volumes
    assert tuning["val_mean_dice"] == pytest.approx(float(np.mean(dices)))
    assert tuning["val_fpv_ml_tumor_free"] == pytest.approx(float(np.mean(volumes)))
    assert tuning["max_fpv_ml"] == 0.5
    assert tuning["limit_met"] == (tuning["val_fpv_ml_tumor_free"] <= 0.5)
    assert (copy / "eval" / "summary.json").read_text() == before


def test_objectives_that_need_tumour_or_tumour_free_validation_studies_say_so():
    evaluation.check_tuning_studies("pooled_dice", [False, False], "here")  # pools anything
    evaluation.check_tuning_studies("mean_dice", [True, True], "here")
    evaluation.check_tuning_studies("mean_dice_fpv", [True, False], "here")
    with pytest.raises(evaluation.EvaluationError, match="here: .*none of its 2 has any"):
        evaluation.check_tuning_studies("mean_dice", [False, False], "here")
    with pytest.raises(evaluation.EvaluationError, match="none of its 1 has any"):
        evaluation.check_tuning_studies("mean_dice_fpv", [False], "here")
    with pytest.raises(evaluation.EvaluationError,
                       match="all 2 have tumour; use --pp_objective=mean_dice"):
        evaluation.check_tuning_studies("mean_dice_fpv", [True, True], "here")


@pytest.mark.parametrize("value", ["0.9,0.3", "0.5,1.2", "0.5,x", ""])
def test_bad_pp_thresholds_are_refused_naming_the_option(value, tmp_path):
    with pytest.raises(evaluation.EvaluationError, match="--pp_thresholds"):
        evaluation._parse_args(["--run_dir", str(tmp_path), f"--pp_thresholds={value}"])


def test_cache_dir_prepares_the_studies_elsewhere_and_scores_the_same(tiny_run_dir, toy_models,
                                                                      tmp_path):
    """A run whose recorded cache is gone or elsewhere (copied from another machine, kept by
    bench/main_run.py): --cache_dir rebuilds its studies in the folder given, checked against
    cases.json, and the evaluation is the one the recorded cache gives."""
    import shutil

    run_dir, base = tiny_run_dir
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("eval*"))
    recorded_cache = sorted((p, p.stat().st_mtime_ns) for p in (base / "cache").rglob("*"))
    elsewhere = tmp_path / "elsewhere"
    moved = evaluation.evaluate(copy, cache_dir=elsewhere, progress=False)
    assert moved["status"] == "new"
    assert sorted(p.name for p in elsewhere.rglob("image.npy"))  # the studies were cached here
    assert sorted((p, p.stat().st_mtime_ns) for p in (base / "cache").rglob("*")) == recorded_cache
    # the recorded cache gives the same numbers: the same folder, reproduced
    again = evaluation.evaluate(copy, progress=False)
    assert again["status"] == "reproduced" and again["output_dir"] == moved["output_dir"]
    # and from the command line
    assert evaluation._parse_args(["--run_dir=r", "--cache_dir=c"]).cache_dir == "c"
