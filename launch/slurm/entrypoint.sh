#!/usr/bin/env bash
# Per-node entrypoint: train.sbatch runs it once per node with srun. Starts torchrun with a c10d
# rendezvous on the first node of the allocation.
#
#   srun --ntasks-per-node=1 launch/slurm/entrypoint.sh [--dry-run] [--nproc-per-node N] CONFIG [key=value ...]
#
# Needs SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NNODES and SLURM_NODEID (set by srun).
# MASTER_PORT overrides the port derived from the job id.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

# Ports 29500..32499: below Linux's ephemeral range (32768+), so an outgoing connection never holds
# it, and spread over job ids so two jobs sharing a node rarely pick the same one.
PORT_BASE=29500
PORT_RANGE=3000

nproc=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --nproc-per-node) [[ $# -ge 2 ]] || die "--nproc-per-node needs a value"; nproc="$2"; shift 2 ;;
        --nproc-per-node=*) nproc="${1#*=}"; shift ;;
        --) shift; break ;;
        -*) die "unknown option '$1'" ;;
        *) break ;;
    esac
done

for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NNODES SLURM_NODEID; do
    [[ -n "${!var:-}" ]] || die "$var is not set: run this with srun inside a Slurm job (see launch/slurm/train.sbatch)"
done
require_positive_int SLURM_JOB_ID "$SLURM_JOB_ID"
require_positive_int SLURM_NNODES "$SLURM_NNODES"
[[ "$SLURM_NODEID" =~ ^[0-9]+$ ]] || die "SLURM_NODEID must be a non-negative integer, got '$SLURM_NODEID'"
check_train_args "$@"
if [[ -n "$nproc" ]]; then
    require_positive_int "--nproc-per-node" "$nproc"
else
    nproc="$(gpus_per_node)"
fi

command -v scontrol >/dev/null 2>&1 || die "scontrol not found on PATH (node $(hostname))"
hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")" ||
    die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
master_addr="${hosts%%$'\n'*}"
[[ -n "$master_addr" ]] || die "no host names in SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"

# A host every node must reach; fail here rather than time out in the rendezvous 10 minutes later.
resolved="$(getent hosts "$master_addr")" ||
    die "cannot resolve rendezvous host '$master_addr' from node $(hostname) (getent hosts failed); check DNS or /etc/hosts"

if [[ -n "${MASTER_PORT:-}" ]]; then
    port="$MASTER_PORT"
    [[ "$port" =~ ^[1-9][0-9]*$ && port -ge 1 && port -le 65535 ]] || die "MASTER_PORT must be a port number (1-65535), got '$port'"
else
    port=$((PORT_BASE + SLURM_JOB_ID % PORT_RANGE))
fi

log "node ${SLURM_NODEID}/${SLURM_NNODES}: ${nproc} processes, rendezvous ${master_addr}:${port} (${resolved%%[[:space:]]*})"
launch torchrun \
    --nnodes "$SLURM_NNODES" \
    --node-rank "$SLURM_NODEID" \
    --nproc-per-node "$nproc" \
    --rdzv-backend c10d \
    --rdzv-endpoint "${master_addr}:${port}" \
    --rdzv-id "$SLURM_JOB_ID" \
    -m dptrain train "$@"
