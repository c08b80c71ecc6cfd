"""torchrun worker: model-level parity of attention backends and of the chunked loss, at any TP.

    torchrun --nproc_per_node N tests/model/parity_worker.py MODE OUT_DIR [key=value ...]

MODE ``attention``: the same tiny GQA LLaMA (same weights) built with attention_backend
local, sdpa and flex; full-vocabulary logits with no mask, a ``[b, 1, s, s]`` document mask
and ``[b, s]`` segment ids, and the parameter gradients of a loss, each compared with local's.
MODE ``loss``: the plain loss path against ``model.loss_chunk_size`` (several chunk sizes):
per-token losses and every parameter gradient. Each rank writes ``OUT_DIR/rank<r>.json``
with the largest differences; the test asserts on them. Extra ``key=value`` words are config
overrides (e.g. ``parallel.sequence_parallel=true``).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

B, S, VOCAB = 2, 48, 500


def config(tp: int, overrides: list[str]):
    from megatron_ct.config import load_config

    return load_config(
        None,
        [
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",  # GQA: 2 query heads per group (1 group per rank at TP2)
            "model.ffn_hidden_size=128",
            f"model.vocab_size={VOCAB}",  # padded: the mask is exercised
            "model.max_position_embeddings=64",
            f"model.make_vocab_size_divisible_by={384 if tp > 1 else 128}",  # TP2: rank 1 mostly padding
            f"data.seq_length={S}",
            "train.precision=fp32",
            "train.micro_batch_size=1",
            f"train.global_batch_size={B}",
            f"parallel.tensor_model_parallel_size={tp}",
            "parallel.device=cpu",
            *overrides,
        ],
    )


def build(cfg, reference_state=None):
    """This rank's model (one chunk); weights copied from ``reference_state`` when given."""
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ct.config import validate_for_world
    from megatron_ct.model.llama import Numerics, build_model

    torch.manual_seed(7)
    model_parallel_cuda_manual_seed(7)
    t = cfg.train
    numerics = Numerics(t.precision, t.recompute_granularity, cfg.data.uses_document_attention_mask)
    chunks, info = build_model(cfg.model, validate_for_world(cfg, int(os.environ["WORLD_SIZE"])), numerics)
    model = chunks[0]
    if reference_state is not None:
        model.load_state_dict(reference_state)
    return model, info


def inputs(vocab: int):
    import torch

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (B, S + 1), generator=g)
    seg = torch.zeros(B, S, dtype=torch.long)  # documents [0, 13), [13, 30), [30, 48) and [0, 40), [40, 48)
    seg[0, 13:] = 1
    seg[0, 30:] = 2
    seg[1, 40:] = 1
    weights = torch.rand(B, S, generator=g)  # d(loss)/d(per-token loss): not all equal
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), seg, weights


def forward(model, tokens, mask, labels=None):
    import torch

    positions = torch.arange(S).unsqueeze(0).expand(B, S)
    return model(input_ids=tokens, position_ids=positions, attention_mask=mask, labels=labels)


def full_logits(model, tokens, mask):
    import torch
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.eval()
    with torch.no_grad():
        local = forward(model, tokens, mask)  # [b, s, V/tp]
    return gather_from_tensor_model_parallel_region(local)[..., :VOCAB]  # [b, s, V] without the -inf padding


def grads(model, tokens, labels, mask, weights):
    """Parameter gradients of sum(weights * per-token loss)."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = forward(model, tokens, mask, labels)  # [b, s]
    (loss * weights).sum().backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def attention_mode(tp, overrides, result):
    from megatron_ct.model.attention import document_mask

    ref_model, info = build(config(tp, ["model.attention_backend=local", *overrides]))
    assert info.attention_backend == "local"
    state = ref_model.state_dict()
    tokens, labels, seg, weights = inputs(VOCAB)
    masks = {"none": None, "dense": document_mask(seg), "segments": seg}
    ref = {k: full_logits(ref_model, tokens, m) for k, m in masks.items()}
    ref_grads = {k: grads(ref_model, tokens, labels, m, weights)[1] for k, m in masks.items()}
    # The reference itself: both mask formats agree, and the mask changes the logits.
    result["local_dense_vs_segments"] = max_diff(ref["dense"], ref["segments"])
    result["local_masked_vs_unmasked"] = max_diff(ref["dense"], ref["none"])
    for backend in ("sdpa", "flex"):
        model, info = build(config(tp, [f"model.attention_backend={backend}", *overrides]), state)
        assert info.attention_backend == backend, info
        for k, m in masks.items():
            result[f"{backend}_{k}_logits"] = max_diff(full_logits(model, tokens, m), ref[k])
            got = grads(model, tokens, labels, m, weights)[1]
            assert got.keys() == ref_grads[k].keys()
            result[f"{backend}_{k}_grads"] = max(max_diff(got[n], ref_grads[k][n]) for n in got)
    result["logit_scale"] = ref["none"].abs().max().item()


def loss_mode(tp, overrides, result):
    ref_model, _ = build(config(tp, overrides))
    state = ref_model.state_dict()
    tokens, labels, _, weights = inputs(VOCAB)
    ref_loss, ref_grads = grads(ref_model, tokens, labels, None, weights)
    for chunk in (1, 16, 20, 48, 64):  # one position, divides S, does not divide S, S, more than S
        model, _ = build(config(tp, [f"model.loss_chunk_size={chunk}", *overrides]), state)
        loss, got = grads(model, tokens, labels, None, weights)
        assert got.keys() == ref_grads.keys(), (sorted(got), sorted(ref_grads))
        result[f"chunk{chunk}_loss"] = max_diff(loss, ref_loss)
        result[f"chunk{chunk}_grads"] = max(max_diff(got[n], ref_grads[n]) for n in got)
        # Eval without labels still returns the (masked) logits of the plain path.
        plain_logits = full_logits(ref_model, tokens, None)
        result[f"chunk{chunk}_logits"] = max_diff(full_logits(model, tokens, None), plain_logits)
    result["loss_mean"] = ref_loss.mean().item()
    result["grad_scale"] = max(g.abs().max().item() for g in ref_grads.values())


def main(mode: str, out_dir: str, overrides: list[str]) -> None:
    import torch.distributed as dist

    from megatron_ct.config import validate_for_world
    from megatron_ct.parallel.distributed import init_distributed, read_launch_env, teardown_distributed

    env = read_launch_env()
    tp = env.world_size
    cfg = config(tp, overrides)
    init_distributed(cfg, validate_for_world(cfg, env.world_size), env)
    result: dict = {}
    try:
        {"attention": attention_mode, "loss": loss_mode}[mode](tp, overrides, result)
        dist.barrier()
    finally:
        teardown_distributed()
    with open(os.path.join(out_dir, f"rank{env.rank}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
