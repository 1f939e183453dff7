#!/usr/bin/env bash
# Train on one node with one process per GPU.
#
#   launch/torchrun.sh [--dry-run] [--nproc-per-node N] CONFIG [key=value ...]
#
# N defaults to NPROC_PER_NODE, else the GPUs in CUDA_VISIBLE_DEVICES, else those nvidia-smi lists.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '2,6s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

nproc=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --nproc-per-node) [[ $# -ge 2 ]] || die "--nproc-per-node needs a value"; nproc="$2"; shift 2 ;;
        --nproc-per-node=*) nproc="${1#*=}"; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) break ;;
    esac
done

check_train_args "$@"
if [[ -n "$nproc" ]]; then
    require_positive_int "--nproc-per-node" "$nproc"
else
    nproc="$(gpus_per_node)"
fi

# --standalone runs a local c10d rendezvous on a free port: nothing to collide with.
launch torchrun --standalone --nnodes 1 --nproc-per-node "$nproc" -m dptrain train "$@"
