# syntax=docker/dockerfile:1
# The lorafleet image: what deploy/k8s runs (`lorafleet ingest | engine | adapter-store`).
#
#   docker build -t registry.example.com/lorafleet:0.1.0 .
#   docker push registry.example.com/lorafleet:0.1.0
#
# One image for every service: ingest and the adapter store never touch the GPU, but they share
# the code (tokenizer, adapter validation) and a single image keeps versions in step.
# tests/deploy/test_dockerfile.py checks this file against the repository and the manifests.

# CUDA user-space comes with torch's own wheels (nvidia-* packages, CUDA 13 for the locked torch);
# the base image supplies the NVIDIA container-runtime wiring (the driver is mounted from the node)
# and declares the CUDA version the node's driver must support (13.0: driver 580 or newer).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ${CUDA_IMAGE} AS system
ENV DEBIAN_FRONTEND=noninteractive
# gcc, libc6-dev and python3-dev stay in the final image: Triton compiles its small CUDA launcher
# (a C extension) with the system compiler the first time each kernel signature runs.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM system AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/lorafleet
ENV PATH=/opt/lorafleet/bin:$PATH
WORKDIR /src
# Every version comes from requirements.lock (constraints), the lock CI tests: torch and the triton
# it needs first, alone (the largest layer, rebuilt only when the lock changes). On Linux x86_64
# PyPI's build of the locked torch is the CUDA one.
COPY requirements.lock ./
RUN pip install -c requirements.lock torch triton
COPY pyproject.toml README.md ./
COPY services ./services
COPY kernels ./kernels
COPY bench ./bench
RUN pip install -c requirements.lock ".[engine]" \
 && lorafleet --help > /dev/null

FROM system
COPY --from=build /opt/lorafleet /opt/lorafleet
# The user the manifests run as (runAsUser / runAsGroup 10001), with a writable home for the
# Triton kernel cache (~/.triton) and Hugging Face caches.
RUN groupadd --gid 10001 lorafleet \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/lorafleet --shell /usr/sbin/nologin lorafleet
ENV PATH=/opt/lorafleet/bin:$PATH \
    HOME=/home/lorafleet \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /home/lorafleet
ENTRYPOINT ["lorafleet"]
CMD ["--help"]
