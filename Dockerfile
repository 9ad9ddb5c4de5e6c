# maskvid on an official PyTorch CUDA *devel* image: nvcc and the CUDA headers are there, so
# DeepSpeed builds its ops (fused Adam, ...) at first use. The base already carries torch 2.13.0
# (CUDA), so the README's `pip install torch==2.13.0` is satisfied without a download.
#   docker build -t maskvid .
#   docker run --gpus all --ipc=host -v $PWD/runs:/opt/maskvid/runs maskvid demo
# GPU runs use the system's malloc: host CPU tuning (launch/cpu_tuning.py) is opt-in and never
# applied with CUDA, so nothing is preloaded here.
FROM pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DS_BUILD_OPS=0 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/maskvid

# Dependencies first, from pyproject.toml and the lock alone: a source change reuses this layer.
# The exact versions CI tests (constraints.txt), with the DeepSpeed and demo extras.
COPY pyproject.toml constraints.txt /opt/maskvid/
RUN pip install torch==2.13.0 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['deepspeed'] + p['optional-dependencies']['demo']))" > /tmp/requirements.txt && pip install -c constraints.txt -r /tmp/requirements.txt

# Then the package itself (its dependencies are installed above).
COPY . /opt/maskvid
RUN pip install --no-deps .

ENTRYPOINT ["maskvid"]
CMD ["--help"]
