# syntax=docker/dockerfile:1
# CUDA image with torch: the inference worker and the retraining scheduler (`pip install .[ml]`).
# The base image brings CUDA, cuDNN, Python 3.11 and a CUDA build of torch; pip keeps that torch (the ml extra
# asks for torch>=2.4) and adds transformers, peft, trl, bitsandbytes (4-bit NF4 on the GPU), ... Should a
# dependency ever need a newer torch, pip installs it from PyPI, whose Linux wheels are CUDA builds too; the
# check after the install fails the build if the torch that ends up importable has no CUDA.
# Build: docker build -f docker/ml.Dockerfile -t convo-ml .   (docker compose builds it for you)
# Another torch/CUDA: docker build --build-arg TORCH_IMAGE=pytorch/pytorch:<tag> ...
ARG TORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# ---- build: a virtualenv on top of the image's Python that sees its torch (--system-site-packages).
FROM ${TORCH_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY errors.py errors.py
COPY convo convo
COPY config config
COPY bot bot
COPY inference inference
COPY training training
RUN pip install ".[ml]" \
    # The image's CUDA torch must survive the install (a CPU wheel here would make the GPU useless).
    && python -c "import torch; assert torch.version.cuda, 'torch without CUDA'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---- runtime: same base (same Python and torch), the virtualenv, an unprivileged user.
FROM ${TORCH_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --user-group convo \
    && mkdir -p /data/adapters /cache/huggingface && chown -R convo:convo /data /cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface
WORKDIR /data
USER convo
CMD ["convo", "--help"]
