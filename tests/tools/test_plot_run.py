import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("matplotlib")


def test_plot_has_training_and_every_validation_set(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    from plot_run import plot, stage_starts

    train = [{"iteration": i, "loss": 6 - i / 10, "stage": "s1" if i <= 5 else "s2"} for i in range(1, 11)]
    evals = [
        {"iteration": i, "set": s, "loss": 3.0, "bits_per_byte": 2 - i / 20} for i in (5, 10) for s in ("zh", "en")
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    assert stage_starts(train, evals) == [(1, "s1"), (6, "s2")]
    out = plot(str(tmp_path), str(tmp_path / "run.png"))
    assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_directory_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_run.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no metrics.jsonl or eval.jsonl" in proc.stderr


def test_original_base_and_iteration_0_are_two_lines(tmp_path):
    """After a vocabulary expansion the model at iteration 0 is not the base: both are drawn,
    named apart, and a reference for a set the run did not evaluate is a one-line error."""
    sys.path.insert(0, str(REPO / "tools"))
    from plot_run import eval_series

    evals = [
        {"iteration": i, "set": s, "loss": 3.0, "bits_per_byte": b, **({"trigger": "baseline"} if i == 0 else {})}
        for i, b in ((0, 3.06), (24, 2.3))
        for s in ("zh", "en")
    ]
    labels = {label: ys for _, label, _, ys in eval_series(evals, {"zh": 2.6})}
    assert labels["zh at iteration 0"] == [3.06] and labels["zh original base (own tokenizer)"] == [2.6]
    assert "en original base (own tokenizer)" not in labels and labels["en"] == [3.06, 2.3]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    run = [sys.executable, str(REPO / "tools" / "plot_run.py"), str(tmp_path)]
    ok = subprocess.run([*run, "--reference", "zh=2.6"], capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "run.png").is_file(), ok.stderr
    bad = subprocess.run([*run, "--reference", "ja=2.6"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--reference ja" in bad.stderr, bad.stderr


def test_mixture_of_experts_run_gets_a_router_plot(tmp_path):
    """Records with router health (megatron_ct/training/router_health.py) add ``run_router.png``:
    the losses and one heat map per layer, the load scaled to an even share."""
    sys.path.insert(0, str(REPO / "tools"))
    from plot_run import main, router_series

    train = [
        {
            "iteration": i,
            "loss": 6 - i / 10,
            "moe_aux_loss": 1.0 + 0.01 * i,
            "moe_z_loss": 2.0,
            "moe_dropped_tokens": i,
            "moe_expert_load": [[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]],
        }
        for i in (1, 2, 4)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    iterations, loads = router_series(train)
    assert iterations == [1, 2, 4] and loads[0] == [[2.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "run_router.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "loss": 6.0}) + "\n")  # a dense run
    (tmp_path / "run_router.png").unlink()
    assert main([str(tmp_path)]) == 0 and not (tmp_path / "run_router.png").exists()
