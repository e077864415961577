# One image for every role of the compose rehearsal (SuperLink, SuperNodes with
# their ClientApp worker, the job submitter): fedmm and Flower 1.41 installed.
# torch comes from PyPI, i.e. the CUDA build (its nvidia-* libraries make the
# image ~6 GB); it runs on CPU as is. For CPU-only sites, install torch from
# https://download.pytorch.org/whl/cpu first (--build-arg TORCH_INDEX=...) to
# save ~4 GB; our build machines cannot reach that index, so it is not the default.
FROM python:3.11-slim

ARG TORCH_INDEX=""
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /app

# Dependencies first, from pyproject.toml alone: this layer is rebuilt only
# when the dependencies change, not on every code change.
COPY pyproject.toml ./
RUN mkdir -p fedmm strategies && touch README.md fedmm/__init__.py strategies/__init__.py \
 && if [ -n "$TORCH_INDEX" ]; then pip install --index-url "$TORCH_INDEX" torch torchvision; fi \
 && pip install . && pip uninstall -y fedmm && rm -rf fedmm strategies build *.egg-info README.md

COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info \
 && python -c "import fedmm.cli, fedmm.deploy.clientapp_worker"

CMD ["fedmm", "--help"]
