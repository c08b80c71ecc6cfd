"""Training data at run time: the synthetic stream and curricula over indexed datasets (offline
preprocessing lives in megatron_ct/preprocess).

Curriculum modules, from the config to a batch:
  schedule.py    stages -> steps, sample ranges and blend vectors
  interleave.py  global sample -> dataset (low-discrepancy, ramp-aware)
  indexed.py     the .bin/.idx format: validated open, fingerprints, metadata sidecar (also used offline)
  stream.py      dataset -> endless epoch-shuffled token stream; concat / by_source samples
  index_cache.py per-dataset index arrays cached on disk
  packing.py     samples -> tokens/labels/loss_mask/position_ids (+ document attention mask)
  curriculum.py  all of the above per step, with the checkpointed data state
  valid.py       named validation sets and their byte counts (bits per byte)
"""
