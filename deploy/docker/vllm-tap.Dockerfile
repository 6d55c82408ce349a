# vLLM's OpenAI-compatible server with the tap plugin installed (misalign-monitor/vllm-tap).
#   docker build -f deploy/docker/vllm-tap.Dockerfile -t misalign-monitor/vllm-tap:0.1.0 .
#   CPU: --build-arg BASE=<a vllm-cpu image> -t misalign-monitor/vllm-tap:0.1.0-cpu
# The base is the newest vLLM release in the tap's supported range (tap.plugin.SUPPORTED_VLLM,
# checked at start): vLLM 0.33 on Python 3.12, whose GPU server runs Model Runner V2 by default.
# The plugin is inactive until MISALIGN_TAP_BUNDLE is set (the manifests set it). Of the project's
# dependencies only those outside vLLM's own closure are installed (requirements/vllm-tap.txt);
# vLLM, torch and the rest stay the base image's (no extra: the `tap` extra would reinstall vLLM).
# Not built in this project's CI: its machines have no Docker engine.
ARG BASE=vllm/vllm-openai:v0.33.0
FROM ${BASE}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY detectors detectors
COPY misalign_monitor misalign_monitor
COPY review review
COPY service service
COPY tap tap
COPY wire wire
# Every package pinned with its wheels' sha256 (scripts/lock_images.py), the build backend too;
# the project itself last, with --no-deps and no build isolation, so nothing unpinned comes in.
COPY deploy/docker/requirements/vllm-tap.txt requirements.txt
RUN pip install --no-cache-dir --require-hashes -r requirements.txt \
    && pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf /src
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
