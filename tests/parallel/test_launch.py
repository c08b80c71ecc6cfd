"""megatron_ct/parallel/launch.py: the torchrun command line and the environment of a launched trainer."""

import socket
import sys

import pytest

from megatron_ct.parallel.launch import RANK_VARIABLES, child_env, free_port, tcp_init_method, torchrun_command


def test_torchrun_command_with_a_port():
    cmd = torchrun_command(2, "pretrain_ct.py", ["--config", "r.yaml"], master_port=1234)
    assert cmd == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "1234",
        "pretrain_ct.py",
        "--config",
        "r.yaml",
    ]


def test_torchrun_command_standalone_default_port_and_plain_process():
    standalone = torchrun_command(8, "s.py", ["a"], standalone=True, python="py")
    assert standalone == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", "s.py", "a"]
    assert "--master_port" not in torchrun_command(1, "s.py")  # torchrun's own default
    assert torchrun_command(1, "s.py", ["a"], standalone=True, plain_for_one=True) == [sys.executable, "s.py", "a"]
    assert torchrun_command(2, "s.py", plain_for_one=True)[1:3] == ["-m", "torch.distributed.run"]


def test_torchrun_command_refuses_contradictions():
    with pytest.raises(ValueError, match="nproc=0"):
        torchrun_command(0, "s.py")
    with pytest.raises(ValueError, match="standalone"):
        torchrun_command(2, "s.py", standalone=True, master_port=1)


def test_child_env(monkeypatch):
    for key in RANK_VARIABLES:
        monkeypatch.setenv(key, "3")
    monkeypatch.setenv("KEEP", "1")
    env = child_env({"RANK": "0", "X": "y"}, threads=1, drop=RANK_VARIABLES)
    assert env["PYTHONWARNINGS"] == "ignore" and env["OMP_NUM_THREADS"] == "1" and env["KEEP"] == "1"
    assert env["RANK"] == "0" and env["X"] == "y"  # the caller's own values come last
    assert "WORLD_SIZE" not in env and "LOCAL_RANK" not in env
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert "OMP_NUM_THREADS" not in child_env()  # no thread count unless asked for


def test_free_port_can_be_bound():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))
    assert tcp_init_method().startswith("tcp://127.0.0.1:")
