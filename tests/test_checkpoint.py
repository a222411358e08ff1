"""Checkpoints: atomic step dirs, newest-complete lookup, pruning, identity checks, RNG restore."""

import random

import numpy as np
import pytest
import torch

from xfusion import checkpoint
from xfusion.model.xfusion import trainable_state

META = {"variant": "dual_tower", "base_model_hash": "abc", "recipe": "0123456789abcdef"}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    return model


def _engine_files(step):
    def save_engine(directory):  # what Engine.save does: its own files under directory/
        (directory / "deepspeed").mkdir()
        torch.save({"m": torch.ones(2) * step}, directory / "deepspeed" / "optim.pt")
    return save_engine


def _save(root, step, model=None, keep_last=2):
    return checkpoint.save(root, step, model=model or _model(), save_engine=_engine_files(step),
                           data_state={"step": step, "t2i_tokens_seen": 10 * step},
                           meta=META, keep_last=keep_last)


def test_save_load_roundtrip_holds_trainable_weights_engine_files_and_data_state(tmp_path):
    model = _model()
    path = _save(tmp_path, 5, model)
    ckpt = checkpoint.load(path, META)
    assert ckpt.step == 5
    assert set(ckpt.weights) == {"1.weight", "1.bias"}  # the frozen layer is not stored
    assert torch.equal(ckpt.weights["1.weight"], model[1].weight)
    engine = torch.load(ckpt.engine_dir / "deepspeed" / "optim.pt", weights_only=True)
    assert torch.equal(engine["m"], torch.full((2,), 5.0))
    assert ckpt.data == {"step": 5, "t2i_tokens_seen": 50}
    assert ckpt.meta["variant"] == "dual_tower" and ckpt.meta["step"] == 5


def test_rank_file_loads_with_weights_only(tmp_path):
    path = _save(tmp_path, 1)
    state = torch.load(path / "rank0.pt", weights_only=True)
    assert set(state) == {"rng", "data"}


def test_latest_ignores_incomplete_temp_dirs_and_prunes_to_keep_last(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    for step in (1, 2, 3):
        _save(tmp_path, step)
    (tmp_path / ".step_9.shards").mkdir()  # a save killed half-way
    (tmp_path / "step_8").mkdir()  # no meta.json: not a complete checkpoint
    assert checkpoint.latest(tmp_path).name == "step_3"
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [2, 3]
    _save(tmp_path, 4)
    assert not (tmp_path / ".step_9.shards").exists()
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [3, 4]
    assert checkpoint.latest(tmp_path, before=4).name == "step_3"  # resume before a step dir
    assert checkpoint.latest(tmp_path, before=3) is None


@pytest.mark.parametrize("key,value", [("variant", "single_tower"), ("base_model_hash", "zzz"),
                                       ("recipe", "fedcba9876543210")])
def test_load_refuses_other_variant_base_model_or_recipe(tmp_path, key, value):
    path = _save(tmp_path, 1)
    with pytest.raises(checkpoint.CheckpointMismatch, match=f"{key} = .*this run has '{value}'"):
        checkpoint.load(path, {**META, key: value})


def test_rng_state_restores_python_numpy_torch_streams():
    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_load_trainable_copies_in_place_and_rejects_other_names():
    model, other = _model(), _model()
    with torch.no_grad():
        other[1].weight.add_(1.0)
    storage = model[1].weight.data_ptr()
    checkpoint.load_trainable_(model, trainable_state(other))
    assert torch.equal(model[1].weight, other[1].weight)
    assert model[1].weight.data_ptr() == storage
    with pytest.raises(checkpoint.CheckpointMismatch, match="missing"):
        checkpoint.load_trainable_(model, {"1.weight": other[1].weight})
