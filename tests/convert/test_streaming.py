"""Building blocks: QKV/SwiGLU (de)interleaving, streaming writers that hold one tensor at a time."""

import gc
import json
import weakref

import pytest
import torch
from safetensors import safe_open

from megatron_ct.checkpoint.dist_io import ChunkSpec, DistCheckpointReader, write_dist_checkpoint
from megatron_ct.convert import hf_layout as L
from megatron_ct.convert.hf_files import HFWeights, SafetensorsShardWriter


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 1)])
def test_qkv_fuse_is_per_group_and_inverts(heads, groups):
    d, h = 3, 5
    q, k, v = torch.randn(heads * d, h), torch.randn(groups * d, h), torch.randn(groups * d, h)
    fused = L.fuse_qkv(q, k, v, groups)
    per_group = (heads // groups + 2) * d
    # Group 0: its query heads, then its key head, then its value head (megatron-core's layout).
    assert torch.equal(fused[: heads // groups * d], q[: heads // groups * d])
    assert torch.equal(fused[heads // groups * d : heads // groups * d + d], k[:d])
    assert torch.equal(fused[per_group - d : per_group], v[:d])
    assert all(torch.equal(a, b) for a, b in zip(L.split_qkv(fused, heads, groups), (q, k, v), strict=True))
    bias = [t[:, 0].contiguous() for t in (q, k, v)]  # 1-D, as Qwen2's QKV bias
    assert torch.equal(L.fuse_qkv(*bias, groups), fused[:, 0])
    assert all(
        torch.equal(a, b) for a, b in zip(L.split_qkv(L.fuse_qkv(*bias, groups), heads, groups), bias, strict=True)
    )


def test_gate_up_and_vocab_padding():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    assert all(torch.equal(a, b) for a, b in zip(L.split_gate_up(L.fuse_gate_up(gate, up)), (gate, up), strict=True))
    padded = L.pad_vocab(gate, 8)
    assert padded.shape == (8, 4) and torch.equal(padded[:6], gate) and not padded[6:].any()


def test_dist_writer_produces_one_chunk_at_a_time_and_regions_read_back(tmp_path):
    """Chunks are produced when written and released after: at most the previous one is
    still referenced when the next is produced."""
    layers, rows, cols = 6, 10, 8
    alive: list[weakref.ref] = []
    max_alive = 0

    def value(i: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=torch.Generator().manual_seed(i))

    def produce(i: int) -> torch.Tensor:
        nonlocal max_alive
        gc.collect()
        max_alive = max(max_alive, sum(r() is not None for r in alive))
        t = value(i)
        alive.append(weakref.ref(t))
        return t

    chunks = [
        ChunkSpec("stack", (layers, rows, cols), (i, 0, 0), (1, rows, cols), torch.float32, lambda i=i: produce(i))
        for i in range(layers)
    ]
    write_dist_checkpoint(str(tmp_path / "ck"), chunks, {"obj/shard_0_1": b"x"}, {"ct": {"iteration": 0}})
    assert max_alive <= 1, f"{max_alive} earlier chunks were still in memory when the next was produced"
    reader = DistCheckpointReader(str(tmp_path / "ck"))
    assert reader.shape("stack") == (layers, rows, cols)
    assert torch.equal(reader.read("stack", (2, 0, 0), (1, rows, cols))[0], value(2))
    # A region across chunk boundaries: rows 3..7 of layers 1..4.
    region = reader.read("stack", (1, 3, 0), (4, 5, cols))
    assert torch.equal(region, torch.stack([value(i)[3:8] for i in range(1, 5)]))
    assert json.loads((tmp_path / "ck" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"


def test_safetensors_writer_shards_and_reads_back(tmp_path):
    tensors = {f"t{i}": torch.randn(16, 8).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(5)}
    writer = SafetensorsShardWriter(
        str(tmp_path), [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()], max_shard_bytes=1024
    )
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tensors.values())
    for k, v in tensors.items():
        with safe_open(tmp_path / index["weight_map"][k], "pt") as f:
            assert torch.equal(f.get_tensor(k), v) and f.metadata() == {"format": "pt"}
    ours = HFWeights(str(tmp_path))  # our own reader on the same files
    assert all(torch.equal(ours.load(k), v) and ours.dtype(k) == v.dtype for k, v in tensors.items())
