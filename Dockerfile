# clawproxy in a container: small (python slim), non-root, health-checked.
#
#   docker build -t clawproxy .
#   docker run --rm -p 8080:8080 clawproxy                  # built-in simulators
#   docker run --rm -p 8080:8080 -v $PWD/my.yaml:/etc/clawproxy/gateway.yaml:ro clawproxy
#
# The image's default configuration (etc/deploy/docker/gateway.yaml) listens on
# every interface inside the container; the admin listener stays on loopback.
FROM python:3.11-slim AS build
WORKDIR /src
COPY setup.py setup.cfg README.rst ./
COPY clawproxy ./clawproxy
COPY twisted ./twisted
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/clawproxy --create-home clawproxy
COPY --from=build /install /usr/local
COPY etc/deploy/docker/gateway.yaml /etc/clawproxy/gateway.yaml
USER 10001
WORKDIR /var/lib/clawproxy
EXPOSE 8080
# /health answers 200 while a pool has a healthy instance (SPEC section 3).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status != 200)"]
# SIGTERM drains: listeners close, in-flight requests finish (30 s grace).
STOPSIGNAL SIGTERM
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "clawproxy"]
CMD ["-c", "/etc/clawproxy/gateway.yaml"]
