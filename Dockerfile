# megatron-ct on NVIDIA's PyTorch image, which ships CUDA, PyTorch, Transformer Engine,
# apex and flash-attn built for each other. We install only our package and its
# pure-Python needs from PyPI; setup.py asks for torch>=2.4, so the image's torch is kept.
#   docker build -t megatron-ct .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/megatron-ct/runs megatron-ct \
#       torchrun --nproc_per_node 8 pretrain_ct.py --config examples/llama2_7b_ct_bf16.yaml
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.04-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /workspace/megatron-ct

# Dependencies first so code edits do not invalidate this layer.
COPY setup.py pyproject.toml README.md ./
COPY megatron_ct/__init__.py megatron_ct/__init__.py
RUN pip install --no-cache-dir -e ".[test,tensorboard]" \
 && python -c "import torch, transformer_engine, megatron.core; print('torch', torch.__version__, 'TE', transformer_engine.__version__, 'mcore', megatron.core.__version__)"

COPY . .
# Fail the build if the GPU-only packages the trainer detects at run time are missing.
RUN python -c "import importlib.util as u; missing=[m for m in ('transformer_engine','apex','flash_attn') if u.find_spec(m) is None]; assert not missing, missing"
CMD ["bash"]
