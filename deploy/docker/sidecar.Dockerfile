# The sidecar image (misalign-monitor/sidecar): the base install, no torch.
#   docker build -f deploy/docker/sidecar.Dockerfile -t misalign-monitor/sidecar:0.1.0 .
# Not built in this project's CI: its machines have no Docker engine.
FROM python:3.12-slim
# redis-server only for the embedded default (no redis_url set); deployments point at a Redis.
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* && useradd --uid 1000 --create-home misalign
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
COPY deploy/docker/requirements/sidecar.txt requirements.txt
RUN pip install --no-cache-dir --require-hashes -r requirements.txt \
    && pip install --no-cache-dir --no-deps --no-build-isolation . && rm -rf /src
USER 1000
EXPOSE 50051 9464
CMD ["misalign-monitor", "serve"]
