"""Merge IndexedDataset prefixes (e.g. the shards of an array job) into one.

The result holds every input's documents in the given order, byte for byte (the ``.bin``
files concatenated, the indexes joined), so merging the shards of a sharded run gives the
files of the unsharded run. Every input is validated first (:mod:`megatron_ct.data.indexed`);
inputs tokenized with different tokenizers or with different token dtypes are refused. The
merged sidecar sums the inputs' (a ``.bin`` without a sidecar is scanned for its largest id
while it is copied).
"""

from __future__ import annotations

import glob
import os

from tqdm import tqdm

from megatron_ct.data.indexed import DatasetMeta, check_same_tokenizer, open_indexed
from megatron_ct.preprocess.inputs import PreprocessError
from megatron_ct.preprocess.writer import IndexedDatasetWriter


def expand_prefixes(patterns: list[str]) -> list[str]:
    """Prefixes and globs of prefixes (matched against ``.idx`` files, sorted) in order, de-duplicated."""
    out: list[str] = []
    for pattern in patterns:
        if pattern.endswith((".bin", ".idx")):
            pattern = pattern[:-4]
        if glob.has_magic(pattern):
            matches = sorted(p[: -len(".idx")] for p in glob.glob(pattern + ".idx"))
            if not matches:
                raise PreprocessError(f"input glob {pattern!r} matches no .idx file")
            out.extend(matches)
        else:
            out.append(pattern)
    seen, unique = set(), []
    for prefix in out:
        if os.path.realpath(prefix) not in seen:
            seen.add(os.path.realpath(prefix))
            unique.append(prefix)
    return unique


def merge_datasets(
    inputs: list[str], output_prefix: str, overwrite: bool = False, progress: bool = True
) -> DatasetMeta:
    """Write ``output_prefix.bin/.idx/.meta.json`` holding every input prefix's documents, in order.

    Raises:
        DataError: an input is missing or fails its integrity check, inputs disagree on dtype or
            tokenizer, or the output exists (without ``overwrite``) or is one of the inputs.
    """
    prefixes = expand_prefixes(inputs)
    if not prefixes:
        raise PreprocessError("no --input prefix given")
    out_real = os.path.realpath(output_prefix)
    if any(os.path.realpath(p) == out_real for p in prefixes):
        raise PreprocessError(f"--output-prefix {output_prefix} is one of the inputs; expected a new prefix")
    if os.path.exists(output_prefix + ".idx") and not overwrite:
        raise PreprocessError(f"{output_prefix}.idx exists; pass --overwrite to replace it")
    # Validate every input before writing anything; keep only facts (not the memory maps:
    # a thousand shards open at once would exhaust the file descriptors).
    metas, dtypes, sizes = {}, {}, {}
    for p in prefixes:
        d = open_indexed(p)
        metas[p], dtypes[p], sizes[p] = d.meta, d.dtype, d.num_tokens * d.dtype.itemsize
        del d
    check_same_tokenizer(metas)
    if len(set(dtypes.values())) > 1:
        names = ", ".join(f"{p} ({dt.name})" for p, dt in dtypes.items())
        raise PreprocessError(f"inputs have different token dtypes: {names}; expected one dtype (one tokenizer)")
    # The merged sidecar names the tokenizer only when every input's sidecar does.
    first = metas[prefixes[0]]
    tokenizer = first.tokenizer if all(m is not None and m.tokenizer for m in metas.values()) else None
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    with (
        IndexedDatasetWriter({"merged": output_prefix}, dtypes[prefixes[0]], tokenizer) as writer,
        tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024, desc="merge",
             disable=not progress) as bar,
    ):  # fmt: skip
        for p in prefixes:
            writer.add_dataset("merged", open_indexed(p))
            bar.update(sizes[p])
        merged = writer.commit({"tool": "tools/merge_datasets.py", "inputs": prefixes})
    return merged["merged"]
