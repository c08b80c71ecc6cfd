"""A run writes only into its own checkpoints: a fresh or weights-only start into a save root
that holds another run's checkpoints is refused at start-up (its iteration N would replace
theirs and its logs would join theirs); resuming that root is what it is for."""

from __future__ import annotations

import pytest

from megatron_ct.checkpoint.root import iter_dir, write_tracker
from megatron_ct.config.loader import build_config
from megatron_ct.errors import ConfigError
from megatron_ct.training.startup import _check_save_is_this_runs


def cfg(save, load=None, weights_only=False):
    return build_config({"checkpoint": {"save": str(save), "load": load and str(load),
                                        "load_weights_only": weights_only}})  # fmt: skip


@pytest.fixture
def earlier_run(tmp_path):
    root = tmp_path / "run"
    (root / "iter_0000004").mkdir(parents=True)
    write_tracker(str(root), 4)
    return root


def test_fresh_or_weights_only_start_into_an_earlier_run_is_refused(tmp_path, earlier_run):
    base = tmp_path / "base" / "iter_0000000"
    for config, load_dir in ((cfg(earlier_run), None), (cfg(earlier_run, base.parent, True), str(base))):
        with pytest.raises(ConfigError) as e:
            _check_save_is_this_runs(config, load_dir)
        msg = str(e.value)
        assert f"checkpoint.save {earlier_run}" in msg and "latest iteration 4" in msg
        assert f"checkpoint.load={earlier_run}" in msg and "\n" not in msg


def test_weights_only_from_the_save_root_itself_names_the_flag(earlier_run):
    with pytest.raises(ConfigError, match="checkpoint.load_weights_only=false to resume it"):
        _check_save_is_this_runs(cfg(earlier_run, earlier_run, True), iter_dir(str(earlier_run), 4))


def test_resuming_the_save_root_and_empty_roots_pass(tmp_path, earlier_run):
    _check_save_is_this_runs(cfg(earlier_run, earlier_run), iter_dir(str(earlier_run), 4))
    _check_save_is_this_runs(cfg(tmp_path / "new", tmp_path / "base", True), str(tmp_path / "base" / "iter_0000000"))
    _check_save_is_this_runs(cfg(tmp_path / "new"), None)
