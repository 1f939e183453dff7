"""Data-parallel and sharded DP training on CPU with Gloo: 1, 2 and 4 processes against one.

Each (mode, world size) is spawned once per module; the worker records what the tests check:
the noise a step adds with no data (variance, replication, fresh streams), the weights after a
few noise-free steps, each rank's share of every global batch, and (some runs) a DCP checkpoint.
"""
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dptrain import configio
from dptrain.checkpoint import load_model
from dptrain.distributed import DistEnv, Parallel
from dptrain.distributed.parallel import DataParallel, FullyShardedDP, make_parallel
from dptrain.errors import UserError
from dptrain.train.config import TrainConfig
from dptrain.train.trainer import Trainer
from tiny_runs import demo_by_user

VOCAB = 384
STEPS = 3
SAVE_AT = 2  # runs asked to checkpoint do so after this many steps
SIGMA, CLIP = 2.0, 0.5


def make_config(data_dir, out_dir, parallel: str = "none", device: str = "cpu") -> TrainConfig:
    return configio.from_dict(TrainConfig, {
        "model": dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=8, max_seq_len=32, query_pre_attn_scalar=8.0),
        "data": {"path": str(data_dir)},
        # A small expected batch (3) on up to 4 ranks: some ranks get empty shares.
        "privacy": {"noise_multiplier": SIGMA, "delta": 1e-5, "expected_batch_size": 3, "steps": STEPS,
                    "max_grad_norm": CLIP},
        "optimizer": {"lr": 1e-2},
        "out_dir": str(out_dir),
        "runtime": {"micro_batch_size": 1, "device": device, "parallel": parallel, "seed": 3},
        "eval": {"every": 0, "max_sequences": 4},
        "logging": {"wandb": "disabled", "progress": False},
        "checkpoint": {"every": 0, "keep_last": 1},
    })


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(func, world_size: int, *args) -> None:
    """Run func(rank, world_size, *args) in world_size Gloo processes, as torchrun would set them up."""
    port = free_port()
    mp.start_processes(_entry, args=(world_size, port, func, args), nprocs=world_size, join=True,
                       start_method="forkserver")  # conftest.py preloads the server


def _entry(rank, world_size, port, func, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    func(rank, world_size, *args)  # an exception propagates: spawn reports it and ends the peers
    if dist.is_initialized():
        # No rank may tear down Gloo while a peer is still inside a collective: that aborts it.
        dist.barrier()
        dist.destroy_process_group()
    # The results are on disk. Skip interpreter finalization, where Gloo worker threads still
    # referenced by FSDP's device mesh can abort the process after a successful run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def full_gradient(trainer) -> torch.Tensor:
    """Every parameter's .grad, whole (gathered from the shards under fsdp), flattened."""
    parts = []
    for p in trainer.engine.parameters:
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        parts.append(g.detach().flatten())
    return torch.cat(parts)


def _worker(rank, world, mode, data_dir, out_dir, result_file, save, resume_dir, device="cpu"):
    # Noise-free training (part 2); part 1 hands the parallel layout a mechanism with noise.
    trainer = Trainer(make_config(data_dir, out_dir / "train", mode, device), noise_free=True)
    noisy = dataclasses.replace(trainer.mechanism, noise_multiplier=SIGMA, expected_batch_size=1)
    # 1. The noise of a step with no data, twice (steps 0 and 1), before any update.
    noises, replicated = [], True
    for step in range(2):
        trainer.engine.zero_grad()
        trainer.parallel.privatize(trainer.engine, noisy, trainer.noise, step)
        g = full_gradient(trainer).cpu()
        gathered = [torch.empty_like(g, device=trainer.device) for _ in range(world)]
        dist.all_gather(gathered, g.to(trainer.device))
        gathered = [x.cpu() for x in gathered]
        replicated &= all(torch.equal(gathered[0], x) for x in gathered)
        noises.append(g)

    # 2. Noise-free training (no optimizer step has been taken yet): must match one process.
    shares = []
    for _ in range(STEPS):
        before = trainer.sampler.state_dict()
        global_batch = _peek(trainer, before)
        mine = sum(int((s >= 0).sum()) for s in trainer.parallel.micro_batches(global_batch, 1))
        counts = [None] * world
        dist.all_gather_object(counts, mine)
        shares.append((len(global_batch), counts))
        trainer.train_step()
        if save and trainer.step == SAVE_AT:
            trainer.save_checkpoint()
    result = {"noises": noises, "replicated": replicated, "shares": shares,
              "weights": trainer.parallel.full_state_dict(trainer.model)}

    # 3. Resume another run's checkpoint (written at another world size or mode) and finish it.
    if resume_dir is not None:
        resumed = Trainer(make_config(data_dir, resume_dir, mode), noise_free=True)
        result["resumed_at"] = resumed.step
        while resumed.step < STEPS:
            resumed.train_step()
        result["resumed_weights"] = resumed.parallel.full_state_dict(resumed.model)
    if rank == 0:
        torch.save(result, result_file)


def _peek(trainer, state) -> np.ndarray:
    """The next global batch, without moving the trainer's sampler."""
    return trainer.sampler.batch_at(state["steps_taken"])[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dptrain.data.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"), seq_len=16, vocab_size=VOCAB, num_records=120)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One process, runtime.parallel none, noise off."""
    trainer = Trainer(make_config(data_dir, tmp_path_factory.mktemp("ref")), noise_free=True)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(STEPS):
        trainer.train_step()
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    assert all(not torch.equal(initial[k], final[k]) for k in final)  # every tensor was trained
    return final


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    cache = {}

    def get(mode: str, world: int) -> dict:
        if (mode, world) not in cache:
            out = tmp_path_factory.mktemp(f"{mode}{world}")
            save = world == 2
            resume_dir = None
            if (mode, world) == ("fsdp", 4):  # also resumes the 2-process ddp checkpoint, sharded
                resume_dir = out / "resumed"
                shutil.copytree(get("ddp", 2)["out"] / "train", resume_dir)
            run_distributed(_worker, world, mode, data_dir, out, out / "result.pt", save, resume_dir)
            cache[mode, world] = {**torch.load(out / "result.pt", weights_only=False), "out": out}
        return cache[mode, world]

    return get


CASES = [(mode, world) for mode in ("ddp", "fsdp") for world in (1, 2, 4)]


@pytest.mark.slow
@pytest.mark.parametrize("mode,world", CASES)
def test_noise_variance_is_sigma_squared_c_squared_at_any_world_size(runs, mode, world):
    noise = runs(mode, world)["noises"][0]
    n = noise.numel()
    var = float(noise.double().square().mean())
    # The sample variance of n unit-variance normals has relative sd sqrt(2 / n) (< 1% here): a
    # noise added per rank would show as world_size x, a missing slice as a deficit.
    assert abs(var / (SIGMA * CLIP) ** 2 - 1) < 6 * math.sqrt(2 / n), var
    assert abs(float(noise.double().mean())) < 6 * SIGMA * CLIP / math.sqrt(n)


@pytest.mark.parametrize("mode,world", CASES)
def test_no_two_shards_or_steps_share_a_noise_stream(runs, mode, world):
    run = runs(mode, world)
    both = torch.cat(run["noises"])
    # A reused stream repeats whole runs of draws. Single float32 values do collide by chance
    # among ~1e4 normals; two consecutive ones (~2^-46 per pair) do not.
    pairs = torch.stack([both[:-1], both[1:]], dim=1)
    assert torch.unique(pairs, dim=0).shape[0] == pairs.shape[0]
    assert run["replicated"]  # every rank applies the same noisy update


@pytest.mark.parametrize("mode,world", CASES)
def test_noise_free_weights_match_one_process(runs, reference, mode, world):
    weights = runs(mode, world)["weights"]
    assert weights.keys() == reference.keys()
    for name, ref in reference.items():
        torch.testing.assert_close(weights[name], ref, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_example_is_on_exactly_one_rank_and_empty_shares_still_step(runs, mode):
    shares = runs(mode, 4)["shares"]
    for size, counts in shares:
        assert sum(counts) == size
    assert any(0 in counts and size > 0 for size, counts in shares), "no step had an empty share"


def test_fsdp_checkpoint_resumes_on_one_process(runs, data_dir, tmp_path):
    run = runs("fsdp", 2)
    out = tmp_path / "resume"
    shutil.copytree(run["out"] / "train", out)
    resumed = Trainer(make_config(data_dir, out), noise_free=True)  # parallel none, world of one
    assert resumed.step == SAVE_AT
    # The gathered weights written beside the shards are the weights DCP restored.
    gathered = load_model(out / "checkpoints" / f"step-{SAVE_AT:08d}").state_dict()
    for name, w in resumed.model.state_dict().items():
        assert torch.equal(w, gathered[name]), name
    while resumed.step < STEPS:
        resumed.train_step()
    for name, w in resumed.model.state_dict().items():
        torch.testing.assert_close(w, run["weights"][name], rtol=1e-5, atol=1e-6, msg=name)


def test_ddp_checkpoint_resumes_sharded_on_four_processes(runs):
    saved, resumed = runs("ddp", 2), runs("fsdp", 4)
    assert resumed["resumed_at"] == SAVE_AT
    for name, w in resumed["resumed_weights"].items():
        torch.testing.assert_close(w, saved["weights"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_fsdp_with_nccl_on_every_gpu_matches_one_process(data_dir, reference, tmp_path):
    world = torch.cuda.device_count()
    run_distributed(_worker, world, "fsdp", data_dir, tmp_path, tmp_path / "result.pt", False, None, "cuda")
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    noise = result["noises"][0].double()
    assert abs(float(noise.square().mean()) / (SIGMA * CLIP) ** 2 - 1) < 6 * math.sqrt(2 / noise.numel())
    for name, ref in reference.items():
        torch.testing.assert_close(result["weights"][name], ref, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_torchrun_cli_trains_with_fsdp_and_only_rank_zero_writes(data_dir, tmp_path):
    cfg = configio.to_dict(make_config(data_dir, tmp_path / "run", "fsdp"))
    cfg["privacy"]["steps"] = 2
    cfg["export"] = {"hf_dir": str(tmp_path / "hf")}
    configio.write_yaml(cfg, tmp_path / "train.yaml")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", "-m", "dptrain", "train", str(tmp_path / "train.yaml")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Privacy guarantee") == 1  # rank 0 alone reports
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # One writer: one training row per step, one evaluation row at the start and at the end.
    assert [r["step"] for r in rows if "lr" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 2]
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "dcp" / ".metadata").is_file()
    assert (tmp_path / "hf" / "config.json").is_file()


def _unit_worker(rank, world, mode, data_dir, out_dir, result_file, k):
    """A group-unit run with the noise off; records the weights and each rank's units per step."""
    trainer = Trainer(unit_config(data_dir, out_dir, mode, k), noise_free=True)
    units_per_rank = []
    for _ in range(STEPS):
        batch = trainer.sampler.rows_at(trainer.sampler.steps_taken).reshape(-1)
        mine = [s.reshape(-1, k) for s in trainer.parallel.micro_batches(batch, 2 * k, unit_size=k)]
        mine = [u.tolist() for s in mine for u in s if (u >= 0).any()]
        every = [None] * world
        dist.all_gather_object(every, mine)
        units_per_rank.append(every)
        trainer.train_step()
    weights = trainer.parallel.full_state_dict(trainer.model)
    if rank == 0:
        torch.save({"weights": weights, "units": units_per_rank}, result_file)


def unit_config(data_dir, out_dir, mode, k) -> TrainConfig:
    cfg = make_config(data_dir, out_dir, mode)
    cfg.privacy.unit, cfg.privacy.max_sequences_per_unit, cfg.privacy.expected_batch_size = "group", k, 5
    cfg.runtime.micro_batch_size = 2 * k  # two units per micro-batch
    return cfg


@pytest.fixture(scope="module")
def group_data(data_dir, tmp_path_factory):
    """The demo corpus packed by user: a unit is a user's (up to k) sequences."""
    return demo_by_user(data_dir, tmp_path_factory.mktemp("by-user"), 16)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_group_unit_on_two_processes_matches_one_process(group_data, tmp_path, mode):
    k = 2
    one = Trainer(unit_config(group_data, tmp_path / "one", "none", k), noise_free=True)
    batches = [one.sampler.rows_at(step) for step in range(STEPS)]
    for _ in range(STEPS):
        one.train_step()
    run_distributed(_unit_worker, 2, mode, group_data, tmp_path / "two", tmp_path / "result.pt", k)
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    for batch, ranks in zip(batches, result["units"]):
        # every sampled unit whole on exactly one rank, in the batch's order
        assert ranks[0] + ranks[1] == batch.tolist()
    assert any(ranks[0] and ranks[1] for ranks in result["units"]), "no step split its units over both ranks"
    for name, ref in one.model.state_dict().items():
        torch.testing.assert_close(result["weights"][name], ref, rtol=1e-4, atol=1e-5, msg=name)


# ---- without processes --------------------------------------------------------------------------
def test_micro_batches_keep_each_unit_whole_on_one_rank():
    units = np.array([[3, 4], [7, -1], [9, 10], [12, 13], [15, -1]], dtype=np.int64)
    for cls in (DataParallel, FullyShardedDP):
        seen = []
        for rank in range(2):
            for chunk in cls(DistEnv(rank, 2, rank)).micro_batches(units.reshape(-1), 4, unit_size=2):
                assert len(chunk) == 4
                seen += [u.tolist() for u in chunk.reshape(-1, 2) if (u >= 0).any()]
        assert seen == units.tolist()  # rank 0: units 0-2, rank 1: units 3-4, none cut in two
    with pytest.raises(ValueError, match="whole units"):
        list(DataParallel(DistEnv(0, 2, 0)).micro_batches(units.reshape(-1), 3, unit_size=2))


def test_micro_batches_cover_the_global_batch_once_in_lockstep():
    batch = np.array([3, 8, 9, 20, 21], dtype=np.int64)
    for cls in (DataParallel, FullyShardedDP):
        seen, counts = [], []
        for rank in range(4):
            chunks = list(cls(DistEnv(rank, 4, rank)).micro_batches(batch, 1))
            counts.append(len(chunks))
            seen += [int(i) for c in chunks for i in c if i >= 0]
        assert sorted(seen) == batch.tolist()
        if cls.lockstep:  # fsdp: every rank the same number, the largest share's
            assert counts == [2, 2, 2, 2]
        else:  # ddp: pure padding is skipped (the only collective is the final all-reduce)
            assert counts == [2, 1, 1, 1]
    single = list(Parallel().micro_batches(batch, 2))
    assert [c.tolist() for c in single] == [[3, 8], [9, 20], [21, -1]]
    assert list(Parallel().micro_batches(np.zeros(0, dtype=np.int64), 2)) == []


def test_parallel_none_refuses_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="runtime.parallel"):
        make_parallel("none", torch.device("cpu"))


def _default_randomness_worker(rank, world, data_dir, out_dir, result_file, secure):
    """A ddp run with no seed: the secret (or, secure, the OS draws) is rank 0's alone."""
    cfg = make_config(data_dir, out_dir, "ddp")
    cfg.runtime.seed, cfg.privacy.secure_randomness = None, secure
    trainer = Trainer(cfg)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    batches, cut = [], trainer.parallel.micro_batches

    def recording(indices, size, **kwargs):  # the global batch this rank takes its share of
        batches.append(indices.tolist())
        return cut(indices, size, **kwargs)

    trainer.parallel.micro_batches = recording
    for _ in range(STEPS):
        trainer.train_step()
    trainer.save_checkpoint()
    every = [None] * world
    dist.all_gather_object(every, {"batches": batches, "initial": initial,
                                   "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}})
    if rank == 0:
        torch.save(every, result_file)


@pytest.mark.slow
@pytest.mark.parametrize("secure", [False, True])
def test_ddp_with_default_randomness_is_one_run_of_one_secret(data_dir, tmp_path, secure):
    """Every rank samples the same global batches (secure: rank 0's OS draws; two own draws would
    differ) from the same initial weights; and (default mode) the weights are those of a
    one-process run given the same secret."""
    run_distributed(_default_randomness_worker, 2, data_dir, tmp_path / "two", tmp_path / "result.pt", secure)
    ranks = torch.load(tmp_path / "result.pt", weights_only=False)
    assert len(ranks[0]["batches"]) == STEPS and ranks[0]["batches"] == ranks[1]["batches"]
    for name, w in ranks[0]["initial"].items():
        assert torch.equal(w, ranks[1]["initial"][name]), name
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
    if secure:
        return
    (checkpoint,) = (tmp_path / "two" / "checkpoints").glob("step-*")
    state = torch.load(checkpoint / "train_state.pt", weights_only=True)
    assert state["randomness"]["mode"] == "secret"
    one = make_config(data_dir, tmp_path / "one")
    one.runtime.seed = int(state["randomness"]["secret"], 16)  # the same secret, given to one process
    trainer = Trainer(one)
    assert [trainer.sampler.batch_at(s)[0].tolist() for s in range(STEPS)] == ranks[0]["batches"]
    for name, w in trainer.model.state_dict().items():
        assert torch.equal(w, ranks[0]["initial"][name]), name
    for _ in range(STEPS):
        trainer.train_step()
    for name, w in trainer.model.state_dict().items():
        torch.testing.assert_close(w, ranks[0]["weights"][name], rtol=1e-5, atol=1e-6, msg=name)


def _disagreeing_worker(rank, world, data_dir, out_dir, result_file):
    cfg = make_config(data_dir, out_dir, "ddp")
    cfg.runtime.init_seed = rank  # each rank its own initial weights: must stop before step 1
    try:
        Trainer(cfg)
        outcome = "started"
    except UserError as err:
        outcome = str(err)
    if rank == 0:
        torch.save(outcome, result_file)


@pytest.mark.slow
def test_ranks_that_disagree_stop_before_step_one(data_dir, tmp_path):
    run_distributed(_disagreeing_worker, 2, data_dir, tmp_path / "run", tmp_path / "result.pt")
    outcome = torch.load(tmp_path / "result.pt")
    assert "disagree" in outcome and "initial weights" in outcome
