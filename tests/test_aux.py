"""Anatomy-aware training (issue #13): organ labels through readers, cache and dataset, the
uptake target, the auxiliary head, its loss, and a short training in which both losses fall.

    python -m pytest tests/test_aux.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import find_studies, load_study
from data.cache import prepare_cache
from data.dataset import PetCtSliceDataset, rotate_shift
from data.organs import N_ORGAN_CLASSES
from data.phantom import generate, render
from data.study import DataError, Study
from data.targets import UPTAKE_SUV, suv_from_channel, uptake_from_channel, uptake_target
from loss import AuxSegLoss, CombinedLoss, WithAuxiliary
from models import build_model
from models.weights import load_pretrained


pytestmark = pytest.mark.usefixtures("one_thread")


def phantom_study(index: int) -> Study:
    """`unit` phantom study `index` (seed 0) in memory, organ labels included."""
    r = render(index, "unit", seed=0)
    return Study(ct=r.ct, pet=r.pet, mask=r.seg, spacing=r.spacing, affine=r.affine,
                 case_id=r.meta["case_id"], patient_id=r.meta["patient_id"], source=f"phantom:{index}",
                 organs=r.organs)


def toy_study(case_id="P1", shape=(16, 12, 6), organs=True) -> Study:
    """A square tumour (label 1) inside a square organ (label 3) in an otherwise labelled slice stack."""
    ct = np.full(shape, 40.0, np.float32)
    pet = np.ones(shape, np.float32)
    mask = np.zeros(shape, np.uint8)
    labels = np.zeros(shape, np.uint8)
    labels[:, : shape[1] // 2] = 2  # left half: organ 2
    labels[3:9, 3:9] = 3
    mask[5:7, 5:7, 2:4] = 1
    labels[mask > 0] = 1  # organ 1 exactly where the tumour is: alignment is checkable
    pet[3:9, 3:9] = 8.0
    return Study(ct=ct, pet=pet, mask=mask, spacing=(2.0, 3.0, 4.0), affine=np.diag([2.0, 3.0, 4.0, 1.0]),
                 case_id=case_id, patient_id=case_id, source=f"memory:{case_id}",
                 organs=labels if organs else None)


# ----------------------------------------------------------------------------- readers (phantom files)

def test_phantom_organs_read_back_on_the_pet_grid(tmp_path):
    metas = generate(tmp_path, 2, size="unit", seed=0, layouts=("autopet", "nnunet"), start_index=1,
                     progress=False)
    index = {m["case_id"]: m["index"] for m in metas}
    for layout in ("autopet", "nnunet"):
        refs = find_studies(tmp_path, layout=layout)
        assert len(refs) == 2 and all("organs" in r.paths for r in refs)
        for ref in refs:
            s, r = load_study(ref), render(index[ref.case_id], "unit", seed=0)
            assert s.organs.dtype == np.uint8 and s.organs.shape == s.pet.shape
            assert np.array_equal(s.organs, r.organs) and np.array_equal(s.mask, r.seg)


# ----------------------------------------------------------------------------- cache

def test_cache_writes_organs(tmp_path):
    with_organs, without = prepare_cache([toy_study("P1"), toy_study("P2", organs=False)], tmp_path,
                                         suv_max=20.0, progress=False)
    assert with_organs.has_organs and with_organs.max_organ_label == 3 and with_organs.suv_max == 20.0
    organs = with_organs.organs()
    assert isinstance(organs, np.memmap) and organs.dtype == np.uint8 and organs.shape == (6, 16, 12)
    np.testing.assert_array_equal(organs, toy_study().organs.transpose(2, 0, 1))
    with pytest.raises(ValueError):  # read-only
        organs[0, 0, 0] = 1
    assert not without.has_organs and without.max_organ_label == 0
    with pytest.raises(DataError, match="P2.*no organ labels.*ORGANS.nii.gz"):
        without.organs()
    bad = toy_study("P3")
    bad.organs = bad.organs[:, :, :4]
    with pytest.raises(DataError, match="organ labels .* and PET .* differ"):
        prepare_cache([bad], tmp_path, progress=False)


# ----------------------------------------------------------------------------- uptake target

def test_uptake_target_hand_made():
    suv = np.zeros((4, 3, 2), np.float32)
    suv[0, 0, 0], suv[1, 2, 1], suv[2, 1, 0], suv[3, 0, 1] = 3.5, 10.0, 3.0, 2.9  # 3.0: not > 3.0
    suv[0, 1, 1] = 7.0  # hot, but tumour
    mask = np.zeros(suv.shape, np.uint8)
    mask[0, 1, 1] = mask[3, 2, 0] = 1
    expected = np.zeros(suv.shape, np.uint8)
    expected[0, 0, 0] = expected[1, 2, 1] = 1
    assert np.array_equal(uptake_target(suv, mask, threshold=3.0), expected)
    assert uptake_target(suv, mask).dtype == np.uint8 and UPTAKE_SUV == 3.0
    unlabelled = expected.copy()
    unlabelled[0, 1, 1] = 1
    assert np.array_equal(uptake_target(suv, None, 3.0), unlabelled)
    # from the cached, normalised PET channel: ch1 = 2 clip(SUV, 0, 20) / 20 - 1 (float16)
    channel = (2 * np.clip(suv, 0, 20) / 20 - 1).astype(np.float16)
    np.testing.assert_allclose(suv_from_channel(channel, 20.0), np.clip(suv, 0, 20), atol=0.01)
    assert np.array_equal(uptake_from_channel(channel, mask, 20.0, threshold=3.2), expected)
    with pytest.raises(ValueError, match="suv_max"):
        uptake_from_channel(channel, mask, 20.0, threshold=25.0)


def test_dataset_uptake_items_are_the_expected_voxels(tmp_path):
    study = toy_study()
    (cs,) = prepare_cache([study], tmp_path, suv_max=20.0, progress=False)
    ds = PetCtSliceDataset([cs], img_size=16, augment=False, fg_fraction=1.0, samples_per_epoch=6,
                           seed=0, aux_target="uptake", uptake_suv=3.0)
    assert ds.aux_classes == 2 and ds.suv_max == 20.0
    for i in range(len(ds)):
        image, mask, aux = ds[i]
        _, z = ds.pick(np.random.default_rng([0, 0, i]))
        want = (study.pet[:, :, z] > 3.0) & (study.mask[:, :, z] == 0)  # the organ square minus the tumour
        want = F.interpolate(torch.from_numpy(want.astype(np.float32))[None, None], size=(16, 16),
                             mode="nearest-exact")[0, 0].long()
        assert aux.dtype == torch.int64 and torch.equal(aux, want)
    with pytest.raises(DataError, match="suv_max=10.0 differs"):
        PetCtSliceDataset([cs], img_size=16, samples_per_epoch=2, aux_target="uptake", suv_max=10.0)
    with pytest.raises(DataError, match="uptake_suv=25"):
        PetCtSliceDataset([cs], img_size=16, samples_per_epoch=2, aux_target="uptake", uptake_suv=25)


# ----------------------------------------------------------------------------- dataset

@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    return prepare_cache([toy_study("P1"), toy_study("P2", organs=False), toy_study("P3")],
                         tmp_path_factory.mktemp("aux_cache"), progress=False)


def test_organ_items_follow_the_mask_through_augmentation(toy_cache):
    kw = dict(img_size=32, fg_fraction=0.5, augment=True, samples_per_epoch=40, seed=3)
    studies = [toy_cache[0], toy_cache[2]]
    plain = PetCtSliceDataset(studies, **kw)
    ds = PetCtSliceDataset(studies, **kw, aux_target="organs", aux_classes=4)
    assert plain.aux_classes == 0 and ds.aux_classes == 4
    moved = set()
    for i in range(len(ds)):
        image, mask, aux = ds[i]
        assert aux.shape == (32, 32) and aux.dtype == torch.int64 and set(aux.unique().tolist()) <= {0, 1, 2, 3}
        assert torch.equal(aux == 1, mask[0] == 1)  # label 1 sits exactly on the tumour
        ref_image, ref_mask = plain[i]  # the aux target changes no draw of the item
        assert torch.equal(image, ref_image) and torch.equal(mask, ref_mask)
        ys, xs = np.nonzero((aux == 3).numpy())
        moved.add((round(ys.mean() / 4), round(xs.mean() / 4)))
    assert len(moved) >= 3  # flips / rotations did move the labels
    assert len(plain[0]) == 2  # without aux: (image, mask) as before


def test_missing_organ_labels_named_at_construction(toy_cache):
    with pytest.raises(DataError) as err:
        PetCtSliceDataset(toy_cache, img_size=16, samples_per_epoch=4, aux_target="organs")
    msg = str(err.value)
    assert "study P2 (memory:P2) has no organ labels" in msg and "ORGANS.nii.gz" in msg
    assert "--aux_target=uptake / none" in msg
    with pytest.raises(DataError, match="aux_classes=3.*study P1 .* has label 3.*4 for these studies"):
        PetCtSliceDataset([toy_cache[0]], img_size=16, samples_per_epoch=4, aux_target="organs", aux_classes=3)
    assert PetCtSliceDataset([toy_cache[0]], img_size=16, samples_per_epoch=4, aux_target="organs").aux_classes == 4
    with pytest.raises(DataError, match="aux_target='atlas'"):
        PetCtSliceDataset(toy_cache, img_size=16, samples_per_epoch=4, aux_target="atlas")


def test_rotate_shift_converts_mm_with_the_spacing():
    x = torch.full((1, 20, 16), -1.0)
    x[0, 6:10, 5:9] = 1.0
    out = rotate_shift(x, spacing=(2.0, 3.0), angle_deg=0.0, shift_mm=(4.0, -6.0))
    # sampled at p + shift: the content moves by -(4 mm, -6 mm) = (-2, +2) pixels, air comes in
    assert torch.allclose(out[0, 4:8, 7:11], torch.ones(4, 4), atol=1e-5)
    assert torch.isclose(out.sum(), x.sum(), atol=1e-3)
    turned = rotate_shift(x, spacing=(2.0, 3.0), angle_deg=90.0, shift_mm=(0.0, 0.0))
    assert turned.shape == x.shape and not torch.allclose(turned, x)


def test_misalignment_moves_only_the_ct(tmp_path):
    study = toy_study(shape=(24, 24, 4))
    study.ct[4:12, 6:14] = 900.0  # a bright CT square off the PET square
    (cs,) = prepare_cache([study], tmp_path, progress=False)
    kw = dict(img_size=24, augment=True, samples_per_epoch=30, seed=1, aux_target="organs")
    base = PetCtSliceDataset([cs], **kw)
    mis = PetCtSliceDataset([cs], **kw, p_misalign=1.0)
    changed = 0
    for i in range(len(mis)):
        (img0, m0, a0), (img1, m1, a1) = base[i], mis[i]
        assert torch.equal(img0[1], img1[1]) and torch.equal(m0, m1) and torch.equal(a0, a1)  # PET, labels
        changed += not torch.allclose(img0[0], img1[0], atol=1e-3)
        assert torch.equal(mis[i][0], img1)  # a pure function of (seed, epoch, index)
    assert changed >= 25  # p = 1: the CT moved in (nearly) every item
    assert all(torch.equal(base[i][0], PetCtSliceDataset([cs], **kw, p_misalign=0.0)[i][0]) for i in range(3))


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("name", ["transunet_tiny", "unet_resnet18", "fpn_resnet34", "segformer_mit_b0"])
def test_aux_head_changes_nothing_at_inference(name):
    torch.manual_seed(0)
    with_aux = build_model(name, img_size=64, aux_classes=5)
    plain = build_model(name, img_size=64)
    shared = {k: v for k, v in with_aux.state_dict().items() if not k.startswith("aux_head.")}
    plain.load_state_dict(shared)  # strict: the aux head is the only extra tensor
    x = torch.randn(2, 2, 64, 64)
    with_aux.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(with_aux(x), plain(x)) and with_aux(x).shape == (2, 1, 64, 64)
    with_aux.train(), plain.train()
    torch.manual_seed(1)  # the same dropout masks (FPN's decoder has dropout) in both
    out = with_aux(x)
    assert out.shape == (2, 6, 64, 64)
    torch.manual_seed(1)
    torch.testing.assert_close(out[:, :1], plain(x))  # train-mode lesion channel too
    out[:, 1:].square().mean().backward()
    assert with_aux.aux_head.weight.grad.abs().sum() > 0
    grads = [p.grad for n, p in with_aux.named_parameters() if not n.startswith("aux_head")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the aux loss reaches the shared decoder


@pytest.mark.parametrize("name", ["transunet_tiny", "unet_resnet18"])
def test_aux_outputs_reads_the_head_in_eval_mode(name):
    from models import aux_outputs

    torch.manual_seed(0)
    model = build_model(name, img_size=64, aux_classes=5).eval()
    x = torch.randn(2, 2, 64, 64)
    with torch.no_grad():
        lesion = model(x)
        with aux_outputs(model):
            both = model(x)
        after = model(x)
    assert both.shape == (2, 6, 64, 64) and lesion.shape == after.shape == (2, 1, 64, 64)
    assert torch.equal(both[:, :1], lesion) and torch.equal(after, lesion)
    with torch.no_grad():  # the aux channels are the head's: zero weights, bias -> the bias
        model.aux_head.weight.zero_()
        model.aux_head.bias.copy_(torch.arange(5.0))
        with aux_outputs(model):
            aux = model(x)[:, 1:]
    assert torch.equal(aux, torch.arange(5.0).view(1, 5, 1, 1).expand(2, 5, 64, 64))
    with pytest.raises(ValueError, match="aux_classes=0"):
        with aux_outputs(build_model(name, img_size=64)):
            pass


def test_predict_aux_background_is_the_heads_class_0():
    from inference import predict_aux_background, predict_volume
    from models import aux_outputs

    class Study:  # the cache's interface: (Z, 2, X, Y) float16 in [-1, 1]
        case_id = "toy"

        def image(self):
            return np.random.default_rng(0).uniform(-1, 1, (5, 2, 40, 40)).astype(np.float16)

    model = build_model("transunet_tiny", img_size=64, aux_classes=3)
    with torch.no_grad():
        model.aux_head.weight.zero_()
        model.aux_head.bias.copy_(torch.tensor([2.0, 0.0, 1.0]))
    expected = np.exp(2.0) / (np.exp(2.0) + 1 + np.exp(1.0))
    with aux_outputs(model):
        for tta in (False, True):
            bg = predict_aux_background(model, Study(), img_size=64, tta=tta)
            assert bg.shape == (40, 40, 5) and np.allclose(bg, expected, atol=1e-6)
        model.train()
        predict_aux_background(model, Study(), img_size=64)
        assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="inside models.aux_outputs"):
        predict_aux_background(model, Study(), img_size=64)
    lesion = predict_volume(model.eval(), Study(), img_size=64)
    assert lesion.shape == (40, 40, 5)  # prediction still sees the lesion channel alone


def test_aux_head_checkpoints_and_errors(tmp_path):
    plain, with_aux = build_model("unet_resnet18", img_size=64), build_model("unet_resnet18", img_size=64, aux_classes=4)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    torch.save(with_aux.state_dict(), tmp_path / "aux.pt")
    load_pretrained(build_model("unet_resnet18", img_size=64, aux_classes=4), tmp_path / "plain.pt", "unet_resnet18")
    load_pretrained(build_model("unet_resnet18", img_size=64), tmp_path / "aux.pt", "unet_resnet18")
    with pytest.raises(ValueError, match="aux_classes=1"):
        build_model("transunet_tiny", img_size=32, aux_classes=1)


# ----------------------------------------------------------------------------- loss

def test_aux_seg_loss_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, 0], target[1, 0, 0] = 1, 2  # every class present
    parts = AuxSegLoss(3).parts(logits, target)
    torch.testing.assert_close(parts["ce"], F.cross_entropy(logits, target))
    p = torch.softmax(logits, 1)
    dices = []
    for c in (1, 2):  # foreground classes only, batch Dice
        pc, tc = p[:, c], (target == c).float()
        tp, fp, fn = (pc * tc).sum(), (pc * (1 - tc)).sum(), ((1 - pc) * tc).sum()
        dices.append((2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5))
    torch.testing.assert_close(parts["dice"], 1 - (dices[0] + dices[1]) / 2)
    torch.testing.assert_close(parts["total"], parts["ce"] + parts["dice"])
    perfect = AuxSegLoss(3)(F.one_hot(target, 3).movedim(-1, 1) * 40.0, target)
    assert perfect < 1e-6
    with pytest.raises(ValueError, match="aux_classes=3"):
        AuxSegLoss(3)(torch.randn(2, 4, 4, 5), target)
    with pytest.raises(ValueError, match="int64"):
        AuxSegLoss(3)(logits, target.float())


def test_aux_seg_loss_matches_one_hot_reference_with_gradients():
    # the loss gathers the true-class terms instead of building a one-hot tensor: the same value
    # and the same gradient as cross-entropy + a one-hot batch Dice, at the organ head's 16
    # classes, with classes absent from the batch (their Dice is the smooth-only ~1 or ~0)
    torch.manual_seed(3)
    logits = (2.0 * torch.randn(3, 16, 12, 10, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 12, (3, 12, 10))  # classes 12-15 absent
    got = AuxSegLoss(16, w_ce=0.7, w_dice=1.3).parts(logits, target)
    g_got = torch.autograd.grad(got["total"], logits)[0]
    p = torch.softmax(logits, 1)
    onehot = F.one_hot(target, 16).movedim(-1, 1).to(p.dtype)
    tp = (p * onehot).sum((0, 2, 3))
    fp, fn = (p * (1 - onehot)).sum((0, 2, 3)), ((1 - p) * onehot).sum((0, 2, 3))
    dice = 1 - ((2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5))[1:].mean()
    ce = F.cross_entropy(logits, target)
    ref = 0.7 * ce + 1.3 * dice
    g_ref = torch.autograd.grad(ref, logits)[0]
    torch.testing.assert_close(got["ce"].double(), ce.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["dice"].double(), dice.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=1e-5, atol=1e-8)


def test_with_auxiliary_parts_and_autocast():
    torch.manual_seed(1)
    logits = torch.randn(2, 1 + 4, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.9).float()
    aux = torch.randint(0, 4, (2, 8, 8))
    lesion, aux_loss = CombinedLoss(), AuxSegLoss(4)
    fn = WithAuxiliary(lesion, aux_loss, w_aux=0.5)
    parts = fn.parts(logits, target, aux)
    ref = lesion.parts(logits[:, :1], target)
    for key in ("bce", "tversky", "dice"):
        torch.testing.assert_close(parts[key], ref[key])
    torch.testing.assert_close(parts["lesion"], ref["total"])
    torch.testing.assert_close(parts["aux"], aux_loss(logits[:, 1:], aux))
    torch.testing.assert_close(parts["total"], ref["total"] + 0.5 * parts["aux"])
    torch.testing.assert_close(fn(logits, target, aux), parts["total"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fn.parts(logits.bfloat16(), target, aux)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in low.values())
    only = fn.parts(logits[:, :1], target)  # eval-mode output, no aux target: the lesion loss
    torch.testing.assert_close(only["total"], ref["total"])
    assert only["aux"] == 0
    with pytest.raises(ValueError, match=r"\(B, 1 \+ 4, \.\.\.\)"):
        fn(logits[:, :3], target, aux)


# ----------------------------------------------------------------------------- training

def test_short_training_with_aux_organs_lowers_both_losses(tmp_path):
    """40 AdamW steps of transunet_tiny on 8 tumour slices of two `unit` phantom studies."""
    cached = prepare_cache([phantom_study(1), phantom_study(2)], tmp_path, progress=False)
    ds = PetCtSliceDataset(cached, img_size=64, fg_fraction=1.0, augment=False, samples_per_epoch=8,
                           seed=0, aux_target="organs", aux_classes=N_ORGAN_CLASSES)
    x, y, aux = (torch.stack(t) for t in zip(*(ds[i] for i in range(len(ds)))))
    assert x.shape == (8, 2, 64, 64) and y.sum() > 0 and len(aux.unique()) >= 8
    torch.manual_seed(0)
    model = build_model("transunet_tiny", img_size=64, aux_classes=N_ORGAN_CLASSES).train()
    loss_fn = WithAuxiliary(CombinedLoss(), AuxSegLoss(N_ORGAN_CLASSES), w_aux=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    lesion, organ = [], []
    for _ in range(40):
        opt.zero_grad()
        parts = loss_fn.parts(model(x), y, aux)
        parts["total"].backward()
        opt.step()
        lesion.append(parts["lesion"].item())
        organ.append(parts["aux"].item())
    assert np.mean(lesion[-5:]) < 0.85 * np.mean(lesion[:5]), lesion
    assert np.mean(organ[-5:]) < 0.5 * np.mean(organ[:5]), organ
