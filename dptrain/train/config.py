"""The training config: one YAML file validated into typed dataclasses.

Every section has defaults except what a run cannot guess (the model, the data and the privacy
budget). `dptrain train CONFIG key=value ...` applies dotted overrides before validation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dptrain import configio
from dptrain.model import DecoderConfig


@dataclass
class DataConfig:
    path: str  # a folder written by `dptrain data prepare`
    # "demo" builds the bundled synthetic corpus into `path` when it is missing.
    source: Literal["prepared", "demo"] = "prepared"
    demo_seq_len: int = 128
    demo_vocab_size: int = 2048
    demo_records: int = 6_000  # records in the demo corpus (fewer: more passes per step)
    demo_canary_owner: Literal["spread", "one-user"] = "spread"  # "one-user": each secret in one user's records
    demo_unit: Literal["sequence", "document", "group"] = "sequence"  # how the demo folder is packed


@dataclass
class PrivacyConfig:
    expected_batch_size: int  # B: each sequence (or unit) joins a step with probability q = B / N
    steps: int
    delta: float
    target_epsilon: float | None = None  # calibrate the noise to this budget ...
    noise_multiplier: float | None = None  # ... or give σ directly (then ε is derived)
    max_grad_norm: float = 1.0
    # Calibration and the budget check use this one, so only upper bounds are offered (PRV's
    # point value is an estimate; the report still shows it, labelled as one).
    accountant: Literal["pld", "rdp"] = "pld"
    max_batch_size: int | None = None  # truncated Poisson: larger draws are cut, and accounted
    # Sampling and noise straight from the OS CSPRNG: no seed, nothing replayable, no bit-exact resume.
    secure_randomness: bool = False
    # What the guarantee protects: one sequence (VaultGemma), or a whole document or group (user),
    # which needs data prepared with `--unit document|group`; expected_batch_size then counts units.
    unit: Literal["sequence", "document", "group"] = "sequence"
    max_sequences_per_unit: int = 1  # k: sequences a sampled unit contributes (document/group units)
    # The most ε all runs recorded in the data's own ledger may spend on it, this one included
    # (None: no limit). A run that would go past it is refused before step 1.
    data_budget: float | None = None
    # dpsgd: independent noise every step. bandmf: noise correlated across `bands` steps, cyclic
    # Poisson sampling (dptrain.privacy.bandmf); bands None: chosen for the budget (at most 64).
    # blt: noise correlated through `buffers` decaying buffers, the data in N/B parts taken in turn,
    # accounted without amplification (dptrain.privacy.blt); buffers None: chosen (at most 4);
    # buffers 0: noise z_t − λ z_{t−1}, the previous draw made again from its stream (no buffer).
    mechanism: Literal["dpsgd", "bandmf", "blt"] = "dpsgd"
    bands: int | None = None
    buffers: int | None = None

    def __post_init__(self):
        if self.expected_batch_size <= 0:
            raise ValueError("expected_batch_size must be positive")
        if self.steps <= 0:
            raise ValueError("steps must be positive")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("give target_epsilon (σ is calibrated) or noise_multiplier")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError("target_epsilon must be positive")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ValueError("noise_multiplier must be positive: σ = 0 gives no privacy")
        if self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be positive")
        if self.max_batch_size is not None and self.max_batch_size < self.expected_batch_size:
            raise ValueError("max_batch_size must be at least expected_batch_size")
        if self.data_budget is not None and not self.data_budget > 0:
            raise ValueError("data_budget must be positive")
        if self.mechanism not in ("dpsgd", "bandmf", "blt"):
            raise ValueError(f"mechanism must be dpsgd, bandmf or blt, got {self.mechanism!r}")
        if self.buffers is not None and (self.mechanism != "blt" or not 0 <= self.buffers <= 8):
            raise ValueError("buffers applies to mechanism blt only, and must lie in [0, 8]")
        if self.bands is not None and (self.mechanism != "bandmf" or not 1 <= self.bands <= 255):
            raise ValueError("bands applies to mechanism bandmf only, and must lie in [1, 255]")
        if self.max_sequences_per_unit < 1:
            raise ValueError("max_sequences_per_unit must be at least 1")


@dataclass
class OptimizerConfig:
    # sgd: heavy-ball momentum, betas[0] its coefficient (the linear update correlated noise's
    # strategies are optimised for; Adam's second moment sees each step's full noise)
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices only, never to norm gains

    def __post_init__(self):
        # lr = 0 would spend the whole budget on a run that cannot learn
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        if not self.eps > 0 or self.weight_decay < 0:
            raise ValueError("eps must be positive and weight_decay non-negative")


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    decay: Literal["cosine", "exponential", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # the final learning rate as a fraction of the peak


@dataclass
class RuntimeConfig:
    micro_batch_size: int = 16
    device: str = "auto"  # auto = cuda when available
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16 = autocast, float32 master weights
    compile: bool = False  # torch.compile the parameter-free parts of each layer
    # None (default): a fresh 256-bit secret, kept only in the private train_state.pt. A seed makes
    # runs reproducible, and the guarantee then holds only while the seed stays secret.
    seed: int | None = None
    # The model's initial weights only (public, not part of the guarantee): None = from the run's randomness.
    init_seed: int | None = None
    threads: int | None = None  # CPU threads; None keeps torch's default
    # Several processes (torchrun): ddp = replicated weights, fsdp = sharded (see docs/distributed.md).
    parallel: Literal["none", "ddp", "fsdp"] = "none"

    def __post_init__(self):
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be at least 1, got {self.micro_batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")


@dataclass
class EvalConfig:
    every: int = 50  # steps between evaluations of the held-out split; 0 = only at the end
    max_sequences: int = 256
    micro_batch_size: int = 32

    def __post_init__(self):
        if self.every < 0 or self.max_sequences < 0 or self.micro_batch_size < 1:
            raise ValueError("eval.every and eval.max_sequences must be >= 0 and eval.micro_batch_size >= 1")


@dataclass
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "dptrain"
    run_name: str | None = None
    progress: bool = True
    every: int = 1
    # Statistics of private batches (training loss, clipping, gradient norms, batch sizes) are
    # released without noise, outside the guarantee: off unless asked for.
    private_metrics: bool = False

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"logging.every must be at least 1, got {self.every}")


@dataclass
class CheckpointConfig:
    every: int = 100  # steps; 0 = only at the end
    keep_last: int = 2

    def __post_init__(self):
        if self.every < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")


@dataclass
class ExportConfig:
    hf_dir: str | None = None  # write a Hugging Face folder at the end of training
    dtype: Literal["float32", "bfloat16"] = "float32"
    sample_prompt: str | None = None  # print a sampled continuation after export
    sample_tokens: int = 40
    sample_temperature: float = 0.8


@dataclass
class TrainConfig:
    model: str | DecoderConfig  # a model YAML path or the fields inline
    data: DataConfig
    privacy: PrivacyConfig
    out_dir: str = "runs/train"
    # A dptrain checkpoint (its ledger carries over) or public Hugging Face weights (a fresh ledger).
    init_from: str | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self):
        if self.privacy.secure_randomness and self.runtime.seed is not None:
            raise ValueError("privacy.secure_randomness draws from the OS and takes no runtime.seed")

    def model_config(self, base_dir: Path | None = None) -> DecoderConfig:
        if isinstance(self.model, DecoderConfig):
            return self.model
        path = Path(self.model)
        if not path.is_absolute() and not path.exists() and base_dir is not None:
            path = base_dir / path
        return DecoderConfig.from_yaml(path)


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    return configio.load(TrainConfig, path, overrides)
