# One image for the three services: each Deployment in deploy/base picks its service with
# `args: ["-m", "services.<name>"]`.
#
# The base is a build argument: any Debian-like image with Python 3.11+ at `python` and the venv
# module. The default is the official slim image (`docker build -t <registry>/shepherd:0.1.0 .`);
# on a machine with no registry and no Docker, `make image` (python -m controlplane build-image)
# builds a Debian base with mmdebstrap and builds this file on it with buildah
# (controlplane/serviceimage.py). Both stages must use the same base: the virtualenv links to the
# base's interpreter.
ARG BASE=python:3.11.7-slim-bookworm

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shepherd/ shepherd/
COPY services/ services/
RUN python -m venv /opt/shepherd && /opt/shepherd/bin/pip install --no-cache-dir '.[otlp]'

FROM ${BASE}
COPY --from=build /opt/shepherd /opt/shepherd
# Where the SQLite stores go unless SHEPHERD_STORE_PATH says otherwise (the manifests mount a
# volume there), writable by the user below.
RUN mkdir -p /var/lib/shepherd && chown 1000:1000 /var/lib/shepherd
# The default pod template, for running without the pod-templates ConfigMap of deploy/.
COPY deploy/pod-templates/ /etc/shepherd/pod-templates/
ENV PATH=/opt/shepherd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SHEPHERD_TEMPLATES_DIR=/etc/shepherd/pod-templates \
    XDG_STATE_HOME=/var/lib
# The UID the manifests run as (runAsUser: 1000).
USER 1000:1000
ENTRYPOINT ["python"]
CMD ["-m", "services.launcher", "--help"]
