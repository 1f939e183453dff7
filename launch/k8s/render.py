#!/usr/bin/env python3
"""Render the PyTorchJob template for a dptrain run, and optionally submit it with kubectl.

    python launch/k8s/render.py --name NAME --image IMAGE --nodes N --nproc-per-node P \
        CONFIG [key=value ...] > job.yaml
    python launch/k8s/render.py ... --apply [--dry-run] CONFIG [key=value ...]

CONFIG is a path inside the image. Standard library only, so it runs on any submit host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).with_name("pytorchjob.yaml.tmpl")
# Pods are named "<name>-master-0", "<name>-worker-<i>": keep within the 63-character DNS label.
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
WORKER_BLOCK = "\n    Worker:\n"
QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
# A JSON surrogate-pair escape not itself escaped (preceded by an even number of backslashes).
SURROGATE_PAIR_RE = re.compile(r"(?<!\\)((?:\\\\)*)\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})")


def yaml_flow(value: object) -> str:
    """JSON text that YAML reads back as the same value.

    json.dumps escapes everything outside printable ASCII, which YAML's double-quoted scalars read
    the same way, except surrogate pairs (characters beyond U+FFFF): YAML decodes each half as its
    own character, so those become a single \\U escape.
    """

    def astral(m: re.Match[str]) -> str:
        code = 0x10000 + ((int(m[2], 16) - 0xD800) << 10) + (int(m[3], 16) - 0xDC00)
        return f"{m[1]}\\U{code:08x}"

    return SURROGATE_PAIR_RE.sub(astral, json.dumps(value))


def train_command(nodes: int, nproc: int, rdzv_id: str, config: str, overrides: list[str]) -> list[str]:
    """The container command. $(VAR) is expanded by Kubernetes from the pod's environment."""
    return [
        "torchrun",
        "--nnodes", str(nodes),
        "--nproc-per-node", str(nproc),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "$(MASTER_ADDR):$(MASTER_PORT)",
        "--rdzv-id", rdzv_id,
        "-m", "dptrain", "train", config, *overrides,
    ]  # fmt: skip


def render(args: argparse.Namespace, template: str) -> str:
    """Substitutes every placeholder with a JSON value; a missing or unknown one is an error."""
    values = {
        "NAME": args.name,
        "NAMESPACE": args.namespace,
        "IMAGE": args.image,
        "NPROC_PER_NODE_STR": str(args.nproc_per_node),  # a string in the kubeflow.org/v1 API
        "GPUS_PER_NODE": args.nproc_per_node,
        "WORKERS": args.nodes - 1,
        "SHM_SIZE": args.shm_size,
        "GRACE_SECONDS": args.grace_seconds,
        "COMMAND": train_command(args.nodes, args.nproc_per_node, args.name, args.config, args.overrides),
    }
    if args.nodes == 1:  # the master alone: drop the Worker block, which ends the template
        template, found, _ = template.partition(WORKER_BLOCK)
        if not found:
            raise SystemExit(f"render.py: error: template {args.template} has no {WORKER_BLOCK.strip()!r} block")
        template += "\n"
    try:
        return string.Template(template).substitute({k: yaml_flow(v) for k, v in values.items()})
    except (KeyError, ValueError) as err:
        raise SystemExit(f"render.py: error: template {args.template}: bad placeholder {err}") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="job name (lowercase DNS label, <= 40 chars)")
    parser.add_argument("--image", required=True, help="container image with dptrain installed")
    parser.add_argument("--nodes", type=int, default=1, help="pods, one per node (default 1)")
    parser.add_argument("--nproc-per-node", type=int, default=8, help="GPUs and processes per pod")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("--shm-size", default="64Gi", help="size of the /dev/shm memory volume")
    parser.add_argument("--grace-seconds", type=int, default=600,
                        help="time between SIGTERM and SIGKILL when a pod is evicted: the run finishes its "
                             "step and writes a checkpoint in it (default 600)")
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    parser.add_argument("--apply", action="store_true", help="submit with `kubectl apply -f -`")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=os.environ.get("DRY_RUN", "0") in ("1", "true", "yes"),
        help="with --apply: print the manifest and the kubectl command instead of running it",
    )
    parser.add_argument("config", help="training config path inside the image")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if not NAME_RE.match(args.name):
        parser.error(f"--name {args.name!r} must be a lowercase DNS label of at most 40 characters")
    if args.nodes < 1 or args.nproc_per_node < 1:
        parser.error("--nodes and --nproc-per-node must be at least 1")
    if args.grace_seconds < 1:
        parser.error("--grace-seconds must be at least 1")
    if not QUANTITY_RE.match(args.shm_size):
        parser.error(f"--shm-size {args.shm_size!r} is not a Kubernetes quantity such as 64Gi")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"override {bad[0]!r} is not of the form key=value")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        template = args.template.read_text()
    except OSError as err:
        raise SystemExit(f"render.py: error: cannot read template: {err}") from None
    manifest = render(args, template)
    if not args.apply:
        sys.stdout.write(manifest)
        return 0
    kubectl = ["kubectl", "apply", "-f", "-"]
    if args.dry_run:
        print(" ".join(kubectl), file=sys.stderr)
        sys.stdout.write(manifest)
        return 0
    return subprocess.run(kubectl, input=manifest, text=True, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
