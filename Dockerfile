# ofa-unified inference server.
#   docker build -t ofa-unified .          (needs checkpoints/default/ in the build context)
#   docker run --gpus all -p 8000:8000 ofa-unified
# Without a GPU the same image serves on CPU (--device auto). Other settings: OFA_SERVE_* variables,
# e.g. docker run -e OFA_SERVE_MAX_BATCH_SIZE=16 ... (the flags below win over variables).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin ofa
WORKDIR /app

# Installed from the same pyproject CI installs from (torch>=2.1 is already in the base image). The
# install is editable because ofa_unified reads instructions/templates.json from the source tree.
COPY pyproject.toml README.md ./
COPY ofa_unified/ ofa_unified/
COPY serving/ serving/
COPY instructions/ instructions/
RUN pip install --no-cache-dir -e . \
    && python -c "import ofa_unified.inference, serving.app"

# The bundled model; the build fails here if it has not been trained/copied yet.
COPY checkpoints/default/ checkpoints/default/

USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8000", "--device", "auto"]
