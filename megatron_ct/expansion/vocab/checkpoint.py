"""Grow the vocabulary of a megatron-ct checkpoint (after a tokenizer merge).

The input embedding and, when untied, the output layer are rebuilt with
:func:`megatron_ct.expansion.vocab.resize.resize_vocab_matrix` (old rows bit-identical, new rows
by the plan's init, padding for ``make_vocab_size_divisible_by``); every other tensor is
copied. Checkpoints store global tensors, so this serves a checkpoint saved at any TP/PP
and the result loads at any TP/PP (the trainer pads the rows further for larger TP). The
result records ``vocab_expansion`` (old and new sizes) for ``train.trainable_params=
new_vocab_rows``.
"""

from __future__ import annotations

from megatron_ct.checkpoint.dist_io import ChunkSpec
from megatron_ct.checkpoint.keys import EMBEDDING, OUTPUT
from megatron_ct.checkpoint.rewrite import copied, model_keys, open_checkpoint, write_weights_only
from megatron_ct.errors import ConversionError
from megatron_ct.expansion.vocab.record import expansion_record
from megatron_ct.expansion.vocab.resize import VocabResizePlan, resize_vocab_matrix


def resize_ct_checkpoint(ckpt: str, out_dir: str, plan: VocabResizePlan, overwrite: bool = False) -> int:
    """Write the resized checkpoint to the save root ``out_dir``; returns its padded rows."""
    path, reader, meta = open_checkpoint(ckpt)
    true_vocab = meta.true_vocab_size
    if true_vocab != plan.old_vocab_size:
        raise ConversionError(
            f"{path}: the checkpoint's vocabulary has {true_vocab} tokens but the base tokenizer has "
            f"{plan.old_vocab_size}; expected the tokenizer the checkpoint was trained with"
        )
    model = meta.model
    if plan.divisible_by != model["make_vocab_size_divisible_by"]:
        raise ConversionError(
            f"plan divisible_by={plan.divisible_by}: expected the checkpoint's "
            f"model.make_vocab_size_divisible_by={model['make_vocab_size_divisible_by']}"
        )
    keys = model_keys(reader)
    if OUTPUT not in keys and (plan.untie or plan.output_init not in (None, plan.init)):
        # Untying here would also need the model config and the manifest to grow an output layer.
        raise ConversionError(
            f"{path}: output rows init {plan.output_init} / untie (--output-init, --untie-embeddings) on a checkpoint "
            "with tied embeddings: not supported for megatron-ct checkpoints; expected --hf-model (then hf-to-ct)"
        )
    padded = plan.padded_size()
    chunks: list[ChunkSpec] = []
    for key in keys:
        if key in (EMBEDDING, OUTPUT):
            hidden = reader.shape(key)[1]

            def produce(k=key):
                return resize_vocab_matrix(reader.read(k), plan if k == EMBEDDING else plan.for_output())  # [padded, h]

            chunks.append(ChunkSpec(key, (padded, hidden), (0, 0), (padded, hidden), reader.dtype(key), produce))
        else:
            chunks.extend(copied(reader, key))
    model["vocab_size"] = plan.new_vocab_size
    meta.true_vocab_size, meta.padded_vocab_size = plan.new_vocab_size, padded
    meta.vocab_expansion = expansion_record(plan.old_vocab_size, plan.new_vocab_size, plan.init, path)
    write_weights_only(out_dir, chunks, meta, overwrite)
    return padded
