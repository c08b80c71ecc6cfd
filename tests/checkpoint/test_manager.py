"""The checkpoint manager: one registration per component, format 2 checkpoints still resume
exactly, older ones fail in one line naming their format."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ct.checkpoint import verify
from megatron_ct.checkpoint.manager import CheckpointManager, ModelState
from megatron_ct.checkpoint.meta import CheckpointMeta, read_meta

from launch import losses, run_single

SCHEDULE = ["optim.lr_warmup_iters=2", "optim.lr_decay_style=cosine", "train.train_iters=4"]


class Counter:
    """A component a feature might add: plain state, saved and restored by name."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def _tiny_model(seed: int):
    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.model.llama import build_model

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                             "model.vocab_size=200", "parallel.device=cpu", "train.precision=fp32"])  # fmt: skip
    torch.manual_seed(seed)
    chunks, info = build_model(cfg.model, validate_for_world(cfg, 1))
    meta = CheckpointMeta(config={"model": {}}, true_vocab_size=200, padded_vocab_size=info.padded_vocab_size)
    return chunks, meta


@pytest.fixture
def cpu_device_layer():
    """megatron-core's checkpoint code asks torch.cuda for the current device."""
    from megatron_ct.parallel.device import activate_cpu_device_layer, deactivate_cpu_device_layer

    activate_cpu_device_layer()
    yield
    deactivate_cpu_device_layer()


def test_a_registered_component_round_trips(tmp_path, mcore_tp1, cpu_device_layer):
    chunks, meta = _tiny_model(seed=1)
    saver = CheckpointManager()
    saver.register("model", ModelState(chunks))
    saver.register("counter", Counter(7))
    path = saver.save(str(tmp_path), meta)
    assert read_meta(path).state == {"counter": {"value": 7}}

    fresh, _ = _tiny_model(seed=2)
    key = "decoder.layers.0.mlp.linear_fc1.weight"
    assert not torch.equal(fresh[0].state_dict()[key], chunks[0].state_dict()[key])
    loader, counter = CheckpointManager(), Counter()
    loader.register("model", ModelState(fresh))
    loader.register("counter", counter)
    loader.load(path, read_meta(path), weights_only=True)
    assert counter.value == 0, "a weights-only load restores the model alone"
    for (name, a), b in zip(chunks[0].state_dict().items(), fresh[0].state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    loader.load(path, read_meta(path))
    assert counter.value == 7
    with pytest.raises(ValueError, match="registered twice"):
        loader.register("counter", Counter())


def _rewrite_common(path, edit) -> None:
    """Edit a checkpoint's common.pt as an older megatron-ct would have written it, and its manifest."""
    file = path / "common.pt"
    common = torch.load(file, weights_only=True)
    edit(common)
    torch.save(common, file)
    verify.write_manifest(str(path), None)


def _as_format_2(common: dict) -> None:
    """Format 2: the data position and base line were fields of the record, the scheduler's state
    sat beside the record, and there was no stage record."""
    ct = common["ct"]
    state = ct.pop("state")
    ct.update(format_version=2, data=state["data"], evaluation=state["evaluator"])
    common["scheduler"] = state["scheduler"]


@pytest.mark.slow
def test_format_2_checkpoint_resumes_exactly_and_format_1_is_refused(tmp_path):
    run_single(SCHEDULE + [f"logging.log_dir={tmp_path / 'straight'}"])
    ck = tmp_path / "ck"
    run_single(SCHEDULE + ["train.exit_interval=2", f"checkpoint.save={ck}"])
    _rewrite_common(ck / "iter_0000002", _as_format_2)
    assert read_meta(str(ck / "iter_0000002")).format_version == 2
    proc = run_single(SCHEDULE + [f"checkpoint.load={ck}", f"logging.log_dir={tmp_path / 'resumed'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4] and [resumed[i] for i in (3, 4)] == [straight[i] for i in (3, 4)]

    _rewrite_common(ck / "iter_0000002", lambda c: c["ct"].update(format_version=1))
    (ck / "latest_checkpointed_iteration.txt").write_text("2")
    proc = run_single(SCHEDULE + [f"checkpoint.load={ck}"])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        f"pretrain_ct.py: error: {ck / 'iter_0000002'}: checkpoint format 1 predates this megatron-ct's optimizer "
        "layout; expected format 2 or newer to resume (start from its weights with checkpoint.load_weights_only=true)"
    ]


def test_stage_tracker_names_an_edited_schedule():
    from megatron_ct.config import load_config
    from megatron_ct.config.schedule import Schedule
    from megatron_ct.training.stages import StageTracker

    def schedule(first_iters: int) -> Schedule:
        stages = [{"name": "warm", "iters": first_iters, "blend": {"a": 1}}, {"name": "mix", "blend": {"a": 1}}]
        words = ["data.source=indexed", "data.datasets={a: a_text_document}", f"data.stages={json.dumps(stages)}"]
        return Schedule.from_config(load_config(None, [*words, "train.train_iters=20"]))

    saved = StageTracker(schedule(10))
    saved.enter(saved.schedule.stage_at(6))
    for edited, iteration, note in [
        (10, 6, None),
        (5, 6, "the checkpoint was saved in stage 'warm' (iterations 1-10); the schedule now puts iteration 7 in "
               "stage 'mix': continuing there"),
        (8, 6, "the checkpoint was saved in stage 'warm' (iterations 1-10); the schedule now runs it over "
               "iterations 1-8"),
    ]:  # fmt: skip
        tracker = StageTracker(schedule(edited))
        tracker.load_state_dict(saved.state_dict())
        assert tracker.resume_note(iteration) == note
