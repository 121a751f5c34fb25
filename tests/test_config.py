"""Config: types, presets, unknown keys, CLI parsing, save/load round trip."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, PRESETS, load_config, make_config, parse_cli, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_cpu_preset():
    cfg = parse_cli([])
    assert cfg.preset == "cpu" and cfg.model == "transunet_small" and cfg.data_dir is None
    assert cfg.in_channels == 2


def test_precedence_defaults_preset_cli():
    assert parse_cli(["--preset=paper", "--pretrained=none"]).model == "transunet_r50_vit_b16"
    cfg = parse_cli(["--preset=paper", "--pretrained=none", "--model=unet_resnet34", "--lr=3e-4"])
    assert cfg.model == "unet_resnet34" and cfg.lr == 3e-4 and cfg.optimizer == "sgd"
    # the order of arguments does not matter: the preset is applied first
    assert parse_cli(["--lr=3e-4", "--preset=paper", "--pretrained=none"]).lr == 3e-4


def test_value_types():
    cfg = parse_cli(["--epochs=3", "--lr=1", "--data_dir=/data/x y", "--ct_window=(-100, 250)",
                     "--bce_pos_weight=10", "--augment=False", "--amp=True", "--tta"])
    assert cfg.epochs == 3 and isinstance(cfg.lr, float) and cfg.lr == 1.0
    assert cfg.data_dir == "/data/x y" and cfg.ct_window == (-100, 250)
    assert cfg.bce_pos_weight == 10.0 and isinstance(cfg.bce_pos_weight, float)
    assert cfg.augment is False and cfg.amp == "True" and cfg.tta is True
    assert parse_cli(["--resume=None"]).resume is None


@pytest.mark.parametrize("arg, words", [
    ("--epoch=3", ["--epoch", "did you mean --epochs"]),
    ("--epochs=3.5", ["--epochs", "int"]),
    ("--img_size=100", ["img_size", "16"]),
    ("--preset=gpu", ["preset", "gpu"]),
    ("--tversky_weighting=inverted", ["tversky_weighting"]),
    ("epochs=3", ["--key=value"]),
])
def test_bad_values_are_rejected_with_a_clear_message(arg, words):
    with pytest.raises(ConfigError) as err:
        parse_cli([arg])
    for word in words:
        assert word in str(err.value)


def test_frozen():
    with pytest.raises(Exception):
        parse_cli([]).epochs = 3  # nothing mutates the config after parsing


def test_every_preset_builds():
    for name in PRESETS:
        extra = {"pretrained": "none"} if name == "paper" else {}
        assert make_config({"preset": name, **extra}).preset == name


# where each run wrote and which seed it drew: everything else is the recipe
_NOT_RECIPE = {"out_dir", "run_name", "cache_dir", "seed"}


@pytest.mark.parametrize("preset, evidence, evaluation", [
    ("cpu", "results/main_cpu_hot", "eval"),
    ("cpu", "results/main_cpu_hot50", "eval"),
    ("cpu", "results/main_cpu_hot50_s1", "eval"),
    ("cpu", "results/main_cpu_hot50_s2", "eval"),
    ("cpu_long", "results/cpu_long_bf16", "eval-average0.75-tta"),
    ("cpu_long", "results/cpu_long_bf16_s1", "eval-average0.75-tta"),
    ("cpu_long", "results/cpu_long_s2", "eval"),
    ("cpu_long", "results/cpu_long_s3", "eval"),
])
def test_a_preset_is_the_recipe_of_the_evidence_its_comment_cites(preset, evidence, evaluation):
    """The README and the preset's comment quote these runs' figures for the preset: a preset
    edited since would quote another recipe's numbers. The recipe is the run's configuration
    with the weights and TTA its quoted evaluation scored (test.py --checkpoint=average
    --average_from=F --tta=True evaluates a run as a run trained with those settings is)."""
    ran = load_config(ROOT / evidence / "config.json").to_dict()
    scored = json.loads((ROOT / evidence / evaluation / "summary.json").read_text())["settings"]
    ran["tta"] = scored["tta"]
    if scored["checkpoint"].startswith("average"):
        ran["average_from"] = float(scored["checkpoint"].removeprefix("average"))
    else:
        assert scored["checkpoint"] == "best"
    now = parse_cli([f"--preset={preset}"]).to_dict()
    differ = {key: (ran[key], now[key]) for key in now
              if key not in _NOT_RECIPE and ran[key] != now[key]}
    assert ran["preset"] == preset and differ == {}


def test_paper_preset_needs_weights_or_an_explicit_none(tmp_path):
    with pytest.raises(ConfigError, match="--pretrained=none"):
        parse_cli(["--preset=paper"])
    with pytest.raises(ConfigError, match="no such file"):
        parse_cli(["--preset=paper", f"--pretrained={tmp_path / 'R50+ViT-B_16.npz'}"])
    (tmp_path / "R50+ViT-B_16.npz").write_bytes(b"")
    assert parse_cli(["--preset=paper", f"--pretrained={tmp_path / 'R50+ViT-B_16.npz'}"])


@pytest.mark.parametrize("arg, key", [
    ("--threshold=1.5", "threshold"), ("--threshold=0", "threshold"), ("--lr=-1", "lr"),
    ("--lr=0", "lr"), ("--w_dice=-1", "w_dice"), ("--val_every=0", "val_every"),
    ("--eval_batch_size=0", "eval_batch_size"), ("--n_skip=7", "n_skip"),
    ("--loss_reduction=mean", "loss_reduction"), ("--epochs=0", "epochs"),
    ("--batch_size=0", "batch_size"), ("--fg_fraction=1.5", "fg_fraction"),
    ("--momentum=1", "momentum"), ("--suv_max=0", "suv_max"), ("--phantom_size=huge", "phantom_size"),
    ("--tversky_gamma=0", "tversky_gamma"), ("--bce_pos_weight=-2", "bce_pos_weight"),
    ("--p_misalign=2", "p_misalign"), ("--aux_target=liver", "aux_target"),
    ("--n_folds=1", "n_folds"), ("--n_val=-1", "n_val"), ("--warmup_steps=2200", "warmup_steps"),
    ("--n_val=130", "n_val"), ("--ct_channel=1", "ct_channel"), ("--phantom_test_seed=0", "phantom_test_seed"),
])
def test_bad_values_are_refused_naming_the_key(arg, key):
    with pytest.raises(ConfigError, match=f"--{key}"):
        parse_cli([arg])


def test_all_loss_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="all 0"):
        parse_cli(["--w_bce=0", "--w_tversky=0", "--w_dice=0"])


def test_save_load_round_trip(tmp_path):
    cfg = parse_cli(["--preset=tiny", "--ct_window=(-200,300)", "--bce_pos_weight=5",
                     "--data_dir=/d"])
    save_config(cfg, tmp_path / "run" / "config.json", extra={"environment": {"torch": "x"}})
    payload = json.loads((tmp_path / "run" / "config.json").read_text())
    assert payload["environment"] == {"torch": "x"}
    assert load_config(tmp_path / "run") == cfg
    # a saved config is not re-interpreted through a preset: values stay exactly as saved
    assert load_config(tmp_path / "run" / "config.json").epochs == cfg.epochs


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_unknown_key_on_the_command_line_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "main.py", "--no_such_key=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--no_such_key" in proc.stderr and "Traceback" not in proc.stderr


def test_pp_thresholds_from_the_command_line_and_their_check():
    assert parse_cli(["--pp_thresholds=0.3,0.5,0.9,0.95"]).pp_thresholds == (0.3, 0.5, 0.9, 0.95)
    assert make_config({}).pp_thresholds == (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    for bad in ("(0.5,0.4)", "(0.5,1.0)", "(0.0,0.5)", "()"):
        with pytest.raises(ConfigError, match="--pp_thresholds"):
            parse_cli([f"--pp_thresholds={bad}"])


def test_pp_objective_is_checked_and_leaves_recorded_fingerprints_alone():
    import sweep

    assert parse_cli(["--pp_objective=mean_dice"]).pp_objective == "mean_dice"
    with pytest.raises(ConfigError, match="pp_objective"):
        parse_cli(["--pp_objective=median_dice"])
    cfg = make_config({"preset": "tiny", "tune_postprocess": True}).to_dict()
    before = {k: v for k, v in cfg.items() if k != "pp_objective"}  # a run recorded before it
    assert sweep.settings_fingerprint(before) == sweep.settings_fingerprint(cfg)
    by_mean = {**cfg, "pp_objective": "mean_dice"}
    assert sweep.settings_fingerprint(by_mean)["pp_objective"] == "mean_dice"
    # without tune_postprocess nothing is tuned: the objective changes nothing
    untuned = {**by_mean, "tune_postprocess": False}
    assert "pp_objective" not in sweep.settings_fingerprint(untuned)



def test_pp_max_fpv_ml_is_checked_and_counts_only_for_its_objective():
    import sweep

    assert parse_cli(["--pp_objective=mean_dice_fpv", "--pp_max_fpv_ml=0.5"]).pp_max_fpv_ml == 0.5
    with pytest.raises(ConfigError, match="pp_max_fpv_ml"):
        parse_cli(["--pp_max_fpv_ml=-1"])
    cfg = make_config({"preset": "tiny", "tune_postprocess": True}).to_dict()
    before = {k: v for k, v in cfg.items() if k != "pp_max_fpv_ml"}  # recorded before it
    assert sweep.settings_fingerprint(before) == sweep.settings_fingerprint(cfg)
    # the limit of another objective changes nothing; of mean_dice_fpv it does
    assert "pp_max_fpv_ml" not in sweep.settings_fingerprint({**cfg, "pp_max_fpv_ml": 0.5})
    limited = {**cfg, "pp_objective": "mean_dice_fpv", "pp_max_fpv_ml": 0.5}
    assert sweep.settings_fingerprint(limited)["pp_max_fpv_ml"] == 0.5
    assert "pp_max_fpv_ml" not in sweep.settings_fingerprint({**limited, "pp_max_fpv_ml": 1.0})
