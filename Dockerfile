# iotnode image: every process of the Procfile (one per container in Kubernetes, deploy/k8s/;
# `honcho start` runs them all in one container by default).
#
#   docker build -t iotnode .
#   docker run -p 8000:8000 -p 8001:8001 -v iotnode-data:/var/lib/iotnode iotnode
#
# Stage 1 compiles the ring's C helper (cffi), node.ring._gather, the VictoriaMetrics
# sink's node.storage._vmlines, the PostgreSQL sink's node.storage._pgcopy and the sinks'
# columnar store reader node.storage._storeread
# against the same Python as the runtime stage (and checks the reader finds the libsqlite3
# Python's sqlite3 uses); stage 2 has no compiler.

FROM python:3.11-slim AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY node ./node
RUN python -m venv /opt/iotnode \
 && /opt/iotnode/bin/pip install --no-cache-dir . \
 && /opt/iotnode/bin/python -c "import node.ring._chelper, node.ring._gather, node.storage._vmlines, node.storage._pgcopy" \
 && /opt/iotnode/bin/python -c "from node.storage.source import _columnar; assert _columnar(), 'no columnar reader'"

FROM python:3.11-slim
# libpmem1: the ring's persistent-memory backend (optional: without it, mmap + msync)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpmem1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/iotnode --create-home iotnode
COPY --from=builder /opt/iotnode /opt/iotnode
COPY Procfile /app/Procfile
ENV PATH=/opt/iotnode/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NODE_DATA_DIR=/var/lib/iotnode \
    NODE_HOST=0.0.0.0 \
    NODE_LOG_LEVEL=warning
WORKDIR /app
USER 10001:10001
VOLUME ["/var/lib/iotnode"]
# devices, client apps, /metrics of monitor, router, publisher, store
EXPOSE 8000 8001 9101 9102 9103 9104
# the monitor's liveness endpoint (node/health.py); Kubernetes uses its own probes
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9101/healthz', timeout=2)"]
CMD ["honcho", "start", "-f", "/app/Procfile"]
