"""Every tool and pretrain_ct.py, run as a user runs them, with a bad argument: exit status 2
and one line ``<tool>: error: ...`` on stderr that names the file or key, never a traceback.

The bad values reach each tool's body (a missing or wrong file, a file where a directory is
expected, a value out of range); a few are usage mistakes argparse catches. The processes run
two at a time; each fails before any model or dataset work.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_ct.parallel.launch import RANK_VARIABLES, child_env

REPO = Path(__file__).resolve().parents[2]

# (id, script, arguments, what the line must name); {tmp} is a scratch directory holding
# text.txt (a one-line text file), run/ (a log directory without losses) and nothing else.
CASES = [
    ("convert-max-shard-size", "tools/convert_checkpoint.py",
     "ct-to-hf --input {tmp}/ckpt --output {tmp}/hf --max-shard-size lots", "--max-shard-size"),
    ("convert-summary-json-dir", "tools/convert_checkpoint.py",
     "ct-to-hf --input {tmp}/ckpt --output {tmp}/hf --summary-json {tmp}/missing/s.json", "{tmp}/missing/s.json"),
    ("convert-output-under-file", "tools/convert_checkpoint.py",
     "hf-to-ct --input {tmp}/hf --output {tmp}/text.txt/ct", "{tmp}/text.txt"),
    ("convert-missing-command", "tools/convert_checkpoint.py", "", "direction"),
    ("eval-bpb-output-dir", "tools/eval_bpb.py",
     "--checkpoint {tmp}/ckpt --input {tmp}/text.txt --output {tmp}/missing/o.jsonl", "{tmp}/missing/o.jsonl"),
    ("eval-bpb-device", "tools/eval_bpb.py", "--checkpoint {tmp}/ckpt --input {tmp}/text.txt --device tpu",
     "--device"),
    ("eval-tasks-missing-task", "tools/eval_tasks.py",
     "--checkpoint {tmp}/ckpt --tasks {tmp}/missing.yaml --output {tmp}/o.jsonl", "{tmp}/missing.yaml"),
    ("eval-tasks-output-dir", "tools/eval_tasks.py",
     "--checkpoint {tmp}/ckpt --tasks zh_sentiment --output {tmp}/missing/o.jsonl", "{tmp}/missing/o.jsonl"),
    ("eval-long-missing-haystack", "tools/eval_long.py",
     "--checkpoint {tmp}/ckpt --haystack {tmp}/missing.txt --output {tmp}/o.jsonl", "{tmp}/missing.txt"),
    ("eval-long-nothing-to-run", "tools/eval_long.py",
     "--checkpoint {tmp}/ckpt --no-passkey --output {tmp}/o.jsonl", "--no-passkey"),
    ("expand-blocks-output-file", "tools/expand_blocks.py",
     "--input {tmp}/ckpt --output {tmp}/text.txt --every 2", "{tmp}/text.txt"),
    ("expand-blocks-every-not-int", "tools/expand_blocks.py", "--input a --output b --every x", "--every"),
    ("expand-vocab-missing-text", "tools/expand_vocab.py",
     "--base-tokenizer {tmp}/text.txt --train-text {tmp}/missing.txt --output-dir {tmp}/ev", "{tmp}/missing.txt"),
    ("expand-vocab-max-new-pieces", "tools/expand_vocab.py",
     "--base-tokenizer t --addition-model a --output-dir o --max-new-pieces -1", "--max-new-pieces"),
    ("fit-mixture-out-file", "tools/fit_mixture.py",
     "--observations {tmp}/text.txt --domain-set zh --general-set en --out {tmp}/text.txt", "--out {tmp}/text.txt"),
    ("fit-mixture-ratio-range", "tools/fit_mixture.py",
     "--observations o --domain-set zh --general-set en --out f --ratio-range 2,1", "--ratio-range"),
    ("gguf-to-hf-output-file", "tools/gguf_to_hf.py", "--gguf {tmp}/text.txt --output {tmp}/text.txt",
     "--output {tmp}/text.txt"),
    ("merge-checkpoints-output-file", "tools/merge_checkpoints.py",
     "--inputs {tmp}/ckpt {tmp}/ckpt --output {tmp}/text.txt", "--output {tmp}/text.txt"),
    ("merge-datasets-missing-input", "tools/merge_datasets.py",
     "--input {tmp}/missing --output-prefix {tmp}/merged --no-progress", "{tmp}/missing.idx"),
    ("plot-run-record-without-loss", "tools/plot_run.py", "{tmp}/run", "{tmp}/run/metrics.jsonl:1"),
    ("plot-run-output-dir", "tools/plot_run.py", "{tmp}/run --output {tmp}/missing/run.png", "{tmp}/missing"),
    ("preflight-hf-config-text", "tools/preflight.py", "--hf-config {tmp}/text.txt", "{tmp}/text.txt"),
    ("preflight-vocab-size", "tools/preflight.py", "--tokenizer t --vocab-size 0", "--vocab-size"),
    ("preprocess-output-under-file", "tools/preprocess_data.py",
     "--input {tmp}/text.txt --tokenizer {tmp}/text.txt --output-prefix {tmp}/text.txt/out --no-progress",
     "--output-prefix {tmp}/text.txt"),
    ("preprocess-empty-json-key", "tools/preprocess_data.py",
     "--input {tmp}/text.txt --tokenizer {tmp}/text.txt --output-prefix {tmp}/pp --json-keys ''", "--json-keys"),
    ("sweep-mixture-out-file", "tools/sweep_mixture.py",
     "--config {tmp}/c.yaml --domain zh --general en --ratios 0.5 --out {tmp}/text.txt --dry-run",
     "--out {tmp}/text.txt"),
    ("sweep-mixture-ratios", "tools/sweep_mixture.py",
     "--config c.yaml --domain zh --general en --ratios x --out o", "--ratios"),
    ("upcycle-moe-output-file", "tools/upcycle_moe.py",
     "--input {tmp}/ckpt --output {tmp}/text.txt --num-experts 4", "{tmp}/text.txt"),
    ("upcycle-moe-topk-not-int", "tools/upcycle_moe.py", "--input a --output b --num-experts 4 --topk x", "--topk"),
    ("pretrain-missing-config", "pretrain_ct.py", "--config {tmp}/missing.yaml", "{tmp}/missing.yaml"),
    ("pretrain-bad-value", "pretrain_ct.py", "train.train_iters=abc", "train.train_iters"),
    ("pretrain-config-without-value", "pretrain_ct.py", "--config", "--config"),
    ("pretrain-save-is-a-file", "pretrain_ct.py", "checkpoint.save={tmp}/text.txt", "checkpoint.save {tmp}/text.txt"),
    ("pretrain-save-holds-another-run", "pretrain_ct.py", "checkpoint.save={tmp}/earlier train.train_iters=1",
     "checkpoint.save {tmp}/earlier"),
]  # fmt: skip

TOOLS = [p.name for p in (REPO / "tools").glob("*.py")] + ["pretrain_ct.py"]

# The cases whose check still runs after torch is imported (1-2.5 s of CPU before a one-line
# error): their tools import it at the top of the command's body, and pretrain_ct.py checks
# checkpoint.save once the process group is up. Not moved yet; every other case fails first.
TORCH_BEFORE_THE_ERROR = {
    "convert-max-shard-size",
    "eval-bpb-output-dir",
    "eval-bpb-device",
    "expand-vocab-missing-text",
    "expand-vocab-max-new-pieces",
    "preflight-hf-config-text",
    "pretrain-save-is-a-file",
    "pretrain-save-holds-another-run",
}


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no launcher variables, no debug switch."""
    drop = (*RANK_VARIABLES, "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "MEGATRON_CT_DEBUG", "MASTER_PORT")
    return child_env(extra, threads=1, drop=drop)


def run(script: str, args: str, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """The script's run; ``.imported`` holds the modules it imported (Python's import-time
    report, taken out of ``.stderr``)."""
    argv = shlex.split(args.format(tmp=tmp))
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=user_env(PYTHONPROFILEIMPORTTIME="1", **env),
        timeout=120,
    )
    lines = proc.stderr.splitlines(keepends=True)
    report = [li for li in lines if li.startswith("import time:")]
    proc.imported = {li.rsplit("|", 1)[1].strip() for li in report}
    proc.stderr = "".join(li for li in lines if not li.startswith("import time:"))
    return proc


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli_errors")
    (tmp / "text.txt").write_text("hello world\n")
    (tmp / "run").mkdir()
    (tmp / "earlier" / "iter_0000004").mkdir(parents=True)  # another run's checkpoint root
    (tmp / "earlier" / "latest_checkpointed_iteration.txt").write_text("4\n")
    (tmp / "run" / "metrics.jsonl").write_text('{"iteration": 1, "lr": 0.001}\n')
    return tmp


@pytest.fixture(scope="module")
def results(scratch) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(2) as pool:
        futures = {case[0]: pool.submit(run, case[1], case[2], scratch) for case in CASES}
        return {name: f.result() for name, f in futures.items()}


def test_every_entry_point_is_covered():
    assert sorted({Path(script).name for _, script, _, _ in CASES}) == sorted(TOOLS)


@pytest.mark.parametrize("name, script, args, names", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_is_one_line_exit_2(results, scratch, name, script, args, names):
    proc = results[name]
    tool = Path(script).name
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: "), proc.stderr
    assert names.format(tmp=scratch) in lines[0], lines[0]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_the_error_comes_before_torch_is_imported(results, name):
    """A typo costs the interpreter's start, not torch's import (1-2.5 s on 2 cores)."""
    imported = results[name].imported
    assert "argparse" in imported, "no import-time report"
    assert ("torch" in imported) == (name in TORCH_BEFORE_THE_ERROR), sorted(m for m in imported if "torch" in m)


def test_debug_shows_the_traceback(scratch):
    args = "--input {tmp}/missing --output-prefix {tmp}/merged --no-progress"
    for env, extra in (({}, " --debug"), ({"MEGATRON_CT_DEBUG": "1"}, "")):
        proc = run("tools/merge_datasets.py", args + extra, scratch, **env)
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "DataError: " in proc.stderr


def test_a_port_in_use_is_one_line(scratch):
    """A single process picks a free port itself; a MASTER_PORT someone holds is named."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        proc = run("pretrain_ct.py", "train.train_iters=1 parallel.device=cpu", scratch, MASTER_PORT=str(port))
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"pretrain_ct.py: error: MASTER_PORT {port}: address already in use on 127.0.0.1; expected a free port "
        "(set MASTER_PORT, or let torchrun choose one)"
    ]
