"""torchrun worker for test_logits_parity.py: our logits for converted checkpoints at one layout.

    torchrun --nproc_per_node N tests/convert/logits_worker.py MANIFEST.json

The manifest gives ``tp``, ``pp``, optionally ``ep`` (MoE cases only), a ``tokens`` file
(``[b, s]`` int64) and ``cases``: ``{"ckpt": DIR, "out": FILE}``. For each case the model is
built from the checkpoint's own config at this layout, loaded weights-only (as the trainer
does) and run forward-only; the last pipeline stage's first TP rank (of the first data-parallel
rank) saves the logits ``[b, s, vocab]`` to ``out``.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(manifest_path: str) -> None:
    import torch
    from megatron.core import parallel_state as ps

    from megatron_ct.checkpoint.manager import load_weights
    from megatron_ct.checkpoint.meta import read_meta
    from megatron_ct.checkpoint.root import resolve_load_dir
    from megatron_ct.config import (
        CTConfig,
        DataConfig,
        ModelConfig,
        ParallelConfig,
        TrainConfig,
        validate_for_world,
    )
    from megatron_ct.model.inference import forward_logits
    from megatron_ct.model.llama import Numerics, build_model
    from megatron_ct.parallel.distributed import init_distributed, read_launch_env, teardown_distributed

    with open(manifest_path) as f:
        spec = json.load(f)
    tokens = torch.load(spec["tokens"])
    env = read_launch_env()

    def config_for(ckpt: str) -> CTConfig:
        model = read_meta(resolve_load_dir(ckpt)[0]).model
        return CTConfig(
            model=ModelConfig(**model),
            parallel=ParallelConfig(
                tensor_model_parallel_size=spec["tp"],
                pipeline_model_parallel_size=spec["pp"],
                expert_model_parallel_size=spec.get("ep", 1),
                device="cpu",
            ),
            train=TrainConfig(precision="fp32", micro_batch_size=1, global_batch_size=2),
            # Training's seq_length limit; forward_logits runs the whole input (dynamic NTK
            # RoPE is tested beyond max_position_embeddings).
            data=DataConfig(seq_length=min(tokens.shape[1], model["max_position_embeddings"])),
        )

    first = config_for(spec["cases"][0]["ckpt"])
    layout = validate_for_world(first, env.world_size)
    init_distributed(first, layout, env)
    try:
        for case in spec["cases"]:
            cfg = config_for(case["ckpt"])
            chunks, _ = build_model(cfg.model, validate_for_world(cfg, env.world_size), Numerics("fp32"))
            load_weights(case["ckpt"], chunks)
            logits = forward_logits(chunks, tokens, cfg.model.vocab_size)
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                torch.save(logits, case["out"])
    finally:
        teardown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
