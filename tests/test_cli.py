"""megatron_ct.cli: the one runner of every command line (usage errors, expected failures,
--debug, a tool's own exit codes). The tools themselves: tests/tools/test_cli_errors.py."""

from __future__ import annotations

import pytest

from megatron_ct.cli import (
    ToolParser,
    check_output_dir,
    check_output_file,
    float_above,
    int_at_least,
    record_exit_status,
    run_cli,
)
from megatron_ct.errors import ConfigError, DataError


class Stopped(Exception):
    pass


def parser() -> ToolParser:
    p = ToolParser("/somewhere/tools/demo.py", "A demo tool.")
    p.add_argument("--count", type=int_at_least(1), default=1)
    p.add_argument("--ratio", type=float_above(0))
    return p


def run(body, argv=(), **kwargs) -> int:
    return run_cli(parser(), body, list(argv), **kwargs)


def test_usage_error_is_one_line_without_the_usage_block(capsys):
    assert run(lambda args: 0, ["--count", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "demo.py: error: argument --count: expected an integer >= 1, got '0' (see --help)\n"
    assert run(lambda args: 0, ["--ratio", "nan"]) == 2
    assert (
        capsys.readouterr().err == "demo.py: error: argument --ratio: expected a number > 0, got 'nan' (see --help)\n"
    )
    assert run(lambda args: 0, ["--bogus"]) == 2
    assert capsys.readouterr().err == "demo.py: error: unrecognized arguments: --bogus (see --help)\n"


def test_help_returns_0(capsys):
    assert run(lambda args: 1, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: demo.py") and "A demo tool." in out and "--debug" in out


def test_sub_command_errors_name_the_tool_and_the_command(capsys):
    p = ToolParser("tool.py")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("go").add_argument("--input", required=True)
    assert run_cli(p, lambda args: 0, ["go"]) == 2
    assert capsys.readouterr().err == (
        "tool.py: error: go: the following arguments are required: --input (see --help)\n"
    )
    # --debug is known before and after the command; given before, the sub-parser keeps it.
    assert run_cli(p, lambda args: args.debug, ["--debug", "go", "--input", "x"]) is True
    assert run_cli(p, lambda args: args.debug, ["go", "--input", "x", "--debug"]) is True


def test_expected_failures_are_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.delenv("MEGATRON_CT_DEBUG", raising=False)

    def body(args):
        raise DataError("data/x.idx: missing;\n expected the .bin/.idx pair")

    assert run(body) == 2
    assert capsys.readouterr().err == "demo.py: error: data/x.idx: missing; expected the .bin/.idx pair\n"

    def missing(args):
        open("/nonexistent/file.txt")

    assert run(missing, expected=(OSError,)) == 2
    assert capsys.readouterr().err == "demo.py: error: No such file or directory (/nonexistent/file.txt)\n"
    with pytest.raises(FileNotFoundError):  # not declared: a bug, with its traceback
        run(missing)


def test_debug_lets_the_exception_through(monkeypatch):
    def body(args):
        raise ConfigError("--count: expected 1")

    with pytest.raises(ConfigError):
        run(body, ["--debug"])
    monkeypatch.setenv("MEGATRON_CT_DEBUG", "1")
    with pytest.raises(ConfigError):
        run(body)


def test_a_tool_maps_its_own_failures_to_exit_codes(capsys, monkeypatch):
    monkeypatch.delenv("MEGATRON_CT_DEBUG", raising=False)
    looked_up = []

    def codes():
        looked_up.append(True)
        return {Stopped: 3}

    def body(args):
        raise Stopped("iteration 2: non-finite grad norm")

    assert run(lambda args: 1, exit_codes=codes) == 1 and not looked_up  # only looked up on a failure
    assert run(body, exit_codes=codes) == 3
    assert capsys.readouterr().err == "demo.py: iteration 2: non-finite grad norm\n"
    with pytest.raises(Stopped):
        run(body, ["--debug"], exit_codes={Stopped: 3})
    with pytest.raises(RuntimeError):
        run(lambda args: (_ for _ in ()).throw(RuntimeError("bug")), exit_codes={Stopped: 3})


def test_extra_args_go_to_the_body():
    assert run(lambda args, extras: extras == ["train.seed=1", "--lr", "2"], ["train.seed=1", "--lr", "2"],
               extra_args=True) is True  # fmt: skip


def test_output_paths_are_checked_before_any_work(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert check_output_dir(str(tmp_path / "new" / "deeper"), "--out") == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # nothing created
    with pytest.raises(ConfigError, match=rf"^--out {blocker}: is a file; expected a directory$"):
        check_output_dir(str(blocker), "--out")
    with pytest.raises(ConfigError, match=rf"^--out {blocker}/sub: {blocker} is a file; expected a path under"):
        check_output_dir(str(blocker / "sub"), "--out")
    assert check_output_file(str(tmp_path / "o.json"), "--output") == str(tmp_path / "o.json")
    with pytest.raises(ConfigError, match=rf"^--output {tmp_path}: is a directory; expected a file name$"):
        check_output_file(str(tmp_path), "--output")
    with pytest.raises(ConfigError, match=rf"^--output {tmp_path}/no/o.json: no directory {tmp_path}/no; expected"):
        check_output_file(str(tmp_path / "no" / "o.json"), "--output")


def test_exit_status_is_left_for_the_batch_script(tmp_path, monkeypatch):
    # srun's status is not the trainers' (megatron_ct/cli.py record_exit_status): a config error
    # of pretrain_ct.py leaves "2" as rank<RANK> where the sbatch script looks.
    import pretrain_ct

    monkeypatch.delenv("MEGATRON_CT_STATUS_DIR", raising=False)
    record_exit_status(3)  # not set: nothing written, nothing fails
    monkeypatch.setenv("MEGATRON_CT_STATUS_DIR", str(tmp_path / "status" / "42.0"))
    monkeypatch.setenv("RANK", "3")
    assert pretrain_ct.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert (tmp_path / "status" / "42.0" / "rank3").read_text() == "2\n"
    assert [p.name for p in (tmp_path / "status" / "42.0").iterdir()] == ["rank3"]
