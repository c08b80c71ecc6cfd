"""Offline corpus preprocessing: JSONL/text/parquet/datasets in, megatron-core IndexedDataset (.bin/.idx) out.

inputs.py    input files -> units (files, parquet row groups) -> this shard's chunks of documents
encode.py    documents -> token ids (worker processes)
writer.py    token ids -> .bin/.idx/.meta.json (format owned by megatron_ct/data/indexed.py)
pipeline.py  the whole run with progress, summary and resume-safe output
merge.py     several prefixes (the shards of an array job) -> one
"""
