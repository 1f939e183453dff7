"""`dptrain train CONFIG [key=value ...]`: a private training run, resumed when its folder has checkpoints."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    parser = sub.add_parser("train", help="train a model with DP-SGD")
    parser.add_argument("config", help="training config YAML (see configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. privacy.steps=200 runtime.device=cuda")
    parser.set_defaults(func=run)


def run(args) -> int:
    from dptrain.train.config import load_train_config
    from dptrain.train.report import summary
    from dptrain.train.trainer import Trainer

    cfg = load_train_config(args.config, args.overrides)
    trainer = Trainer(cfg, config_dir=Path(args.config).parent)
    try:
        report = trainer.fit()
        # Under runtime.parallel every rank trains; rank 0 alone gathers the weights and speaks.
        model = trainer.parallel.gathered_model(trainer.model) if cfg.export.hf_dir else None
    except BaseException:
        trainer.parallel.shutdown(clean=False)
        raise
    trainer.parallel.shutdown()
    if not trainer.parallel.is_main:
        return 0
    if trainer.eval_history:
        first, last = trainer.eval_history[0], trainer.eval_history[-1]
        print(f"held-out loss: {first[1]:.4f} at step {first[0]} -> {last[1]:.4f} at step {last[0]}")
    if cfg.export.hf_dir:
        export_and_sample(model, trainer, cfg)
    print(summary(report))
    print(f"run folder: {trainer.out_dir} (metrics.jsonl, checkpoints/, privacy_report.json)")
    return 0


def export_and_sample(model, trainer, cfg) -> None:
    import secrets

    import torch

    from dptrain.export import to_hf
    from dptrain.generate import sample_generate

    model = model.float().cpu()
    tokenizer = trainer.train_data.tokenizer_path
    to_hf(model, cfg.export.hf_dir, tokenizer_path=tokenizer, dtype=cfg.export.dtype,
          spent=(trainer.ledger, trainer.lineage))
    print(f"exported a Hugging Face model to {cfg.export.hf_dir}")
    if cfg.export.sample_prompt and tokenizer is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        prompt = torch.tensor([[sp.bos_id(), *sp.encode(cfg.export.sample_prompt)]])
        out = sample_generate(model, prompt, cfg.export.sample_tokens, cfg.export.sample_temperature,
                              seed=cfg.runtime.seed if cfg.runtime.seed is not None else secrets.randbits(63),
                              eos_id=sp.eos_id())
        print(f"sample (temperature {cfg.export.sample_temperature:g}): "
              f"{cfg.export.sample_prompt}{sp.decode(out[0].tolist())}")
