"""Offline model growth for continual pre-training: larger vocabularies and more blocks.

vocab/    tokenizer merges (SentencePiece, tokenizer.json), new-row initialisation, and the
          resize of Hugging Face models and our checkpoints
blocks.py LLaMA-Pro identity-block expansion of our checkpoints
"""
