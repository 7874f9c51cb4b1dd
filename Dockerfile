# mesh-node, CPU image. Build: docker build -t mesh-node .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MESH_NODE_HOME=/data
WORKDIR /app

# a C compiler: on CPUs with AVX512-BF16 the engine builds its bf16 decode kernels at first use
# (mesh_node/engine/cpu_kernels.c); without one it falls back to torch's, about 1.4x slower
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch pinned as in pyproject.toml; the CPU build (PyPI's default pulls CUDA, several GB)
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY mesh_node ./mesh_node
RUN pip install . && mesh-node --version

VOLUME /data
# QUIC between nodes, the status console, the OpenAI-compatible API
EXPOSE 7300/udp 3131/tcp 9337/tcp
ENTRYPOINT ["mesh-node"]
CMD ["--help"]
