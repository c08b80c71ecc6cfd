"""A mixture of experts' optimizer state resumes only on its side of EP 1 (megatron-core gives the
experts their own optimizer only when EP > 1); the other side is a one-line refusal."""

import pytest

from megatron_ct.checkpoint.manager import check_expert_optimizer_layout
from megatron_ct.checkpoint.meta import CheckpointMeta
from megatron_ct.errors import CheckpointError

MOE = {"family": "mixtral", "num_layers": 2, "num_experts": 4}


def meta(model: dict, ep: int) -> CheckpointMeta:
    config = {"model": model, "parallel": {"expert_model_parallel_size": ep}}
    return CheckpointMeta(config=config, true_vocab_size=500, padded_vocab_size=512)


def test_ep2_optimizer_state_is_refused_at_ep1(mcore_tp1):
    with pytest.raises(CheckpointError) as e:
        check_expert_optimizer_layout(meta(MOE, 2), "ckpt/iter_0000002")
    assert str(e.value).startswith(
        "parallel.expert_model_parallel_size: expected > 1 to resume ckpt/iter_0000002 (saved at EP 2;"
    )
    assert str(e.value).endswith("got 1; or start from its weights with checkpoint.load_weights_only=true")
    check_expert_optimizer_layout(meta(MOE, 1), "ckpt")  # EP1 -> EP1
    check_expert_optimizer_layout(meta({"family": "llama", "num_layers": 2}, 1), "ckpt")  # dense: nothing to check
