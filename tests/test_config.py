"""The typed config: paper recipe matches the published numbers; overrides and errors behave."""

import hashlib
from pathlib import Path

import pytest
import yaml

from xfusion.config import (
    ARCHITECTURES,
    COSMETIC,
    READS,
    ConfigError,
    all_runs,
    apply_overrides,
    job_config,
    load_yaml,
    recipe_hash,
    resolve_run,
    run_from_dict,
    run_from_json,
    train_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
PAPER = load_yaml(ROOT / "config" / "paper.yaml")
TINY = load_yaml(ROOT / "config" / "tiny.yaml")
REFERENCE = yaml.safe_load((ROOT / "reference" / "paper_results.yaml").read_text())["xfusion"]
HYPER = REFERENCE["hyperparameters"]
# sha256 of shared/reference/paper_results.yaml, which reference/paper_results.yaml copies.
PAPER_RESULTS_SHA256 = "f1934626f715e8db0408f37a8e60c4ebc227b7ec232cf93b6cbc1500912e8920"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reference_copy_is_the_shared_transcription_byte_for_byte():
    """reference/paper_results.yaml is a copy of the project's shared transcription of the
    published numbers. Its sha256 is pinned here, so a clean clone (no shared/ beside it)
    checks the copy too; where shared/ is beside the checkout, the original must hash to the
    pin as well (else the pin, and the copy, are stale)."""
    copy = ROOT / "reference" / "paper_results.yaml"
    assert _sha256(copy) == PAPER_RESULTS_SHA256, (
        f"{copy} differs from the shared transcription of the papers' numbers: restore it from "
        "shared/reference/paper_results.yaml (a fix there goes into both, and into the pin)")
    shared = ROOT.parent / "shared" / "reference" / "paper_results.yaml"
    if shared.exists():
        assert _sha256(shared) == PAPER_RESULTS_SHA256, f"{shared} changed: copy it and re-pin"


def test_paper_recipe_matches_published_hyperparameters_field_by_field():
    run = run_from_dict(PAPER)
    t, m, e, d = run.training, run.model, run.evaluation, run.data
    assert t.lambda_ar == HYPER["lambda_ar"]
    assert t.lambda_dm == HYPER["lambda_dm"]
    assert list(t.betas) == HYPER["betas"]
    assert t.lr == HYPER["lr_max"]
    assert t.warmup_steps > 0  # "linear warm-up"
    assert t.tokens_per_batch == HYPER["tokens_per_batch"]
    assert t.steps == HYPER["steps"]
    assert d.image_size == HYPER["image_resolution"]
    assert m.patch_size == HYPER["patch_size"]
    assert e.cfg_scale == HYPER["cfg_scale"]
    assert t.i2t_noise_max == HYPER["recommended_i2t_noise_limit"]
    assert HYPER["recommended_t2i_i2t_ratio"].startswith("66/33") and t.t2i_ratio == 0.66
    assert m.repa.layer == HYPER["alignment_layer"]
    assert t.zero_stage == 2 and "stage 2" in HYPER["distributed"].lower()
    assert m.codec.kind == "autoencoder_kl" and m.codec.downsample == 8
    assert m.codec.latent_channels == 4 and m.codec.scaling_factor == 0.18215  # SD-1.5 VAE
    assert m.base_lm.path == "meta-llama/Llama-3.2-1B"
    assert t.timestep_sampling == "logit_normal"  # SD3 scheduler
    assert e.n_samples == 30000  # 30K COCO prompts
    assert e.mmlu_shots == 5
    probe = HYPER["linear_probe"]
    assert e.probe_lr == probe["lr"] and e.probe_batch_size == probe["batch_size"]
    assert e.probe_t_generation * 1000 == pytest.approx(probe["generation_mode_t"])
    # Supplementary A uses lambda_AR = 0.5 for the alignment ablation.
    alignment = resolve_run(PAPER, "size_s_align_on")
    assert alignment.training.lambda_ar == HYPER["lambda_ar_alignment_ablation"]
    assert alignment.model.repa.enabled
    # The 8B final model trains 200k steps.
    assert resolve_run(PAPER, "xfusion_8b").training.steps == 200000


def test_every_declared_run_resolves_at_both_scales():
    for raw in (TINY, PAPER):
        runs = all_runs(raw)
        assert {"single_tower", "gated_tower", "dual_projection", "dual_tower", "x_fuse"} <= set(runs)
        for name in runs:
            assert resolve_run(raw, name).name == name


def test_table1_runs_cover_the_four_architectures():
    table1 = TINY["experiments"]["table1"]["runs"]
    archs = {resolve_run(TINY, name).model.architecture for name in table1}
    assert archs == {"single_tower", "gated_tower", "dual_projection", "dual_tower"}
    assert set(ARCHITECTURES) == archs | {"x_fuse", "x_fuse_dit"}  # figure8's


def test_overrides_apply_dotted_keys_without_touching_the_base():
    out = apply_overrides(TINY, {"training.t2i_ratio": 0.5, "model.repa.enabled": True})
    assert out["training"]["t2i_ratio"] == 0.5 and out["model"]["repa"]["enabled"] is True
    assert TINY["training"]["t2i_ratio"] == 0.66


def test_run_config_json_round_trip():
    run = resolve_run(TINY, "noise_50")
    assert run_from_json(run.to_json()) == run


@pytest.mark.parametrize(
    "override, key",
    [
        ({"model.architecture": "triple_tower"}, "model.architecture"),
        ({"training.t2i_ratio": 1.4}, "training.t2i_ratio"),
        ({"training.i2t_noise_max": -0.1}, "training.i2t_noise_max"),
        ({"training.steps": -5}, "training.steps"),
        ({"training.eval_steps": [999999]}, "training.eval_steps"),
        ({"training.betas": [0.9]}, "training.betas"),
        ({"data.image_size": 30}, "data.image_size"),
        ({"training.learning_rate": 1e-3}, "learning_rate"),
        ({"model.dit.source": "pretrained"}, "model.dit.path"),
        ({"model.dit.tiny.num_layers": 0}, "model.dit.tiny.num_layers"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_from_dict(apply_overrides(TINY, override))


def test_missing_required_key_is_named():
    raw = dict(TINY)
    raw.pop("results_dir")
    with pytest.raises(ConfigError, match="results_dir"):
        run_from_dict(raw)


def test_a_run_name_with_two_meanings_is_refused():
    raw = apply_overrides(TINY, {})
    raw["experiments"]["figure8"]["runs"]["dual_tower"] = {"model.architecture": "gated_tower"}
    with pytest.raises(ConfigError, match="dual_tower"):
        all_runs(raw)


# ---- recipe hashes ---------------------------------------------------------------------------

def _tiny(overrides: dict, run: str = "dual_tower"):
    return resolve_run(apply_overrides(TINY, overrides), run)


def _changed(overrides: dict, run: str = "dual_tower") -> set[str]:
    """The jobs whose recipe hash `overrides` of the tiny recipe change."""
    before, after = resolve_run(TINY, run), _tiny(overrides, run)
    return {job for job in READS if recipe_hash(before, job) != recipe_hash(after, job)}


def test_train_recipe_is_stable_and_leaves_out_cosmetic_keys():
    cfg = resolve_run(TINY, "dual_tower")
    assert train_recipe(cfg) == train_recipe(resolve_run(load_yaml(ROOT / "config" / "tiny.yaml"),
                                                         "dual_tower"))
    assert train_recipe(cfg) == train_recipe(run_from_json(cfg.to_json()))  # a step dir's config
    cosmetic = {"training.log_every": 7, "training.checkpoint_every": 33, "training.keep_last": 5,
                "training.eval_steps": [100, 400], "training.activation_checkpointing": True}
    assert set(cosmetic) == set(COSMETIC)
    assert _changed(cosmetic) == set()
    for key, value in {"training.t2i_ratio": 0.5, "training.seed": 1, "training.lr": 1e-4,
                       "model.architecture": "x_fuse", "data.n_train": 10}.items():
        assert "train_run" in _changed({key: value}), key
    assert not any(k.startswith("evaluation.") for k in job_config(cfg, "train_run"))


def test_each_evaluation_hash_changes_with_exactly_what_it_reads():
    assert _changed({"evaluation.cfg_scale": 3.0}) == {"sample_t2i", "fid", "clip_score",
                                                       "geneval", "finetune_eval"}
    assert _changed({"evaluation.top_p": 0.9}) == {"sample_i2t", "itm", "caption_attributes"}
    assert _changed({"evaluation.probe_epochs": 3}) == {"linear_probe"}
    # the probe's images are read by the probe_data rule alone, not by the data stage that reads
    # the rest of `data` (xfusion.config.DEDICATED)
    assert _changed({"data.probe.max_per_class": 5}) == {"probe_data"}
    assert _changed({"data.probe.val_dir": "imagenet/val"}) == {"probe_data"}
    assert "probe_data" in _changed({"data.image_size": 64})  # it crops to the model's size
    assert _changed({"evaluation.mmlu_shots": 3}) == {"mmlu", "mmlu_base"}
    assert _changed({"evaluation.fid_extractor": "inception-v3-compat"}) == {"fid"}
    # the judges' recipe reaches every job that loads a judge, and no other
    assert _changed({"evaluation.judge_width": 32}) == {"judges", "fid", "clip_score", "itm",
                                                        "caption_metrics", "finetune_eval"}
    hub = {"evaluation.itm_model": "Salesforce/blip2-itm-vit-g"}  # a pretrained ITM model
    assert recipe_hash(_tiny(hub), "itm") == recipe_hash(
        _tiny({**hub, "evaluation.judge_width": 32}), "itm")


def test_repa_with_the_clip_judge_makes_the_judges_part_of_the_train_recipe():
    judge = {"model.repa.encoder": "judge_clip"}

    def changed(run):
        return train_recipe(_tiny(judge, run)) != train_recipe(
            _tiny({**judge, "evaluation.judge_width": 32}, run))
    assert changed("size_m_align_on") and not changed("size_m_align_off")


def test_repa_with_the_align_encoder_makes_its_recipe_part_of_the_train_recipe():
    """The tiny default target: its keys rerun it and the REPA runs on it, not the runs without
    alignment; the judges' keys no longer rerun REPA training."""
    assert resolve_run(TINY, "size_m_align_on").model.repa.encoder == "align_encoder"
    steps = {"model.repa.align.steps": 7}
    # (and of its fine-tuning's, which starts from those weights)
    assert _changed(steps, run="size_m_align_on") == {"align_encoder", "train_run", "finetune_run"}
    assert "train_run" not in _changed(steps, run="size_m_align_off")
    assert "train_run" not in _changed({"evaluation.judge_width": 32}, run="size_m_align_on")
    assert "seed" in job_config(resolve_run(TINY, "size_m_align_on"), "train_run")


def test_the_i2t_denoise_loss_switch_is_part_of_the_train_recipe_only():
    assert job_config(resolve_run(TINY, "noise_50"), "train_run")["training.i2t_denoise_loss"]
    # (and of fine-tuning, which starts from the run's weights: xfusion.config, finetune_run)
    assert _changed({"training.i2t_denoise_loss": False}, run="noise_50") == {"train_run",
                                                                              "finetune_run"}




def test_the_dit_recipe_is_part_of_the_train_recipe_of_x_fuse_dit_runs_only():
    """model.dit is the DiT pretraining's recipe: it reruns that job and the x_fuse_dit runs
    on it (their training, and a fine-tuning that would start from them), and no other run
    (their hashes ignore the section)."""
    assert resolve_run(TINY, "x_fuse_dit").model.architecture == "x_fuse_dit"
    steps = {"model.dit.pretrain_steps": 7}
    on_dit = {"dit", "train_run", "finetune_run"}
    assert _changed(steps, run="x_fuse_dit") == on_dit
    assert _changed(steps, run="x_fuse") == {"dit"}
    assert _changed({"model.dit.tiny.num_layers": 3}, run="x_fuse_dit") == on_dit
    assert not any(k.startswith("model.dit") for k in job_config(resolve_run(TINY, "x_fuse"),
                                                                  "train_run"))
