"""`dptrain sample` and `dptrain eval` on a tiny model, from a checkpoint and from its export."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from contextlib import nullcontext

import pytest
import torch

from dptrain.checkpoint import save_model
from dptrain.cli import main
from dptrain.data import PackedDataset, prepare, train_tokenizer
from dptrain.data.demo import write_demo_corpus
from dptrain.export import to_hf
from dptrain.model import Decoder, DecoderConfig
from dptrain.train.evaluation import heldout_loss

VOCAB = 400


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A tokenizer trained on public text, the private records prepared with a held-out split, and
    a tiny model saved as a checkpoint (with the tokenizer) and exported."""
    root = tmp_path_factory.mktemp("sample_eval")
    corpus = write_demo_corpus(root / "corpus", seed=2, num_records=80, num_public_paragraphs=400)
    sp_model = train_tokenizer([corpus["public"]], VOCAB, root / "public.model")
    data = prepare([corpus["private"]], sp_model, 32, root / "prep", eval_fraction=0.2, progress=False)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                                  num_heads=2, num_kv_heads=1, head_dim=16, max_seq_len=48,
                                  query_pre_attn_scalar=16.0))
    checkpoint = save_model(model, root / "ckpt")
    shutil.copyfile(sp_model, checkpoint / "tokenizer.model")
    export = to_hf(model, root / "hf", tokenizer_path=sp_model, verify=False)
    return {"root": root, "model": model, "checkpoint": checkpoint, "export": export, "data": data,
            "corpus": corpus, "tokenizer": sp_model}


def run_ok(argv, capsys) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


def test_sample_is_seeded_and_the_same_from_checkpoint_and_export(setup, capsys):
    argv = ["--prompt", "Patient", "--tokens", "12", "--seed", "3"]
    from_checkpoint = run_ok(["sample", str(setup["checkpoint"]), *argv], capsys)
    assert from_checkpoint == run_ok(["sample", str(setup["checkpoint"]), *argv], capsys)
    assert from_checkpoint == run_ok(["sample", str(setup["export"]), *argv], capsys)
    assert from_checkpoint[0].startswith("Patient")
    greedy = run_ok(["sample", str(setup["export"]), "--prompt", "", "--temperature", "0"], capsys)
    assert isinstance(greedy, list)


def test_eval_loss_is_the_held_out_loss_from_checkpoint_and_export(setup, capsys):
    data = PackedDataset(setup["data"], "eval")
    want = heldout_loss(setup["model"], data, len(data), 8, torch.device("cpu"), nullcontext)
    for folder in ("checkpoint", "export"):
        out = run_ok(["eval", str(setup[folder]), "--data", str(setup["data"]), "--json",
                      "--device", "cpu"], capsys)
        result = json.loads(out[0])
        assert result["loss"] == pytest.approx(want, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
        assert result["sequences"] == len(data) and result["tokens"] == len(data) * (data.seq_len - 1)
        assert "outside the (epsilon, delta) guarantee" in result["privacy"]


def test_eval_says_what_it_releases(setup, capsys):
    held_out = run_ok(["eval", str(setup["checkpoint"]), "--data", str(setup["data"]),
                       "--max-sequences", "3"], capsys)
    assert held_out[0].startswith("eval loss ") and "perplexity" in held_out[0] and "3 sequences" in held_out[0]
    assert "held-out split" in held_out[1] and "outside the (epsilon, delta) guarantee" in held_out[1]
    train = run_ok(["eval", str(setup["checkpoint"]), "--data", str(setup["data"]), "--split", "train",
                    "--max-sequences", "3"], capsys)
    assert train[0].startswith("train loss ")
    assert "statistic of the training data, outside the (epsilon, delta) guarantee" in train[1]


@pytest.mark.parametrize("case, needle", [
    ("not_a_folder", "is not a folder"),
    ("too_many_tokens", "--tokens must be in [1, "),
    ("no_tokenizer", "has no tokenizer.model"),
    ("negative_temperature", "--temperature must be"),
    ("no_eval_split", "has no eval split: prepare it with"),
    ("other_tokenizer", "another tokenizer"),
    ("sequences_too_long", "beyond the model's max_seq_len 48"),
])
def test_mistakes_are_one_line(setup, tmp_path, capsys, case, needle):
    ckpt, data = str(setup["checkpoint"]), str(setup["data"])
    if case == "not_a_folder":
        argv = ["sample", str(tmp_path / "missing"), "--prompt", "x"]
    elif case == "too_many_tokens":
        argv = ["sample", ckpt, "--prompt", "x", "--tokens", "1000"]
    elif case == "no_tokenizer":
        bare = save_model(setup["model"], tmp_path / "bare")
        argv = ["sample", str(bare), "--prompt", "x"]
    elif case == "negative_temperature":
        argv = ["sample", ckpt, "--prompt", "x", "--temperature", "-1"]
    elif case == "no_eval_split":
        train_only = prepare([setup["corpus"]["private"]], setup["tokenizer"], 32, tmp_path / "prep",
                             progress=False)
        argv = ["eval", ckpt, "--data", str(train_only)]
    elif case == "other_tokenizer":
        other = train_tokenizer([setup["corpus"]["public"]], VOCAB - 10, tmp_path / "other.model")
        other_data = prepare([setup["corpus"]["private"]], other, 32, tmp_path / "prep",
                             eval_fraction=0.2, progress=False)
        model = Decoder(dataclasses.replace(setup["model"].cfg, vocab_size=VOCAB - 10))
        folder = save_model(model, tmp_path / "m")
        shutil.copyfile(setup["tokenizer"], folder / "tokenizer.model")
        argv = ["eval", str(folder), "--data", str(other_data)]
    else:
        long = prepare([setup["corpus"]["private"]], setup["tokenizer"], 64, tmp_path / "prep",
                       eval_fraction=0.2, progress=False)
        argv = ["eval", ckpt, "--data", str(long)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and needle in err, err


def test_a_run_folder_means_its_newest_checkpoint(setup, capsys, tmp_path):
    run = tmp_path / "run" / "checkpoints"
    for step in ("step-00000001", "step-00000002"):
        shutil.copytree(setup["checkpoint"], run / step)
    argv = ["--prompt", "Patient", "--tokens", "8", "--seed", "3"]
    assert run_ok(["sample", str(tmp_path / "run"), *argv], capsys) == run_ok(["sample", str(setup["checkpoint"]), *argv], capsys)
    assert main(["sample", str(tmp_path / "run"), *argv]) == 0
    assert "step-00000002" in capsys.readouterr().err
