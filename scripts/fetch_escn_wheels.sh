#!/usr/bin/env bash
# Download the wheels that let fairchem-core's eSCN-MD backbone import on the GPU box
# (torch 2.11, Python 3.12, no fairchem, no network). Run here, from the repo root;
# carry .whl to the device (.gitignore ignores /.whl/); baselines/README.md has the install
# line to run there.
#
# fairchem-core 2.24 pins torch~=2.13, so everything is installed there with --no-deps:
# only the packages its import chain needs and the image lacks are listed (checked by
# blocking every other missing distribution and importing escn_md + AtomicData).
# Versions are the ones the CPU test environment runs.
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
python3 -m pip download --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dest" \
    fairchem-core==2.24.0 \
    ase==3.29.0 \
    monty==2026.10.21 \
    hydra-core==1.3.8 \
    omegaconf==2.3.1 \
    torchtnt==0.2.4 \
    wandb==0.31.0 \
    pydantic==2.13.4 \
    pydantic-core==2.46.4 \
    typing-inspection==0.4.2 \
    annotated-types==0.7.0 \
    typing-extensions==4.16.0 \
    opentelemetry-api==1.45.2 \
    backoff==2.2.1 \
    submitit==1.5.4 \
    httpx2==2.16.2 \
    setuptools==80.10.2 \
    vesin==0.6.2
# antlr4-python3-runtime 4.9.3 (hydra/omegaconf pin 4.9.*) exists only as an sdist; built in
# an isolated environment (without one, a Python lacking the `wheel` package fails with
# "invalid command 'bdist_wheel'", and without antlr4 hydra's pytest plugin breaks every
# pytest run on the GPU box that installed the other wheels).
python3 -m pip wheel --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
ls -1 "$dest"
