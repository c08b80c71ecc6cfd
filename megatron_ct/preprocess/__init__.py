"""Offline corpus preprocessing: text/JSONL in, megatron-core IndexedDataset (.bin/.idx) out.

inputs.py    input files -> chunks of documents
encode.py    documents -> token ids (worker processes)
writer.py    token ids -> .bin/.idx
pipeline.py  the whole run with progress, summary and resume-safe output
"""
