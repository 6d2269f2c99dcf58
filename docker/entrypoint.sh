#!/usr/bin/env bash
# Entry point of the model-quantization image (docker/README.md): a few named commands, anything else is run
# as given, so `docker run ... IMAGE bash` gives a shell.
set -euo pipefail

# The repository root: the image keeps the source tree here, and the editable installs point into it.
cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

usage() {
    cat <<'EOF'
usage: docker run [docker options] IMAGE COMMAND [ARGS...]

  train <detectron2|AdelaiDet> [ARGS...]   external/<upstream>/tools/train_net.py ARGS
                                            e.g. train detectron2 --config-file CONFIG --num-gpus 8
  eval  <detectron2|AdelaiDet> [ARGS...]   the same with --eval-only (pass MODEL.WEIGHTS /output/...)
  test  [PYTEST ARGS...]                   nox -s test -- PYTEST ARGS (the whole suite when none)
  lint                                     nox -s lint
  help                                     this text
  anything else                            run as given: nox -l, python ..., bash

Volumes: datasets under /datasets (./datasets and $DETECTRON2_DATASETS point there), outputs in /output
(./output points there, so upstream's OUTPUT_DIR defaults land in it), downloaded weights in /cache.
Give the DataLoader workers shared memory: --shm-size=16g (or --ipc=host).
EOF
}

# Docker's default /dev/shm is 64 MB; DataLoader workers pass batches through it and die with a bus error.
check_shm() {
    local kib
    kib="$(df -k --output=size /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ')" || return 0
    if [[ "${kib}" =~ ^[0-9]+$ ]] && ((kib < 1024 * 1024)); then
        echo "warning: /dev/shm is only $((kib / 1024)) MiB; DataLoader workers need more:" \
            "run the container with --shm-size=16g (or --ipc=host)" >&2
    fi
}

train_net() {
    local mode=$1
    shift
    local upstream=${1:-}
    case "${upstream}" in
        detectron2 | AdelaiDet) shift ;;
        *)
            echo "error: ${mode} needs the upstream whose train_net.py to run: detectron2 or AdelaiDet" \
                "(got '${upstream}')" >&2
            echo "e.g. ${mode} detectron2 --config-file CONFIG [--num-gpus N] [KEY VALUE ...]" >&2
            exit 2
            ;;
    esac
    check_shm
    local args=("$@")
    if [[ "${mode}" == eval ]]; then
        args=(--eval-only "${args[@]}")
    fi
    exec python "external/${upstream}/tools/train_net.py" "${args[@]}"
}

command=${1:-help}
case "${command}" in
    train | eval)
        shift
        train_net "${command}" "$@"
        ;;
    test)
        shift
        if (($# > 0)); then
            exec nox -s test -- "$@"
        fi
        exec nox -s test
        ;;
    lint)
        shift
        exec nox -s lint "$@"
        ;;
    help | -h | --help)
        usage
        ;;
    *)
        exec "$@"
        ;;
esac
