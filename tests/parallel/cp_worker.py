"""torchrun worker: one forward/backward of a tiny GQA LLaMA under context parallelism.

    torchrun --nproc_per_node CP tests/parallel/cp_worker.py OUT_DIR [key=value ...]

All ranks form one CP group (TP1 PP1 DP1). The same weights (seeded; CP does not shard them)
see the same batch, which each rank cuts with megatron_ct.parallel.context.shard_batch; the
per-token losses, weighted, are summed and back-propagated, and the parameter gradients are
summed over the CP group (what DDP does over DP x CP). Rank 0 writes ``OUT_DIR/result.pt``:
for each mask kind, ``none`` (plain causal) and ``segments`` (packed documents), the per-token
losses put back in sequence order and every gradient, for the test to compare with CP1's.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

B, S, VOCAB = 2, 48, 500


def main(out_dir: str, overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from megatron_ct.config import load_config, validate_for_world
    from megatron_ct.parallel.distributed import init_distributed, read_launch_env, teardown_distributed

    env = read_launch_env()
    cfg = load_config(
        None,
        [
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.ffn_hidden_size=128",
            f"model.vocab_size={VOCAB}",
            "model.max_position_embeddings=64",
            f"data.seq_length={S}",
            "train.precision=fp32",
            "train.micro_batch_size=1",
            f"train.global_batch_size={B}",
            f"parallel.context_parallel_size={env.world_size}",
            "parallel.device=cpu",
            *overrides,
        ],
    )
    layout = validate_for_world(cfg, env.world_size)
    init_distributed(cfg, layout, env)
    try:
        results = {}
        for mask in ("none", "segments"):
            results[mask] = one_pass(cfg, layout, mask)
        if env.rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        teardown_distributed()


def one_pass(cfg, layout, mask: str) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ct.model.llama import Numerics, build_model
    from megatron_ct.parallel.context import gather_sequence_values, shard_batch

    torch.manual_seed(7)
    model_parallel_cuda_manual_seed(7)
    chunks, _ = build_model(cfg.model, layout, Numerics("fp32", None, mask == "segments"))
    model = chunks[0]
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (B, S + 1), generator=g)
    seg = torch.zeros(B, S, dtype=torch.long)  # documents [0, 13), [13, 30), [30, 48) and [0, 40), [40, 48)
    seg[0, 13:] = 1
    seg[0, 30:] = 2
    seg[1, 40:] = 1
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(S).unsqueeze(0).expand(B, S).contiguous(),
        "loss_mask": torch.rand(B, S, generator=g),  # d(loss)/d(per-token loss): not all equal
    }
    if mask == "segments":
        batch["segment_ids"] = seg
    cp, group = ps.get_context_parallel_world_size(), ps.get_context_parallel_group()
    part = shard_batch(batch, cp, ps.get_context_parallel_rank())
    model.train()
    losses = model(
        input_ids=part["tokens"],
        position_ids=part["position_ids"],
        attention_mask=part.get("segment_ids"),
        labels=part["labels"],
    )  # [b, s / cp]
    (losses * part["loss_mask"]).sum().backward()
    grads = {}
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=group)
        grads[name] = p.grad.detach().clone()
    # Per-token losses back in sequence order: the same gather attention uses.
    full = gather_sequence_values(losses, 1, group) if cp > 1 else losses.detach()
    return {"losses": full, "grads": grads}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
