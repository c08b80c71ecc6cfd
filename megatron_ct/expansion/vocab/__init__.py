"""Vocabulary expansion: choose pieces, merge them into the tokenizer, grow the model's rows.

select.py      which candidate pieces are appended (format-independent rules)
merge_sp.py    append to a SentencePiece model;  merge_hf.py: append to a tokenizer.json
merge.py       either format, chosen from the base tokenizer
train_sp.py    train candidate pieces on domain text;  report.py: compression before/after
resize.py      new rows of embedding/output matrices (subword-mean, mean, random, focus, omp, mean+noise)
overlap.py     FOCUS/OMP weights over overlapping tokens, in an auxiliary space built from text
checkpoint.py  resize one of our checkpoints (any saved layout), streamed
"""
