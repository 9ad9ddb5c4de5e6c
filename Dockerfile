# maskvid on an official PyTorch CUDA runtime image. The base already carries torch 2.13.0 (CUDA),
# so the README's `pip install torch==2.13.0` is satisfied without a download here.
#   docker build -t maskvid .
#   docker run --gpus all -v $PWD/runs:/opt/maskvid/runs maskvid demo
FROM pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    DS_BUILD_OPS=0 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/maskvid
COPY . /opt/maskvid

# tcmalloc: `maskvid demo` preloads it into the commands it runs (launch/allocator.py); with glibc's
# malloc a long CPU fit slows down step by step. Preloaded for every maskvid command in the image.
RUN apt-get update && apt-get install -y --no-install-recommends libtcmalloc-minimal4 && rm -rf /var/lib/apt/lists/*
ENV LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

# Same install as the README, without the editable flag and the test extra.
RUN pip install torch==2.13.0 && pip install .

ENTRYPOINT ["maskvid"]
CMD ["--help"]
