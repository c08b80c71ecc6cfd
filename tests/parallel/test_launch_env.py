import subprocess
import sys
import textwrap

import pytest

from megatron_ct.parallel.distributed import expand_slurm_nodelist, read_launch_env

from launch import REPO, run_torchrun


def test_nodelist_expansion():
    assert expand_slurm_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_slurm_nodelist("node7") == ["node7"]
    assert expand_slurm_nodelist("a[8-10]") == ["a8", "a9", "a10"]


def test_torchrun_variables_win():
    env = read_launch_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "1234",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3,
        8,
        1,
        "h",
        1234,
        "torchrun",
    )


def test_srun_without_torchrun():
    env = read_launch_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_NODELIST": "dgx[002-003]",
            "SLURM_JOB_ID": "4242",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 16, 1, "dgx002", "slurm")
    assert env.master_port == 20000 + 4242


def test_single_process_default():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def test_start_up_and_training_collective_timeouts_reach_every_group():
    """parallel.distributed_init_timeout_minutes bounds start-up's collectives in every group
    (megatron-core's too, which would otherwise wait 30 minutes); the trainer then switches all
    of them to parallel.distributed_timeout_minutes."""
    code = """
        import warnings; warnings.filterwarnings("ignore")
        import socket, torch, torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d
        from megatron_ct.config import load_config
        from megatron_ct.parallel.distributed import init_distributed, read_launch_env, set_collective_timeout
        from megatron_ct.training.startup import resolve_layout
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        env = read_launch_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(port)})
        cfg = load_config(None, ["parallel.device=cpu", "parallel.distributed_init_timeout_minutes=7",
                                 "parallel.distributed_timeout_minutes=3"])
        init_distributed(cfg, resolve_layout(cfg, 1, 0), env)
        def minutes():
            return sorted({pg._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60
                           for pg in c10d._world.pg_map})
        print(minutes(), len(c10d._world.pg_map) > 1)
        set_collective_timeout(cfg.parallel.distributed_timeout_minutes)
        print(minutes())
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:2] == ["[7.0] True", "[3.0]"], proc.stdout


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_collective_timeouts_are_positive_whole_minutes(value):
    from megatron_ct.config import load_config
    from megatron_ct.errors import ConfigError

    expected = r"expected int, got 1.5" if value == 1.5 else r"expected an integer >= 1 \(minutes\)"
    for key in ("distributed_timeout_minutes", "distributed_init_timeout_minutes"):
        with pytest.raises(ConfigError, match=rf"parallel.{key}: {expected}"):
            load_config(None, [f"parallel.{key}={value}"])


def test_teardown_joins_every_process_group_thread(tmp_path):
    """After teardown_distributed no process group is alive: its gloo worker threads are joined
    there, while the interpreter runs. A worker left to free a finished collective's tensors at
    interpreter exit aborts the process ("terminate called without an active exception", exit
    -6 after the work was done), which a run's launcher reports as a failure."""
    script = tmp_path / "teardown.py"
    script.write_text(
        textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {str(REPO)!r})
            import torch, torch.distributed as dist
            from megatron.core import parallel_state as ps
            from megatron_ct.config import load_config
            from megatron_ct.parallel.distributed import init_distributed, read_launch_env, teardown_distributed
            from megatron_ct.training.startup import resolve_layout
            def threads():
                return len(os.listdir("/proc/self/task"))
            env = read_launch_env()
            cfg = load_config(None, ["parallel.device=cpu", "--tensor-model-parallel-size", "2"])
            before = threads()
            init_distributed(cfg, resolve_layout(cfg, env.world_size, env.local_rank), env)
            during = threads()
            x = torch.ones(4)
            dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
            del x
            teardown_distributed()
            with open({str(tmp_path)!r} + f"/threads{{env.rank}}", "w") as f:
                f.write(f"{{before}} {{during}} {{threads()}}")
        """)
    )
    proc = run_torchrun(2, script, [])
    # one file per rank: the ranks share stdout, where two prints can interleave
    files = sorted(tmp_path.glob("threads*"))
    assert len(files) == 2, proc.stdout + proc.stderr[-2000:]
    counts = [list(map(int, f.read_text().split())) for f in files]
    for before, during, after in counts:
        assert during > before and after == before, counts
