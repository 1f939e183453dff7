"""The private training loop: data -> Poisson sampler -> DP engine -> optimizer -> ledger -> checkpoint.

One logical step: draw a Poisson batch over the whole private set, cut it into fixed-size
micro-batches padded with weight-0 examples, accumulate clipped per-sequence gradients, add the
Gaussian noise once, divide by the expected batch size, and let Adam take the step. The ledger
records every step's (σ, q), journaled before anything of the step leaves the process, and the run
refuses to start when its plan exceeds the budget. Randomness: see dptrain.privacy.randomness.
"""
from __future__ import annotations

import hashlib
import math
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dptrain import configio
from dptrain.checkpoint import atomic_dir, write_model
from dptrain.data import PackedDataset, check_vocab
from dptrain.distributed import checkpoint as dist_checkpoint
from dptrain.distributed import make_parallel
from dptrain.dp import DPEngine
from dptrain.errors import UserError
from dptrain.model import Decoder, training_flops_per_token
from dptrain.privacy.accounting import PrivacyLedger, calibrate_noise
from dptrain.privacy.journal import JOURNAL_FILE, LedgerJournal, record_entries
from dptrain.privacy.lineage import is_public, read_spent, write_spent
from dptrain.privacy.noise import NoiseSource
from dptrain.privacy.randomness import Streams, fresh_secret
from dptrain.privacy.running import running_epsilon
from dptrain.privacy.sampling import PoissonSampler, UnitSampler
from dptrain.progress import progress_bar
from dptrain.train.config import TrainConfig
from dptrain.train.metrics import MetricsLog
from dptrain.train.report import privacy_report, write_report
from dptrain.train.schedule import lr_multiplier

IGNORE = -100
STATE_FILE = "train_state.pt"
TRAIN_CONFIG_FILE = "train_config.yaml"
# Sections that decide what was trained and with which guarantee: a resume must not change them.
FIXED_ON_RESUME = ("model", "data", "privacy", "optimizer", "schedule", "init_from")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"runtime.device is '{name}' but no CUDA device is available")
    return torch.device(name)


def inputs_and_targets(data: PackedDataset, slots: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token pairs of the sequences at `slots`; slot -1 is a padding example, all ignored, and so
    are the positions past a unit-packed sequence's real tokens."""
    real = slots >= 0
    tokens = torch.zeros(len(slots), data.seq_len, dtype=torch.long)
    lengths = np.zeros(len(slots), dtype=np.int64)
    if real.any():
        tokens[torch.from_numpy(real)] = data.batch(slots[real])
        lengths[real] = data.real_tokens(slots[real])
    targets = tokens[:, 1:].clone()
    # target j is token j + 1: kept only while j + 1 is a real token
    targets[torch.arange(data.seq_len - 1)[None, :] + 1 >= torch.from_numpy(lengths)[:, None]] = IGNORE
    return tokens[:, :-1].to(device), targets.to(device)


def _check_unit_options(cfg: TrainConfig) -> None:
    """What training by document or group unit does not support (yet), refused before any work."""
    p, k = cfg.privacy, cfg.privacy.max_sequences_per_unit
    if p.unit == "sequence":
        if k != 1:
            raise UserError("privacy.max_sequences_per_unit applies to privacy.unit document or group only")
        return
    if p.max_batch_size is not None:
        raise UserError(f"privacy.max_batch_size (truncated Poisson) is not supported with privacy.unit {p.unit}")
    if cfg.runtime.micro_batch_size % k:
        raise UserError(f"runtime.micro_batch_size {cfg.runtime.micro_batch_size} must be a multiple of "
                        f"privacy.max_sequences_per_unit {k}: a micro-batch holds whole units")


@dataclass
class StepResult:
    batch_size: int
    norms: torch.Tensor  # per-example gradient norms of the realised batch (private)
    losses: torch.Tensor  # per-example training losses (private)


class Trainer:
    def __init__(self, cfg: TrainConfig, config_dir: Path | None = None):
        self.cfg = cfg
        _check_unit_options(cfg)
        self.out_dir = Path(cfg.out_dir)
        self.parallel = make_parallel(cfg.runtime.parallel, resolve_device(cfg.runtime.device))
        self.device = self.parallel.device
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.train_data, self.eval_data = self._open_data()
        self.model_cfg = cfg.model_config(config_dir)
        self._check_data_fits_model()

        p = cfg.privacy
        # The sampled and accounted examples: sequences, or whole documents / groups (units).
        self.unit_size = 1 if p.unit == "sequence" else p.max_sequences_per_unit
        self.unit_ranges = None if p.unit == "sequence" else self._unit_ranges()
        self.num_examples = len(self.train_data) if self.unit_ranges is None else len(self.unit_ranges[0])
        what = "sequences" if p.unit == "sequence" else f"{p.unit}s"
        if p.expected_batch_size > self.num_examples:
            raise UserError(f"privacy.expected_batch_size {p.expected_batch_size} exceeds the "
                            f"{self.num_examples} training {what}")
        if p.delta >= 1 / self.num_examples:
            raise UserError(f"privacy.delta {p.delta:g} is not below 1/N = {1 / self.num_examples:.3g}: "
                            f"such a guarantee allows publishing one of the {what} whole")
        self.sampling_rate = p.expected_batch_size / self.num_examples
        # Truncated Poisson is accounted with the dataset size and the cap; plain Poisson needs neither.
        self.truncation = (dict(dataset_size=self.num_examples, max_batch_size=p.max_batch_size)
                           if p.max_batch_size else {})
        self.initialization, self.lineage, parent_ledger = self._parent()
        self.noise_multiplier = self._plan_noise(parent_ledger)
        checkpoint, state = self._latest_state()
        self.randomness = self._randomness(state)
        streams = (None if p.secure_randomness else
                   Streams(self.randomness["secret"], generation=self.randomness["generation"]))
        if self.randomness["mode"] == "seed" and self.parallel.is_main:
            print(f"dptrain: runtime.seed is set: the (ε, δ) guarantee holds only while the seed "
                  f"{cfg.runtime.seed} stays secret", file=sys.stderr)

        # Model init is public (runtime.init_seed), or else comes from the run's randomness.
        init_seed = cfg.runtime.init_seed
        if init_seed is None:
            init_seed = streams.torch_seed("model-init") if streams else fresh_secret() >> 193
        torch.manual_seed(init_seed)
        model = self._build_model().to(self.device)
        if cfg.runtime.compile:
            model.compile_mixers()
        self.model = self.parallel.prepare(model)
        self.engine = DPEngine(self.model, p.max_grad_norm)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, p.steps, cfg.schedule))
        if self.unit_ranges is None:
            self.sampler = PoissonSampler(self.num_examples, p.expected_batch_size, streams,
                                          max_batch_size=p.max_batch_size, secure=p.secure_randomness)
        else:
            self.sampler = UnitSampler(*self.unit_ranges, p.expected_batch_size, self.unit_size, streams,
                                       secure=p.secure_randomness)
        self.noise = NoiseSource(streams, secure=p.secure_randomness)
        self.ledger = parent_ledger
        self.journal = LedgerJournal(self.out_dir / JOURNAL_FILE)  # every rank reads it; rank 0 writes
        self.step = 0
        self.batch_sizes: list[int] = []
        self.eval_history: list[tuple[int, float]] = []
        self.nonfinite_examples = 0
        self.crash_released_steps = 0  # journaled steps a crash lost and this run does not replay
        self._report: dict | None = None
        if checkpoint is not None:
            self._resume(checkpoint, state)
        self._count_unreplayed_steps()

    # ---- set-up -------------------------------------------------------------------------------
    def _open_data(self) -> tuple[PackedDataset, PackedDataset | None]:
        data_cfg = self.cfg.data
        path = Path(data_cfg.path)
        if data_cfg.source == "demo":
            from dptrain.data.demo import prepare_configured_demo

            with self.parallel.main_first():  # one rank builds the shared folder
                path = prepare_configured_demo(data_cfg)
        if not path.is_dir():
            raise UserError(f"data.path {path} does not exist: run `dptrain data prepare` first")
        train = PackedDataset(path, split="train")
        if len(train) == 0:
            raise UserError(f"data.path {path} holds no training sequences")
        try:
            held_out = PackedDataset(path, split="eval")
        except UserError:
            held_out = None
        return train, (held_out if held_out is not None and len(held_out) else None)

    def _unit_ranges(self) -> tuple[np.ndarray, np.ndarray]:
        unit = self.cfg.privacy.unit
        if self.train_data.unit != unit:
            raise UserError(f"privacy.unit is {unit} but {self.train_data.path} is packed by "
                            f"{self.train_data.unit}: prepare it with `dptrain data prepare --unit {unit}`")
        return self.train_data.unit_ranges()

    def _check_data_fits_model(self) -> None:
        check_vocab(self.train_data, self.model_cfg)
        if self.train_data.seq_len - 1 > self.model_cfg.max_seq_len:
            raise UserError(f"sequences of {self.train_data.seq_len} tokens exceed "
                            f"model.max_seq_len {self.model_cfg.max_seq_len} + 1")

    def _plan_noise(self, parent: PrivacyLedger) -> float:
        """σ from the budget (calibrated) or the config (checked against the budget if one is given).
        A continuation's budget covers its parent's steps too."""
        p = self.cfg.privacy
        truncation = self.truncation
        sigma = p.noise_multiplier
        if sigma is None:
            if parent.steps:
                raise UserError(f"init_from {self.cfg.init_from} already spent {parent.steps} steps: give "
                                "privacy.noise_multiplier, and target_epsilon as the budget of the whole lineage")
            sigma = calibrate_noise(p.target_epsilon, p.delta, self.sampling_rate, p.steps,
                                    accountant=p.accountant, **truncation)
        planned = PrivacyLedger()
        planned.load_state_dict(parent.state_dict())
        planned.record(sigma, self.sampling_rate, count=p.steps, **truncation)
        eps = planned.epsilon(p.delta, p.accountant)
        if p.target_epsilon is not None and eps > p.target_epsilon:
            lineage = f" after the {parent.steps} steps of init_from" if parent.steps else ""
            raise UserError(f"the plan (σ={sigma:.4g}, q={self.sampling_rate:.4g}, {p.steps} steps{lineage}) "
                            f"spends ε={eps:.4g} > privacy.target_epsilon {p.target_epsilon:g} at δ={p.delta:g}")
        self.planned_epsilon = eps
        return sigma

    def _parent(self) -> tuple[dict | None, list[dict], PrivacyLedger]:
        """Where the weights come from, the runs before this one, and the steps they spent.

        A dptrain checkpoint has seen private data: its ledger (plus any steps its run released
        after it) carries into this run, as does the ledger file an export or an imported copy of one
        carries. Weights with no such record (a Hugging Face folder, a `dptrain import` of one) are
        taken as public: a fresh ledger, and the report names them.
        """
        ledger = PrivacyLedger()
        if self.cfg.init_from is None:
            return None, [], ledger
        source = Path(self.cfg.init_from)
        if not (source / STATE_FILE).is_file():
            spent = read_spent(source)  # an export, or an imported copy of one: the ledger travels with it
            if spent is not None:
                ledger, lineage = spent
                # the path as the (public) config gives it: a resolved path would publish the file layout
                lineage = [*lineage, {"weights": str(source), "ledger_steps": ledger.steps}]
                return {"source": str(source), "kind": "weights of a dptrain run, its ledger continues"}, lineage, ledger
            if (source / "config.json").is_file() or is_public(source):
                return {"source": str(source), "kind": "public weights (no record of private training), "
                                                       "fresh ledger"}, [], ledger
            raise UserError(f"init_from {source} has no {STATE_FILE}, so the steps it spent on private data are "
                            "unknown: continue from a checkpoint folder of its run")
        state = _load_state(source / STATE_FILE)
        ledger.load_state_dict(state["ledger"])
        if source.parent.name == "checkpoints":  # its run may have gone on past this checkpoint
            record_entries(ledger, LedgerJournal(source.parent.parent / JOURNAL_FILE).released_after(state["step"]))
        lineage = [*state.get("lineage", []),
                   {"checkpoint": str(source), "steps": state["step"], "ledger_steps": ledger.steps}]
        return {"source": str(source), "kind": "dptrain checkpoint, its ledger continues"}, lineage, ledger

    def _randomness(self, state: dict | None) -> dict:
        """The run's randomness: the checkpoint's on resume, else a fresh secret, the explicit seed, or
        the OS (secure). `draw` names one draw of randomness in the journal; it reveals nothing of it."""
        generation = len(self.lineage)  # a continuation never replays its parent's streams
        if self.cfg.privacy.secure_randomness:
            return {"mode": "secure", "secret": None, "draw": uuid.uuid4().hex, "generation": generation}
        if state is not None:
            if "randomness" not in state:
                raise UserError("the checkpoint was written by an older dptrain (no run randomness): use a new out_dir")
            saved = state["randomness"]
            return {**saved, "secret": int(saved["secret"], 16)}
        seed = self.cfg.runtime.seed
        if seed is not None:  # the seed is in the config anyway; its draw id is reproducible too
            draw = hashlib.sha256(f"dptrain-seed:{seed}:{generation}".encode()).hexdigest()[:32]
            return {"mode": "seed", "secret": seed, "draw": draw, "generation": generation}
        return {"mode": "secret", "secret": fresh_secret(), "draw": uuid.uuid4().hex, "generation": generation}

    def _journal_fields(self) -> dict:
        """What makes a step's release what it is: a journaled step with the same fields is replayed
        exactly (same batch, same noise), so it is not spent twice."""
        layout = f"fsdp-{self.parallel.env.world_size}" if self.parallel.mode == "fsdp" else "one-stream"
        return {"draw": self.randomness["draw"], "layout": layout, "noise_multiplier": self.noise_multiplier,
                "sampling_rate": self.sampling_rate, "dataset_size": self.truncation.get("dataset_size"),
                "max_batch_size": self.truncation.get("max_batch_size"),
                **({} if self.cfg.privacy.unit == "sequence" else
                   {"unit": self.cfg.privacy.unit, "max_sequences_per_unit": self.unit_size})}

    def _count_unreplayed_steps(self) -> None:
        """Steps journaled past the checkpoint that this run will not replay exactly: their outputs may
        have been seen (metrics, eval), so they are spent."""
        replays = None if self.cfg.privacy.secure_randomness else self._journal_fields()
        lost = self.journal.released_after(self.step, replayed_by=replays)
        record_entries(self.ledger, lost)
        self.crash_released_steps += len(lost)

    def _build_model(self) -> Decoder:
        if self.cfg.init_from is None:
            return Decoder(self.model_cfg)
        source = Path(self.cfg.init_from)
        if (source / "config.json").is_file():
            from dptrain.export import from_hf

            model = from_hf(source)
        else:
            from dptrain.checkpoint import load_model

            model = load_model(source)
        if model.cfg != self.model_cfg:
            raise UserError(f"init_from {source} holds a model whose config differs from `model`")
        return model

    def _build_optimizer(self) -> torch.optim.Optimizer:
        opt = self.cfg.optimizer
        matrices = [p for p in self.model.parameters() if p.ndim >= 2]
        vectors = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": matrices, "weight_decay": opt.weight_decay},
                  {"params": vectors, "weight_decay": 0.0}]
        cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)

    # ---- one private step ---------------------------------------------------------------------
    def _autocast(self):
        enabled = self.cfg.runtime.dtype == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> StepResult:
        p = self.cfg.privacy
        indices = self.sampler.sample()  # sequences, or units' rows [units, k] (-1: a padding row)
        if p.secure_randomness:  # an OS draw only rank 0 made; every rank needs the same batch
            indices = self.parallel.from_main(indices)
        self.engine.zero_grad()
        norms, losses = [], []
        k = self.unit_size
        # This rank's share of the global batch (all of it in a single process); with units, each
        # micro-batch holds whole units (k rows each) and one weight per unit.
        for slots in self.parallel.micro_batches(indices.reshape(-1), self.cfg.runtime.micro_batch_size,
                                                  unit_size=k):
            inputs, targets = inputs_and_targets(self.train_data, slots, self.device)
            weights = torch.from_numpy((slots.reshape(-1, k) >= 0).any(1).astype(np.float32)).to(self.device)
            with self._autocast():
                batch_norms = self.parallel.clipped_grad_sum(self.engine, inputs, targets, weights, k)
            real = weights > 0
            norms.append(batch_norms[real].detach().cpu())
            losses.append(self.engine.last_losses[real].float().cpu())
        # An empty draw is a normal step: the update is pure noise, and it is never skipped.
        self.parallel.privatize(self.engine, self.noise_multiplier, p.expected_batch_size, self.noise,
                                self.step)
        self.optimizer.step()
        self.scheduler.step()
        self.ledger.record(self.noise_multiplier, self.sampling_rate, **self.truncation)
        self.step += 1
        if self.parallel.is_main:  # durable before the step's metrics or checkpoint leave
            self.journal.append(self.step, self._journal_fields())
        self.batch_sizes.append(len(indices))
        self.nonfinite_examples += self.parallel.total(self.engine.reset_stats().nonfinite)
        return StepResult(len(indices),
                          torch.cat(norms) if norms else torch.zeros(0),
                          torch.cat(losses) if losses else torch.zeros(0))

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token cross-entropy on the held-out split (never sampled for training)."""
        if self.eval_data is None:
            return None
        self.model.eval()
        n = min(len(self.eval_data), self.cfg.eval.max_sequences)
        total, count = 0.0, 0
        for start in range(0, n, self.cfg.eval.micro_batch_size):
            slots = np.arange(start, min(n, start + self.cfg.eval.micro_batch_size), dtype=np.int64)
            inputs, targets = inputs_and_targets(self.eval_data, slots, self.device)
            with self._autocast():
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum",
                                   ignore_index=IGNORE)
            total += loss.item()
            count += int((targets != IGNORE).sum())
        self.model.train()
        return total / max(count, 1)

    # ---- the run ------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, p = self.cfg, self.cfg.privacy
        main = self.parallel.is_main  # every rank trains; only rank 0 writes logs and reports
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            configio.write_yaml(cfg, self.out_dir / TRAIN_CONFIG_FILE)
        log = (MetricsLog(self.out_dir, cfg.logging, configio.to_dict(cfg), resume_step=self.step)
               if main else _NoLog())
        flops_per_token = training_flops_per_token(self.model_cfg, self.train_data.seq_len - 1)
        # The expected batch, not the drawn one: the drawn size is a statistic of the private data
        # (with units: k row slots per unit, padding rows included, as the engine processes them).
        expected_tokens = p.expected_batch_size * self.unit_size * (self.train_data.seq_len - 1)
        bar = progress_bar(total=p.steps, initial=self.step, desc="private training", unit="step",
                   disable=not (cfg.logging.progress and main), dynamic_ncols=True)
        epsilon = None  # the running bound, as of the last logged step
        try:
            if self.step == 0:
                self._log_eval(log, bar)
            while self.step < p.steps:
                start = time.perf_counter()
                result = self.train_step()
                seconds = time.perf_counter() - start
                last = self.step == p.steps
                logged = self.step % cfg.logging.every == 0 or last
                if logged or epsilon is None:  # ~0.1 s on CPU: only for the steps that log it
                    epsilon = running_epsilon(self.ledger.runs, p.delta)  # fast bound; the report is exact
                metrics = {
                    "lr": self.scheduler.get_last_lr()[0],
                    "epsilon": epsilon,
                    "step_seconds": seconds,
                    "expected_tokens_per_second": expected_tokens / seconds,
                }
                if self.device.type == "cuda":
                    metrics["mfu"] = mfu(expected_tokens / seconds * flops_per_token, self.device)
                if cfg.logging.private_metrics:
                    metrics.update(private_metrics(result, p.max_grad_norm))
                if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                    self._log_eval(log, bar)
                if logged:
                    log.log(self.step, metrics)
                bar.set_postfix(eps=f"{epsilon:.3g}", tok_s=f"{metrics['expected_tokens_per_second']:.3g}",
                                eval=f"{self.eval_history[-1][1]:.3f}" if self.eval_history else "-")
                bar.update(1)
                if last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save_checkpoint()
        finally:
            bar.close()
            log.close()
            self.journal.close()
        report = self.report()
        if main:
            write_report(report, self.out_dir)
        return report

    def _log_eval(self, log: MetricsLog, bar) -> None:
        loss = self.evaluate()
        if loss is None:
            return
        self.eval_history.append((self.step, loss))
        log.log(self.step, {"eval/loss": loss})
        if self.parallel.is_main:
            bar.write(f"step {self.step}: held-out loss {loss:.4f}")

    def report(self) -> dict:
        """The privacy report at the current step; computed once per step (each accountant takes seconds)."""
        if self._report is None or self._report["steps"] != self.step:
            self._report = privacy_report(self)
        return self._report

    # ---- checkpoints --------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        path = self.checkpoint_root / f"step-{self.step:08d}"
        if self.parallel.distributed:
            return self._save_distributed_checkpoint(path)
        with atomic_dir(path) as tmp:
            write_model(self.model, tmp)
            self._write_run_state(tmp, optimizer=True)
        self._drop_old_checkpoints()
        return path

    def _save_distributed_checkpoint(self, path: Path) -> Path:
        """Model + optimizer shards from every rank via DCP; the rest from rank 0 (see dptrain.distributed)."""
        tmp = dist_checkpoint.staging_dir(path)
        if self.parallel.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.parallel.barrier()
        dist_checkpoint.save_sharded(self.model, self.optimizer, tmp)
        whole = self.parallel.gathered_model(self.model)
        if self.parallel.is_main:
            write_model(whole, tmp)
            self._write_run_state(tmp, optimizer=False)
            dist_checkpoint.publish(tmp, path)
            self._drop_old_checkpoints()
        self.parallel.barrier()
        return path

    def _write_run_state(self, tmp: Path, optimizer: bool) -> None:
        configio.write_yaml(self.cfg, tmp / TRAIN_CONFIG_FILE)
        # The private state: never to be shared (it holds the run's secret and private statistics).
        torch.save({
            "step": self.step,
            "randomness": {**self.randomness, "secret": None if self.randomness["secret"] is None
                           else format(self.randomness["secret"], "x")},
            "lineage": self.lineage,
            "crash_released_steps": self.crash_released_steps,
            "noise_multiplier": self.noise_multiplier,
            **({"optimizer": self.optimizer.state_dict()} if optimizer else {}),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "ledger": self.ledger.state_dict(),
            "batch_sizes": list(self.batch_sizes),
            "eval_history": list(self.eval_history),
            "nonfinite_examples": self.nonfinite_examples,
        }, tmp / STATE_FILE)
        write_spent(tmp, self.ledger, self.lineage)  # public: travels with the weights into exports
        write_report(self.report(), tmp)
        if self.train_data.tokenizer_path is not None:
            shutil.copy(self.train_data.tokenizer_path, tmp / "tokenizer.model")

    def _drop_old_checkpoints(self) -> None:
        for old in sorted(self.checkpoint_root.glob("step-*"))[:-self.cfg.checkpoint.keep_last]:
            shutil.rmtree(old)

    def latest_checkpoint(self) -> Path | None:
        done = sorted(c for c in self.checkpoint_root.glob("step-*") if (c / STATE_FILE).is_file())
        return done[-1] if done else None

    def _latest_state(self) -> tuple[Path | None, dict | None]:
        """The latest checkpoint and its private state, once checked against this config."""
        path = self.latest_checkpoint()
        if path is None:
            return None, None
        saved = configio.read_yaml(path / TRAIN_CONFIG_FILE)
        current = configio.to_dict(self.cfg)
        for section in FIXED_ON_RESUME:
            if saved.get(section) != current.get(section):
                raise UserError(f"{path} was written with a different '{section}' section: use a new "
                                f"out_dir, or restore the config it was trained with")
        if saved["runtime"]["seed"] != current["runtime"]["seed"]:
            raise UserError(f"{path} was written with runtime.seed {saved['runtime']['seed']}")
        return path, _load_state(path / STATE_FILE)

    def _resume(self, path: Path, state: dict) -> None:
        if dist_checkpoint.has_dcp(path):  # written by ddp / fsdp: DCP reshards to this world
            dist_checkpoint.load_sharded(self.model, self.optimizer, path)
        elif self.parallel.mode == "fsdp":
            raise UserError(f"{path} was written by a single-process run: resume it with "
                            "runtime.parallel none or ddp")
        else:
            from dptrain.checkpoint import load_model

            self.model.load_unique_state_dict(load_model(path).unique_state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.ledger = PrivacyLedger()  # the checkpoint's ledger already holds the parent's steps
        self.ledger.load_state_dict(state["ledger"])
        self.lineage = list(state["lineage"])
        self.crash_released_steps = state["crash_released_steps"]
        self.noise_multiplier = state["noise_multiplier"]
        self.step = state["step"]
        self.batch_sizes = list(state["batch_sizes"])
        self.eval_history = [tuple(x) for x in state["eval_history"]]
        self.nonfinite_examples = state["nonfinite_examples"]
        if self.parallel.is_main:
            print(f"resuming from {path} at step {self.step}")


def _load_state(file: Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, not a pickle traceback
        raise UserError(f"{file} is corrupt ({type(err).__name__})") from None


def private_metrics(result: StepResult, clip: float) -> dict:
    """Un-noised statistics of the private batch: outside the guarantee (logging.private_metrics)."""
    return {
        "private/batch_size": result.batch_size,
        "private/clipped_fraction": float((result.norms > clip).float().mean()) if len(result.norms) else 0.0,
        "private/grad_norm_median": float(result.norms.median()) if len(result.norms) else 0.0,
        "private/train_loss": float(result.losses.mean()) if len(result.losses) else None,
    }


class _NoLog:
    """Ranks other than 0 log nothing."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


# Dense bf16 peak of common accelerators, for the MFU figure.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def mfu(flops_per_second: float, device: torch.device) -> float:
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), math.nan)
    return flops_per_second / peak
