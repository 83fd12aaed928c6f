# cudabuild's own image (cudabuild/cudabuild:VERSION): what a Swarm or Kubernetes matrix job runs
# beside the node's Docker engine. Made by scripts/tool-image from the wheel of a checkout and the
# wheels it depends on; nothing is fetched from PyPI here.
FROM python:3.11-slim-bookworm
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends git ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY wheels /wheels
RUN python3 "$(ls /wheels/pip-*.whl)/pip" install --quiet --no-index --find-links /wheels --no-cache-dir \
        --break-system-packages --root-user-action ignore cudabuild \
 && rm -rf /wheels \
 && cudabuild --version
ENTRYPOINT ["cudabuild"]
