#!/usr/bin/env python3
"""Render a scaling sweep as a Kubernetes Indexed Job: pod I trains run I of the spec
(`dptrain sweep run SPEC --index $JOB_COMPLETION_INDEX`), `--parallelism` at a time.

    n=$(python -m dptrain sweep run SPEC --count)
    python launch/k8s/sweep_job.py --name NAME --image IMAGE --runs $n --claim PVC SPEC > job.yaml

SPEC is a path inside the pod; the spec's runs folder and results table must be on the mounted
claim, which every pod shares. A retried pod resumes its run from its last checkpoint (the steps
the failure lost are charged to the privacy ledger, as for any resumed run). Standard library only.
"""
from __future__ import annotations

import argparse
import sys

from render import NAME_RE, yaml_flow


def manifest(args: argparse.Namespace) -> str:
    command = ["python", "-m", "dptrain", "sweep", "run", args.spec, "--index", "$(JOB_COMPLETION_INDEX)"]
    gpu = f"\n                nvidia.com/gpu: {args.gpus}" if args.gpus else ""
    return f"""apiVersion: batch/v1
kind: Job
metadata:
  name: {yaml_flow(args.name)}
  namespace: {yaml_flow(args.namespace)}
  labels:
    app.kubernetes.io/name: dptrain-sweep
spec:
  completionMode: Indexed
  completions: {args.runs}
  parallelism: {args.parallelism}
  backoffLimitPerIndex: {args.retries}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: dptrain-sweep
    spec:
      restartPolicy: Never
      containers:
        - name: sweep
          image: {yaml_flow(args.image)}
          workingDir: {yaml_flow(args.workdir)}
          command: {yaml_flow(command)}
          resources:
            limits:
              cpu: {yaml_flow(str(args.cpus))}{gpu}
          volumeMounts:
            - name: sweep
              mountPath: {yaml_flow(args.workdir)}
      volumes:
        - name: sweep
          persistentVolumeClaim:
            claimName: {yaml_flow(args.claim)}
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="job name (lowercase DNS label, <= 40 chars)")
    parser.add_argument("--image", required=True, help="container image with dptrain installed")
    parser.add_argument("--runs", type=int, required=True, help="the spec's run count (`dptrain sweep run SPEC --count`)")
    parser.add_argument("--claim", required=True, help="PersistentVolumeClaim holding the spec, data and runs")
    parser.add_argument("--workdir", default="/sweep", help="where the claim is mounted and the runs start")
    parser.add_argument("--parallelism", type=int, default=8, help="runs at once")
    parser.add_argument("--cpus", type=int, default=1, help="CPU cores per run")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per run")
    parser.add_argument("--retries", type=int, default=2, help="retries per run (each resumes its checkpoint)")
    parser.add_argument("--namespace", default="default")
    parser.add_argument("spec", help="sweep spec path inside the pod")
    args = parser.parse_args(argv)
    if not NAME_RE.match(args.name):
        parser.error(f"--name {args.name!r} must be a lowercase DNS label of at most 40 characters")
    if min(args.runs, args.parallelism, args.cpus) < 1 or min(args.gpus, args.retries) < 0:
        parser.error("--runs, --parallelism and --cpus must be at least 1; --gpus and --retries at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    sys.stdout.write(manifest(parse_args(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
