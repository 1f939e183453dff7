"""The private training loop: data -> Poisson sampler -> DP engine -> optimizer -> books -> checkpoint.

One logical step: draw a Poisson batch over the whole private set, cut it into fixed-size
micro-batches padded with weight-0 examples, accumulate clipped per-sequence gradients, let the
mechanism add the Gaussian noise once and divide by the expected batch size, let Adam take the
step, and record the step in the privacy books before anything of it leaves the process.

What is private lives in one place each: the mechanism (σ, C, q, unit, truncation:
dptrain.privacy.mechanism), the randomness (dptrain.train.origin, dptrain.privacy.randomness),
what is recorded (dptrain.privacy.books). This module wires them and runs the loop.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dptrain import configio
from dptrain.distributed import make_parallel
from dptrain.distributed.runtime import resolve_device
from dptrain.dp import DPEngine
from dptrain.errors import Stopped, UserError
from dptrain.privacy.books import PrivacyBooks
from dptrain.privacy.data_ledger import DataLedger
from dptrain.privacy.journal import LedgerJournal
from dptrain.privacy.lineage import write_spent
from dptrain.privacy.mechanism import plan_mechanism
from dptrain.privacy.running import running_epsilon
from dptrain.progress import progress_bar
from dptrain.train import batches, checkpoints, origin
from dptrain.train.checkpoints import STATE_FILE, Checkpointer  # noqa: F401  (STATE_FILE: public name)
from dptrain.train.config import TrainConfig
from dptrain.train.evaluation import heldout_loss
from dptrain.train.metrics import MetricsLog, NoLog, private_metrics, timing_metrics
from dptrain.train.report import privacy_report, write_report
from dptrain.train.run_folder import RunFolder
from dptrain.train.schedule import lr_multiplier
from dptrain.train.stopping import StopRequests

# No elapsed time or rate: a step's time grows with the private, realised batch size.
TIMELESS_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"


@dataclass
class StepResult:
    batch_size: int
    norms: torch.Tensor  # per-example gradient norms of the realised batch (private)
    losses: torch.Tensor  # per-example training losses (private)


class Trainer:
    def __init__(self, cfg: TrainConfig, config_dir: Path | None = None, noise_free: bool = False):
        """`noise_free`: clip and normalise as always but add no noise (scaling-law sweeps on public
        data; ε is infinite, and the report and the data's ledger say so)."""
        self.cfg = cfg
        self.folder = RunFolder(cfg.out_dir)
        self.out_dir = self.folder.path
        self.parallel = make_parallel(cfg.runtime.parallel, resolve_device(cfg.runtime.device))
        self.device = self.parallel.device
        if self.parallel.is_main:  # held until fit() ends (or this object goes): one run per folder
            self.folder.lock()
        try:
            self._set_up(cfg, config_dir, noise_free)
        except BaseException:
            self.folder.unlock()
            raise

    def _set_up(self, cfg: TrainConfig, config_dir: Path | None, noise_free: bool) -> None:
        p = cfg.privacy
        if cfg.runtime.threads:
            torch.set_num_threads(cfg.runtime.threads)
        self.train_data, self.eval_data = batches.open_data(cfg.data, self.parallel.main_first)
        self.model_cfg = cfg.model_config(config_dir)
        batches.check_fits_model(self.train_data, self.model_cfg)
        self.unit_ranges = batches.unit_ranges(self.train_data, p.unit, demo=cfg.data.source == "demo")
        self.num_examples = len(self.train_data) if self.unit_ranges is None else len(self.unit_ranges[0])
        self.fingerprint = self.train_data.fingerprint

        self.initialization, self.lineage, spent = origin.parent_of(cfg.init_from)
        plan = plan_mechanism(p, self.num_examples, cfg.runtime.micro_batch_size, spent, noise_free=noise_free)
        self.mechanism, self.planned_epsilon = plan.mechanism, plan.epsilon
        self.checkpointer = Checkpointer(self.folder.checkpoints, self.parallel, cfg.checkpoint.keep_last)
        if self.parallel.is_main:
            checkpoints.remove_leftovers(self.folder.checkpoints)
        # rank 0 checks the checkpoints (setting damaged ones aside) and names the one every rank resumes
        checkpoint = self.parallel.from_main(checkpoints.latest_intact(self.folder.checkpoints)
                                             if self.parallel.is_main else None)
        state = None
        if checkpoint is not None:
            checkpoints.check_resumable(checkpoint, cfg)
            state = checkpoints.load_state(checkpoint / STATE_FILE)
        self.randomness = origin.run_randomness(cfg.runtime.seed, p.secure_randomness, len(self.lineage),
                                                state, self.parallel.from_main)
        # names this run in the data's ledger, across its resumes
        self.run_id = self.parallel.from_main((state or {}).get("run_id") or uuid.uuid4().hex)
        streams = origin.streams_of(self.randomness)
        if self.randomness["mode"] == "seed" and self.parallel.is_main:
            print(f"dptrain: runtime.seed is set: the (ε, δ) guarantee holds only while the seed "
                  f"{cfg.runtime.seed} stays secret", file=sys.stderr)

        torch.manual_seed(origin.init_seed(cfg.runtime.init_seed, streams, self.parallel.from_main))
        model = origin.initial_model(cfg.init_from, self.model_cfg).to(self.device)
        # ranks that differ in randomness, mechanism, data or initial weights stop here, before step 1
        self.parallel.check_agreement(lambda: origin.agreement_facts(self.randomness, self.mechanism,
                                                                     self.fingerprint, model))
        if cfg.runtime.compile:
            model.compile_mixers()
        self.model = self.parallel.prepare(model)
        self.engine = DPEngine(self.model, self.mechanism.max_grad_norm)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, p.steps, cfg.schedule))
        self.sampler = self.mechanism.sampler(streams, p.secure_randomness, self.unit_ranges)
        self.noise = self.mechanism.noise_source(streams, p.secure_randomness)
        layout = f"fsdp-{self.parallel.env.world_size}" if self.parallel.mode == "fsdp" else "one-stream"
        self.noise_layout = layout  # one stream (rank 0's) or a stream, and BandMF buffers, per shard
        # a derived folder (the audit's canary copy) names the data whose ledger it spends on
        data_ledger = DataLedger(self.train_data.manifest.get("ledger_of", self.train_data.path))
        if self.parallel.is_main:
            data_ledger.check_writable()
        self.books = PrivacyBooks(self.mechanism, spent, LedgerJournal(self.folder.journal), data_ledger,
                                  release={"draw": self.randomness["draw"], "layout": layout},
                                  run_id=self.run_id,
                                  fingerprint=self.fingerprint, writes=self.parallel.is_main)
        self.step = 0
        self.batch_sizes: list[int] = []
        self.eval_history: list[tuple[int, float]] = []
        self.nonfinite_examples = 0
        self._report: dict | None = None
        if checkpoint is not None:
            self._resume(checkpoint, state)
        self.books.count_unreplayed(self.step, replays=not p.secure_randomness)
        self.books.check_budget(p.data_budget, p.delta, p.accountant, p.steps - self.step)

    # ---- read-only views of the mechanism and the books -----------------------------------------
    @property
    def noise_multiplier(self) -> float:
        return self.mechanism.noise_multiplier

    @property
    def sampling_rate(self) -> float:
        return self.mechanism.sampling_rate

    @property
    def ledger(self):
        return self.books.ledger

    # ---- set-up -------------------------------------------------------------------------------
    def _build_optimizer(self) -> torch.optim.Optimizer:
        opt = self.cfg.optimizer
        matrices = [p for p in self.model.parameters() if p.ndim >= 2]
        vectors = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": matrices, "weight_decay": opt.weight_decay},
                  {"params": vectors, "weight_decay": 0.0}]
        if opt.name == "sgd":
            return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.betas[0])
        cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)

    # ---- one private step ---------------------------------------------------------------------
    def _autocast(self):
        enabled = self.cfg.runtime.dtype == "bfloat16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self) -> StepResult:
        indices = self.sampler.sample()  # sequences, or units' rows [units, k] (-1: a padding row)
        if self.cfg.privacy.secure_randomness:  # an OS draw only rank 0 made; every rank needs the same batch
            indices = self.parallel.from_main(indices)
        self.engine.zero_grad()
        norms, losses = [], []
        k = self.mechanism.sequences_per_unit
        # This rank's share of the global batch (all of it in a single process); with units, each
        # micro-batch holds whole units (k rows each) and one weight per unit.
        for slots in self.parallel.micro_batches(indices.reshape(-1), self.cfg.runtime.micro_batch_size,
                                                  unit_size=k):
            inputs, targets = batches.inputs_and_targets(self.train_data, slots, self.device)
            weights = torch.from_numpy((slots.reshape(-1, k) >= 0).any(1).astype(np.float32)).to(self.device)
            with self._autocast():
                batch_norms = self.parallel.clipped_grad_sum(self.engine, inputs, targets, weights, k)
            real = weights > 0
            norms.append(batch_norms[real].detach().cpu())
            losses.append(self.engine.last_losses[real].float().cpu())
        # An empty draw is a normal step: the update is pure noise, and it is never skipped.
        self.parallel.privatize(self.engine, self.mechanism, self.noise, self.step)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.books.record_step(self.step)  # durable before the step's metrics or checkpoint leave
        self.batch_sizes.append(len(indices))
        self.nonfinite_examples += self.parallel.total(self.engine.reset_stats().nonfinite)
        return StepResult(len(indices), torch.cat(norms) if norms else torch.zeros(0),
                          torch.cat(losses) if losses else torch.zeros(0))

    def evaluate(self) -> float | None:
        """Mean token cross-entropy on the held-out split (never sampled for training)."""
        if self.eval_data is None or not self.cfg.eval.max_sequences:
            return None
        return heldout_loss(self.model, self.eval_data, self.cfg.eval.max_sequences,
                            self.cfg.eval.micro_batch_size, self.device, self._autocast)

    # ---- the run ------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, p = self.cfg, self.cfg.privacy
        main = self.parallel.is_main  # every rank trains; only rank 0 writes logs and reports
        try:
            return self._fit(cfg, p, main)
        finally:
            self.folder.unlock()

    def close(self) -> None:
        """Stop here without finishing, as a crash would: the journal is closed and the run folder
        free for the run that resumes it."""
        self.books.close()
        self.folder.unlock()

    def _fit(self, cfg, p, main: bool) -> dict:
        if main:
            configio.write_yaml(cfg, self.folder.config)
        log = (MetricsLog(self.out_dir, cfg.logging, configio.to_dict(cfg), resume_step=self.step)
               if main else NoLog())
        private = cfg.logging.private_metrics
        stack = contextlib.ExitStack()
        bar = progress_bar(total=p.steps, initial=self.step, desc="private training", unit="step",
                           disable=not (cfg.logging.progress and main), dynamic_ncols=True,
                           **({} if private else {"bar_format": TIMELESS_BAR}))
        epsilon = None  # the running bound, as of the last logged step
        try:
            stop = stack.enter_context(StopRequests())
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
                metrics = {"lr": self.scheduler.get_last_lr()[0], "epsilon": epsilon}
                if private:  # time per step grows with the realised batch: private, like the rest
                    metrics.update(private_metrics(result, p.max_grad_norm),
                                   **timing_metrics(seconds, self.model_cfg, self.train_data.seq_len,
                                                    p.expected_batch_size * self.mechanism.sequences_per_unit,
                                                    self.device))
                if last or (cfg.eval.every and self.step % cfg.eval.every == 0):
                    self._log_eval(log, bar)
                if logged:
                    log.log(self.step, metrics)
                bar.set_postfix(eps=f"{epsilon:.3g}",
                                eval=f"{self.eval_history[-1][1]:.3f}" if self.eval_history else "-")
                bar.update(1)
                saved = last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0)
                if saved:
                    self.save_checkpoint()
                if not last and (signum := self.parallel.max(stop.signal or 0)):  # every rank stops at one step
                    path = self.save_checkpoint() if not saved else self.latest_checkpoint()
                    raise Stopped(f"stopped by {signal.Signals(signum).name} at step {self.step} of {p.steps}; "
                                  f"{path} holds everything so far: run the same command again to resume",
                                  128 + signum)
        finally:
            stack.close()
            bar.close()
            log.close()
            self.books.close()
        report = self.report()
        if main:
            write_report(report, self.out_dir)
        return report

    def record_eval(self) -> float | None:
        """Evaluate, stop a diverged run, and keep the loss in the eval history (which checkpoints carry)."""
        loss = self.evaluate()
        if loss is None:
            return None
        if not math.isfinite(loss):
            raise UserError(f"the held-out loss is {loss} at step {self.step}: training diverged; lower "
                            "optimizer.lr (or check the data) and start again from an earlier checkpoint")
        self.eval_history.append((self.step, loss))
        return loss

    def _log_eval(self, log: MetricsLog, bar) -> None:
        loss = self.record_eval()
        if loss is None:
            return
        log.log(self.step, {"eval/loss": loss})
        if self.parallel.is_main:
            bar.write(f"step {self.step}: held-out loss {loss:.4f}")

    def report(self) -> dict:
        """The privacy report at the current step; computed once per step (each accountant takes seconds)."""
        if self._report is None or self._report["steps"] != self.step:
            self._report = privacy_report(self)
        return self._report

    # ---- checkpoints --------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        return checkpoints.latest(self.folder.checkpoints)

    def save_checkpoint(self) -> Path:
        local = (getattr(p, "to_local", lambda: p)() for p in self.model.parameters())  # fsdp: this rank's shard
        if self.parallel.max(int(not all(bool(torch.isfinite(t).all()) for t in local))):
            raise UserError(f"the parameters are not finite at step {self.step}: training diverged; lower "
                            "optimizer.lr, and start again from an earlier checkpoint (none is overwritten)")
        return self.checkpointer.save(self.step, self.model, self.optimizer, self._private_state(),
                                      self._write_public)

    def _private_state(self) -> dict:
        """Never to be shared: the run's secret and statistics of the private data."""
        return {
            "step": self.step,
            "run_id": self.run_id,
            "randomness": origin.secret_state(self.randomness),
            "lineage": self.lineage,
            **self.books.state_dict(),
            "noise_multiplier": self.mechanism.noise_multiplier,
            "data_fingerprint": self.fingerprint,
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            # BandMF: each noising rank's last b-1 noise tensors (secret), by rank
            "noise": self.parallel.gathered_on_main(self.noise.state_dict()),
            "noise_layout": self.noise_layout,
            "batch_sizes": list(self.batch_sizes),
            "eval_history": list(self.eval_history),
            "nonfinite_examples": self.nonfinite_examples,
        }

    def _load_noise(self, state: dict) -> None:
        """The noise's own state (BandMF's or BLT's buffers): rank 0's in one process and ddp, each rank's
        own under fsdp, whose buffers are shards, so such a run resumes in the layout it was saved in."""
        saved = state.get("noise_layout", self.noise_layout)
        if self.mechanism.kind != "dpsgd" and saved != self.noise_layout:
            raise UserError(f"this {self.mechanism.kind} run's noise buffers were saved in the {saved} layout, not {self.noise_layout}: "
                            "resume it with the same runtime.parallel and number of processes")
        sharded = self.noise_layout.startswith("fsdp")
        if not (sharded or self.parallel.is_main):
            return  # under ddp only rank 0 adds noise: the other ranks keep no buffers
        states = state.get("noise") or [{}]
        own = self.parallel.env.rank if sharded else 0
        self.noise.load_state_dict(states[own] if own < len(states) else {})

    def _write_public(self, folder: Path) -> None:
        configio.write_yaml(self.cfg, folder / checkpoints.TRAIN_CONFIG_FILE)
        write_spent(folder, self.ledger, self.lineage)  # public: travels with the weights into exports
        write_report(self.report(), folder)
        if self.train_data.tokenizer_path is not None:
            shutil.copy(self.train_data.tokenizer_path, folder / "tokenizer.model")

    def _resume(self, path: Path, state: dict) -> None:
        saved = state.get("data_fingerprint")
        if saved is not None and saved != self.fingerprint:
            raise UserError(f"the data at {self.train_data.path} changed since {path} was written (its content "
                            "differs): resuming would release the same noise on other data; restore the data "
                            "or use a new out_dir")
        if not math.isclose(state["noise_multiplier"], self.mechanism.noise_multiplier, rel_tol=1e-12):
            raise UserError(f"{path} was trained with σ {state['noise_multiplier']:.6g}, the plan now gives "
                            f"{self.mechanism.noise_multiplier:.6g}: use a new out_dir")
        checkpoints.load_weights(path, self.model, self.optimizer, state, self.parallel.mode)
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self._load_noise(state)
        self.books.load_state_dict(state)
        self.lineage = list(state["lineage"])
        self.step = state["step"]
        self.batch_sizes = list(state["batch_sizes"])
        self.eval_history = [tuple(x) for x in state["eval_history"]]
        self.nonfinite_examples = state["nonfinite_examples"]
        if self.parallel.is_main:
            print(f"resuming from {path} at step {self.step}")
