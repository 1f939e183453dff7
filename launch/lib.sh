# Helpers shared by the launch scripts; sourced, never executed.
# shellcheck shell=bash

# Repository root, put on PYTHONPATH so `python -m dptrain` works from a plain checkout.
DPTRAIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
    printf 'dptrain-launch: error: %s\n' "$*" >&2
    exit 1
}

log() {
    printf 'dptrain-launch: %s\n' "$*" >&2
}

is_dry_run() {
    case "${DRY_RUN:-0}" in
        1 | true | yes) return 0 ;;
        0 | false | no | "") return 1 ;;
        *) die "DRY_RUN must be 1 or 0, got '${DRY_RUN}'" ;;
    esac
}

require_positive_int() {  # NAME VALUE
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# Validates CONFIG and the key=value overrides that follow it.
check_train_args() {
    [[ $# -ge 1 ]] || die "missing CONFIG (usage: ... CONFIG [key=value ...])"
    [[ -f "$1" ]] || die "config file not found: $1"
    shift
    local override
    for override in "$@"; do
        [[ "$override" == *=* ]] || die "override '$override' is not of the form key=value"
    done
}

# GPUs on this node: NPROC_PER_NODE, then Slurm's count, then CUDA_VISIBLE_DEVICES, then nvidia-smi.
gpus_per_node() {
    local count listing
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        count="$NPROC_PER_NODE"
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        count="$SLURM_GPUS_ON_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # set but empty hides every GPU
        local -a devices
        IFS=, read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
        count="${#devices[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1 && listing="$(nvidia-smi --list-gpus)"; then
        count="$(grep -c '^GPU ' <<<"$listing" || true)"
    else
        die "cannot count GPUs (nvidia-smi missing or failing); set NPROC_PER_NODE or pass --nproc-per-node"
    fi
    require_positive_int "processes per node" "$count"
    printf '%s\n' "$count"
}

# Runs the command with exec, or under dry-run prints the environment it sets and the command,
# one shell-quoted line each, so the output can be pasted into a shell.
launch() {
    case ":${PYTHONPATH:-}:" in
        *":${DPTRAIN_ROOT}:"*) ;;  # already there, e.g. inherited from train.sbatch through srun
        *) export PYTHONPATH="${DPTRAIN_ROOT}${PYTHONPATH:+:${PYTHONPATH}}" ;;
    esac
    if is_dry_run; then
        local line
        printf 'export PYTHONPATH=%q\n' "$PYTHONPATH"
        printf -v line '%q ' "$@"
        printf '%s\n' "${line% }"
        exit 0
    fi
    exec "$@"
}
