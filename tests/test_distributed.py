"""Rank discovery from launcher variables (torchrun, srun, none), pure and without processes."""

import pytest

from xfusion.engine import RankInfo, discover_ranks, expand_nodelist


def _srun_task(procid: int, **extra: str) -> dict[str, str]:
    """Exactly what `srun -n 2` on one host sets for task `procid` (the variables we read)."""
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(procid),
            "SLURM_JOB_NODELIST": "node17", "SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_ID": "0", **extra}


@pytest.mark.parametrize("nodelist,hosts", [
    ("node17", ["node17"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("node-[009-011]", ["node-009", "node-010", "node-011"]),
    ("r[1-2]n[08-09],login", ["r1n08", "r1n09", "r2n08", "r2n09", "login"]),
])
def test_expand_nodelist_expands_slurm_ranges_keeping_zero_padding(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_srun_two_tasks_agree_on_rank_world_master_and_port():
    infos = [discover_ranks(_srun_task(r)) for r in (0, 1)]
    assert infos == [RankInfo(r, 2, r, "node17", 15000 + 4242 % 20000, "slurm") for r in (0, 1)]


def test_srun_master_port_and_addr_variables_win_over_derived_ones():
    info = discover_ranks(_srun_task(1, MASTER_PORT="29511", MASTER_ADDR="10.0.0.3"))
    assert (info.master_addr, info.master_port) == ("10.0.0.3", 29511)
    info = discover_ranks(_srun_task(0, SLURM_JOB_NODELIST="gpu[03-04]"))
    assert info.master_addr == "gpu03"
    info = discover_ranks(_srun_task(0, SLURM_STEP_NODELIST="gpu04",
                                     SLURM_JOB_NODELIST="gpu[03-04]"))
    assert info.master_addr == "gpu04"  # the step's first host runs its task 0


def test_torchrun_variables_are_taken_as_set():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h1",
           "MASTER_PORT": "29500"}
    assert discover_ranks(env) == RankInfo(3, 4, 1, "h1", 29500, "torchrun")


def test_torchrun_under_srun_one_launcher_per_task_is_accepted():
    env = {**_srun_task(1), "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
           "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "node17", "MASTER_PORT": "29500"}
    assert discover_ranks(env).source == "torchrun"


def test_world_size_disagreeing_with_the_srun_step_is_an_error():
    env = {**_srun_task(0), "RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "x", "MASTER_PORT": "1"}
    with pytest.raises(ValueError, match=r"WORLD_SIZE = 4 but this srun step has 2 tasks"):
        discover_ranks(env)


def test_batch_script_of_a_two_task_allocation_is_one_process():
    # sbatch --ntasks=2 running `python -m xfusion.train` itself (no srun): SLURM_PROCID and
    # SLURM_NTASKS are set, but no step launched a second task.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node17"}
    for batch in ({}, {"SLURM_STEP_ID": str(0xFFFFFFFB)}):  # no step id, or the batch pseudo-step
        info = discover_ranks({**env, **batch}, free_port=lambda: 40001)
        assert info == RankInfo(0, 1, 0, "127.0.0.1", 40001, "single")


def test_nothing_set_is_one_process_on_a_free_local_port():
    assert discover_ranks({}, free_port=lambda: 40002) == RankInfo(0, 1, 0, "127.0.0.1", 40002,
                                                                   "single")
    assert discover_ranks({"MASTER_PORT": "29999"}).master_port == 29999


@pytest.mark.parametrize("env,match", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "no MASTER_PORT and no SLURM_JOB_ID"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "rank 2 is outside"),
    ({"RANK": "0"}, "WORLD_SIZE not set"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "no MASTER_ADDR"),
    ({**_srun_task(0), "SLURM_JOB_ID": "x"}, "SLURM_JOB_ID = 'x': not an integer"),
])
def test_inconsistent_launcher_variables_are_errors(env, match):
    with pytest.raises(ValueError, match=match):
        discover_ranks(env)


def test_srun_without_job_id_or_port_is_an_error():
    env = _srun_task(0)
    del env["SLURM_JOB_ID"]
    with pytest.raises(ValueError, match="no MASTER_PORT"):
        discover_ranks(env)


def test_accumulation_is_derived_from_the_token_budgets_and_must_divide():
    from xfusion.config import ConfigError
    from xfusion.data.mixing import accumulation_steps

    assert accumulation_steps(8 * 44, None, 44, 2) == (8, 4, 1)  # the whole share at once
    assert accumulation_steps(8 * 44, 0, 44, 2) == (8, 4, 1)
    assert accumulation_steps(8 * 44, 2 * 44 + 10, 44, 2) == (8, 2, 2)
    with pytest.raises(ConfigError, match=r"micro_tokens_per_batch = 132 .* x 2 ranks does not "
                                          r"divide config.training.tokens_per_batch = 352"):
        accumulation_steps(8 * 44, 3 * 44, 44, 2)
    with pytest.raises(ConfigError, match=r"tokens_per_batch = 132: fits 3 samples .* 2 ranks"):
        accumulation_steps(3 * 44, None, 44, 2)


def test_micro_token_budget_above_the_global_one_is_a_config_error(tiny_config):
    from xfusion.config import ConfigError, load_run

    with pytest.raises(ConfigError, match=r"training.micro_tokens_per_batch = 4096"):
        load_run(tiny_config({"training.tokens_per_batch": 2048,
                              "training.micro_tokens_per_batch": 4096}))
