# syntax=docker/dockerfile:1
# Slim CPU image WITHOUT torch: the Telegram and Discord bots, the OpenAI-compatible API and the feedback store
# (`pip install .[bots]`).
# Build: docker build -f docker/slim.Dockerfile -t convo-slim .   (docker compose builds it for you)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with the project and the bots extra, nothing else.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY errors.py errors.py
COPY convo convo
COPY config config
COPY bot bot
COPY inference inference
COPY training training
RUN pip install ".[bots]" \
    # The promise of this image: the services it runs start without the ML stack.
    && python -c "import sys, convo.cli, bot, bot.openai_api, inference.protocol, inference.client; \
bad = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; assert not bad, bad" \
    && ! python -c "import torch" 2>/dev/null

# ---- runtime: the virtualenv only, run as an unprivileged user.
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --create-home --uid 10001 --user-group convo \
    && mkdir -p /data/adapters && chown -R convo:convo /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Relative paths in settings (the SQLite feedback store, adapters/) resolve under the /data volume.
WORKDIR /data
USER convo
CMD ["convo", "--help"]
