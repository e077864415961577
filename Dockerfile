# One image for every role of the compose rehearsal (SuperLink, SuperNodes with
# their ClientApp worker, the job submitter): fedmm and the Flower it pins installed.
# torch comes from PyPI, i.e. the CUDA build (its nvidia-* libraries make the
# image ~6 GB); it runs on CPU as is. For CPU-only sites, install torch from
# https://download.pytorch.org/whl/cpu first (--build-arg TORCH_INDEX=...) to
# save ~4 GB; our build machines cannot reach that index, so it is not the default.
# The dependency list alone, out of pyproject.toml: the layer that installs it is then rebuilt only when
# the dependencies change, not when a run-config default or a strategy entry point does.
FROM python:3.11-slim AS dependency-list
COPY pyproject.toml /spec/
RUN python -c "import tomllib; deps = tomllib.load(open('/spec/pyproject.toml', 'rb'))['project']['dependencies']; \
open('/spec/requirements.txt', 'w').write(chr(10).join(deps) + chr(10))"

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

# Dependencies first, from their list alone: this layer is rebuilt only when
# the dependencies change, not on every code or run-config change.
COPY --from=dependency-list /spec/requirements.txt ./
RUN if [ -n "$TORCH_INDEX" ]; then pip install --index-url "$TORCH_INDEX" torch torchvision; fi \
 && pip install -r requirements.txt && rm requirements.txt

COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info

CMD ["fedmm", "--help"]
