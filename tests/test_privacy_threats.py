"""The guarantee against an adversary who reads everything a run publishes (configs, logs, metrics,
report, shareable checkpoint files) but not its private state (train_state.pt).

Each test is one way a run used to break that assumption: a replayable default seed, colliding
noise streams, continuations and sweeps that reuse randomness or forget spent steps, crashes that
release steps the ledger never counts, private statistics in the logs, a tokenizer trained on the
private data, and a logged ε that lagged the steps.
"""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats

from dptrain import configio
from dptrain.cli import main
from dptrain.errors import UserError
from dptrain.privacy.accounting import epsilon_of_runs, make_run
from dptrain.train.config import TrainConfig
from dptrain.train.trainer import STATE_FILE, Trainer
from tiny_runs import demo_data, tiny_run_config

SIGMA, DELTA, BATCH = 1.0, 1e-5, 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return demo_data(tmp_path_factory.mktemp("demo"))


DEFAULTS = {"privacy": {"noise_multiplier": SIGMA, "delta": DELTA, "expected_batch_size": BATCH, "steps": 3},
            "runtime": {"micro_batch_size": 16, "device": "cpu"},
            "eval": {"every": 0, "max_sequences": 8},
            "checkpoint": {"every": 0, "keep_last": 1}}


def make_config(data_dir, out_dir, **sections) -> TrainConfig:
    return tiny_run_config(data_dir, out_dir, DEFAULTS, **sections)


def released_weights(out_dir) -> dict:
    (checkpoint,) = sorted((out_dir / "checkpoints").glob("step-*"))
    return load_file(checkpoint / "model.safetensors")


def published_files(out_dir) -> list:
    """Everything a run writes except its private state."""
    return [p for p in out_dir.rglob("*") if p.is_file() and p.name != STATE_FILE]


def without_last_sequence(data_dir, folder):
    """A neighbouring dataset: the same prepared data less its last training sequence."""
    shutil.copytree(data_dir, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    train["num_sequences"] -= 1
    tokens = folder / train["tokens_file"]
    tokens.write_bytes(tokens.read_bytes()[:train["num_sequences"] * manifest["seq_len"] * 4])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def reproduce(out_dir, data, folder) -> dict:
    """The adversary's retraining from the run's published config, on data of their choice."""
    raw = configio.read_yaml(out_dir / "train_config.yaml")
    raw["out_dir"], raw["data"]["path"] = str(folder), str(data)
    Trainer(configio.from_dict(TrainConfig, raw)).fit()
    return released_weights(folder)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- 1. randomness nobody can replay -----------------------------------------------------------
def test_retraining_from_everything_published_does_not_reproduce_a_default_run(data_dir, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(make_config(data_dir, run))
    trainer.fit()
    released = released_weights(run)
    neighbour = without_last_sequence(data_dir, tmp_path / "neighbour")
    assert not same(reproduce(run, data_dir, tmp_path / "with"), released)
    assert not same(reproduce(run, neighbour, tmp_path / "without"), released)

    secret = trainer.randomness["secret"]
    assert trainer.randomness["mode"] == "secret" and secret.bit_length() > 128  # 256-bit draw
    for path in published_files(run):
        text = path.read_bytes()
        assert format(secret, "x").encode() not in text and str(secret).encode() not in text, path
    state = torch.load(next(run.rglob(STATE_FILE)), weights_only=True)
    assert int(state["randomness"]["secret"], 16) == secret  # only the private state holds it


def test_the_same_replay_does_reproduce_a_run_with_an_explicit_seed(data_dir, tmp_path, capsys):
    """The attack above is real: with runtime.seed published in the config, it recovers the weights.
    Such a run says so once, and its report says the guarantee needs the seed kept secret."""
    run = tmp_path / "run"
    report = Trainer(make_config(data_dir, run, runtime={"seed": 5})).fit()
    assert capsys.readouterr().err.count("stays secret") == 1
    assert report["randomness"]["mode"] == "seed" and "secret" in report["randomness"]["means"]
    assert same(reproduce(run, data_dir, tmp_path / "again"), released_weights(run))


def test_secure_randomness_draws_batches_nobody_can_replay(data_dir, tmp_path):
    a, b = (Trainer(make_config(data_dir, tmp_path / run, privacy={"secure_randomness": True})) for run in "ab")
    assert not all(np.array_equal(a.sampler.sample(), b.sampler.sample()) for _ in range(3))
    a.train_step()
    a.save_checkpoint()
    state = torch.load(next(tmp_path.rglob(STATE_FILE)), weights_only=True)
    assert state["randomness"]["secret"] is None and state["randomness"]["mode"] == "secure"
    with pytest.raises(UserError, match="takes no runtime.seed"):
        make_config(data_dir, tmp_path, privacy={"secure_randomness": True}, runtime={"seed": 1})


# ---- 2. streams that never collide -------------------------------------------------------------
def test_distinct_stream_keys_draw_different_blocks():
    from dptrain.privacy.randomness import PURPOSES, Streams

    streams = Streams(2**200 + 12345)
    keys = [(purpose, step, rank, shard) for purpose in PURPOSES for step in range(4_167)
            for rank in range(4) for shard in range(2)]
    assert len(keys) >= 10**5
    bitgen = streams.bit_generator("noise", 0)
    template = bitgen.state
    first = np.empty((len(keys), 2), dtype=np.uint64)
    for i, key in enumerate(keys):  # the production key and counter, set on one generator for speed
        template["state"]["counter"] = streams.counter(*key)
        bitgen.state = template
        first[i] = bitgen.random_raw(2)
    assert len(np.unique(first, axis=0)) == len(keys)
    # the path the trainer takes draws the same blocks
    for i in (0, 12_345, len(keys) - 1):
        assert np.array_equal(streams.bit_generator(*keys[i]).random_raw(2), first[i])


# ---- 3. continuation composes; sweeps share nothing --------------------------------------------
def test_continuation_carries_the_ledger_and_draws_fresh_randomness(data_dir, tmp_path, monkeypatch):
    parent = Trainer(make_config(data_dir, tmp_path / "parent", runtime={"seed": 3}))
    parent.fit()
    (checkpoint,) = (tmp_path / "parent" / "checkpoints").glob("step-*")
    child = Trainer(make_config(data_dir, tmp_path / "child", init_from=str(checkpoint),
                                privacy={"steps": 2}, runtime={"seed": 3}))
    # the same seed, yet not the parent's batches: a continuation never replays its parent
    assert not all(np.array_equal(child.sampler.batch_at(s)[0], parent.sampler.batch_at(s)[0])
                   for s in range(3))
    report = child.fit()
    q = BATCH / child.num_examples
    assert report["accounted_steps"] == 5 and report["steps"] == 2
    assert report["epsilon"]["rdp"] == pytest.approx(epsilon_of_runs([make_run(SIGMA, q, 5)], DELTA, "rdp"))
    assert [entry["steps"] for entry in report["lineage"]] == [3]
    assert report["initialization"]["source"] == str(checkpoint)

    # given relative, the lineage keeps it relative: the public ledger file publishes no file layout
    monkeypatch.chdir(tmp_path)
    relative = checkpoint.relative_to(tmp_path)
    Trainer(make_config(data_dir, tmp_path / "child2", init_from=str(relative), privacy={"steps": 1})).fit()
    (child_checkpoint,) = (tmp_path / "child2" / "checkpoints").glob("step-*")
    published = (child_checkpoint / "privacy_ledger.json").read_text()
    assert json.loads(published)["lineage"][0]["checkpoint"] == str(relative) and str(tmp_path) not in published

    with pytest.raises(UserError, match="noise_multiplier"):
        Trainer(make_config(data_dir, tmp_path / "c2", init_from=str(checkpoint),
                            privacy={"noise_multiplier": None, "target_epsilon": 50.0}))
    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns(STATE_FILE, "privacy_ledger.json"))
    with pytest.raises(UserError, match="unknown"):
        Trainer(make_config(data_dir, tmp_path / "c3", init_from=str(bare)))


def test_exports_and_imports_of_a_private_run_carry_its_ledger(data_dir, tmp_path):
    from dptrain.cli import main

    parent = Trainer(make_config(data_dir, tmp_path / "parent"))
    parent.fit()
    (checkpoint,) = (tmp_path / "parent" / "checkpoints").glob("step-*")
    assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    for source in (tmp_path / "hf", tmp_path / "imported"):
        child = Trainer(make_config(data_dir, tmp_path / f"child-{source.name}", init_from=str(source),
                                    privacy={"steps": 2}))
        report = child.fit()
        assert report["accounted_steps"] == 5 and "ledger continues" in report["initialization"]["kind"]


def test_public_weights_start_a_fresh_ledger_that_names_them(data_dir, tmp_path):
    from dptrain.export import to_hf

    public = to_hf(Trainer(make_config(data_dir, tmp_path / "init")).model, tmp_path / "public", verify=False)
    trainer = Trainer(make_config(data_dir, tmp_path / "run", init_from=str(public), privacy={"steps": 1}))
    report = trainer.fit()
    assert report["accounted_steps"] == 1 and report["lineage"] == []
    assert report["initialization"]["source"] == str(public) and "public" in report["initialization"]["kind"]
    # imported into a checkpoint, the same public weights still start a fresh ledger
    from dptrain.export import import_checkpoint

    imported = import_checkpoint(public, tmp_path / "imported")
    trainer = Trainer(make_config(data_dir, tmp_path / "run2", init_from=str(imported), privacy={"steps": 1}))
    assert trainer.fit()["accounted_steps"] == 1


def test_sweep_runs_draw_their_own_randomness(tmp_path):
    from dptrain.scaling.sweep import SweepRun, SweepSpec, train_config

    spec = SweepSpec(base={"data": {"path": "x"}, "privacy": {"delta": 1e-6}, "runtime": {"seed": 4}},
                     models=["m.yaml"], batch_sizes=[8], sigma_bars=[0.1, 0.2], steps=[3], seeds=[0])
    cfgs = [train_config(spec, SweepRun(f"r{sb}", tmp_path / "m.yaml", 8, sb, 3, 0)) for sb in (0.1, 0.2)]
    assert [c.privacy.noise_multiplier for c in cfgs] == pytest.approx([0.8, 1.6])
    assert all(c.runtime.seed is None for c in cfgs)  # a fresh secret each: no shared z across σ
    assert all(c.runtime.init_seed == 0 for c in cfgs)  # the same public initial weights


# ---- 4. every noisy release is accounted -------------------------------------------------------
def crash_after_logging(cfg, steps_checkpointed: int, steps_after: int) -> None:
    trainer = Trainer(cfg)
    for _ in range(steps_checkpointed):
        trainer.train_step()
    if steps_checkpointed:
        trainer.save_checkpoint()
    for _ in range(steps_after):
        trainer.train_step()  # journaled: its metrics may have left the process
    trainer.close()  # the crash


def test_steps_a_crash_released_are_counted_when_the_resume_cannot_replay_them(data_dir, tmp_path):
    cfg = make_config(data_dir, tmp_path, privacy={"secure_randomness": True, "steps": 6})
    crash_after_logging(cfg, 3, 2)
    resumed = Trainer(cfg)
    assert resumed.step == 3 and resumed.ledger.steps == 5 and resumed.books.crash_released_steps == 2
    report = resumed.fit()
    q = BATCH / resumed.num_examples
    assert report["accounted_steps"] == 8 and report["crash_released_steps"] == 2
    assert report["epsilon"]["rdp"] == pytest.approx(epsilon_of_runs([make_run(SIGMA, q, 8)], DELTA, "rdp"))


def test_a_default_run_replays_its_lost_steps_exactly_and_spends_them_once(data_dir, tmp_path):
    crash_after_logging(make_config(data_dir, tmp_path / "a", privacy={"steps": 6}), 3, 2)
    resumed = Trainer(make_config(data_dir, tmp_path / "a", privacy={"steps": 6}))
    assert resumed.step == 3 and resumed.ledger.steps == 3  # steps 4-5 come back bit for bit
    # A crash before the first checkpoint loses the secret too: the restart's steps are new releases.
    crash_after_logging(make_config(data_dir, tmp_path / "b"), 0, 2)
    restarted = Trainer(make_config(data_dir, tmp_path / "b"))
    assert restarted.step == 0 and restarted.ledger.steps == 2 and restarted.books.crash_released_steps == 2


# ---- 5. private statistics are not logged by default -------------------------------------------
def test_only_public_quantities_are_logged_and_shown_by_default(data_dir, tmp_path, capsys):
    report = Trainer(make_config(data_dir, tmp_path / "a", eval={"every": 1},
                                 logging={"progress": True})).fit()
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    assert {"epsilon", "lr", "eval/loss"} <= keys
    # a step's wall time grows with the drawn batch: no timing, throughput or MFU by default
    assert not any(k.startswith("private/") or "batch_size" in k or "second" in k or "mfu" in k for k in keys)
    err = capsys.readouterr().err
    assert "loss=" not in err and "tok_s" not in err  # the bar shows no training loss, no throughput
    assert "step/s" not in err and "s/step" not in err and "<" not in err  # nor a rate or elapsed time
    assert "realised_batch_size" not in report and "released_outside_guarantee" not in report

    report = Trainer(make_config(data_dir, tmp_path / "b", logging={"private_metrics": True})).fit()
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "lr" in r]
    assert steps and all("private/train_loss" in r and "private/batch_size" in r for r in steps)
    assert all("private/step_seconds" in r and "step_seconds" not in r for r in steps)
    assert any("private/" in item and "step time" in item for item in report["released_outside_guarantee"])


# ---- 6. tokenizer provenance -------------------------------------------------------------------
def test_prepare_refuses_a_tokenizer_trained_on_the_private_records(tmp_path, capsys):
    from dptrain.data.demo import write_demo_corpus

    corpus = write_demo_corpus(tmp_path / "corpus", num_records=300)
    records = tmp_path / "records.txt"  # a name that says nothing about privacy
    texts = [json.loads(line)["text"] for line in corpus["private"].read_text().splitlines()]
    records.write_text("\n".join(texts) + "\n")
    args = ["--vocab-size", "400", "--num-threads", "1"]
    assert main(["tokenizer", "train", "--input", str(records), "--out", str(tmp_path / "leaky"), *args]) == 0
    assert main(["tokenizer", "train", "--input", str(corpus["public"]), "--out", str(tmp_path / "public"),
                 *args]) == 0
    capsys.readouterr()

    assert main(["data", "prepare", "--input", str(records), "--tokenizer", str(tmp_path / "leaky.model"),
                 "--seq-len", "32", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records.txt" in err[0] and "public text" in err[0]
    assert not (tmp_path / "refused").exists()

    assert main(["data", "prepare", "--input", str(records), "--tokenizer", str(tmp_path / "public.model"),
                 "--seq-len", "32", "--out", str(tmp_path / "ok")]) == 0
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    (source,) = manifest["tokenizer"]["provenance"]["trained_on"]
    assert source["name"] == "public.txt"


def test_the_report_says_where_the_tokenizer_came_from(data_dir, tmp_path):
    report = Trainer(make_config(data_dir, tmp_path, privacy={"steps": 1})).fit()
    assert [t["name"] for t in report["tokenizer"]["trained_on"]] == ["public.txt"]


# ---- sequences per document and per user -------------------------------------------------------
def test_sequences_per_document_and_group_match_a_naive_count(data_dir):
    from dptrain.data.packed import PackedDataset
    from dptrain.privacy.group import sequences_per_unit

    data = PackedDataset(data_dir)
    per_doc, per_group = {}, {}
    for i in range(len(data)):  # the naive way: ask every sequence what it holds
        for doc in data.documents(i):
            per_doc[doc] = per_doc.get(doc, 0) + 1
        for group in data.groups(i):
            per_group[group] = per_group.get(group, 0) + 1
    units = sequences_per_unit(data)
    assert units["document"] == {"max": max(per_doc.values()), "mean": pytest.approx(np.mean(list(per_doc.values()))),
                                 "count": len(per_doc)}
    assert units["group"] == {"max": max(per_group.values()),
                              "mean": pytest.approx(np.mean(list(per_group.values()))), "count": len(per_group)}
    assert units["group"]["max"] > 1  # the demo's users span several sequences


@pytest.mark.parametrize("k", [2, 3, 5])
def test_group_privacy_bounds_the_exact_gaussian_at_sensitivity_k(k):
    """(k ε, k e^{(k-1) ε} δ) must cover a Gaussian mechanism whose sensitivity is k (k units changed)."""
    from dptrain.privacy.group import group_privacy

    def gaussian_delta(eps, sensitivity, sigma=3.0):  # exact hockey-stick divergence
        a = sensitivity / sigma
        return stats.norm.cdf(a / 2 - eps / a) - math.exp(eps) * stats.norm.cdf(-a / 2 - eps / a)

    eps = 0.5
    delta = gaussian_delta(eps, 1)
    group_eps, group_delta = group_privacy(eps, delta, k)
    assert group_eps == pytest.approx(k * eps)
    assert gaussian_delta(group_eps, k) <= group_delta
    assert group_privacy(eps, delta, 1) == (eps, delta)


def test_the_default_report_releases_no_statistic_of_how_the_data_spans_sequences(data_dir, tmp_path):
    """How many sequences a user's records fill is private data: by default the report gives the
    group-privacy guarantee for fixed group sizes only, computed from (ε, δ) alone."""
    from dptrain.privacy.group import group_privacy

    report = Trainer(make_config(data_dir, tmp_path, privacy={"steps": 1})).fit()
    assert "units" not in report and "units" not in json.dumps(report.get("released_outside_guarantee", []))
    eps = report["epsilon"]["pld"]
    assert [row["size"] for row in report["group_privacy"]] == [2, 4, 8, 16, 32]
    for row in report["group_privacy"]:
        assert (row["epsilon"], row["delta"]) == group_privacy(eps, report["delta"], row["size"])
    text = (tmp_path / "privacy_report.txt").read_text()
    assert "per group" not in text and "group privacy (a secret or person spanning g sequences): g=2: (" in text


def test_the_report_states_the_guarantee_per_document_and_user(data_dir, tmp_path):
    report = Trainer(make_config(data_dir, tmp_path, privacy={"steps": 1},
                                 logging={"private_metrics": True})).fit()
    assert any(item.startswith("units:") for item in report["released_outside_guarantee"])
    users = report["units"]["group"]
    eps = report["epsilon"]["pld"]
    assert users["epsilon_of_largest"] == pytest.approx(users["sequences_max"] * eps)
    text = (tmp_path / "privacy_report.txt").read_text()
    line = next(line for line in text.splitlines() if line.startswith("  per group"))
    if users["delta_of_largest"] >= 1:  # no (ε, 1) pretending to be a guarantee
        assert line.endswith("the largest has no guarantee from group privacy (its δ reaches 1)")
    else:
        assert f"protected at ({users['epsilon_of_largest']:.4g}, " in line


# ---- 8. the logged ε is the ε spent so far -----------------------------------------------------
def test_every_logged_step_carries_the_epsilon_spent_up_to_it(data_dir, tmp_path):
    trainer = Trainer(make_config(data_dir, tmp_path, privacy={"steps": 4}))
    report = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["epsilon"] for r in rows if "epsilon" in r}
    q = BATCH / trainer.num_examples
    assert sorted(logged) == [1, 2, 3, 4]
    for step, eps in logged.items():  # a fast upper bound between the exact PLD and the looser RDP
        runs = [make_run(SIGMA, q, step)]
        assert epsilon_of_runs(runs, DELTA, "pld") <= eps <= epsilon_of_runs(runs, DELTA, "rdp")
    assert logged[4] >= report["epsilon"]["pld"] and all(logged[s] < logged[s + 1] for s in (1, 2, 3))


@pytest.mark.slow
def test_the_fast_bound_covers_truncated_sampling():
    from dptrain.privacy.running import running_epsilon

    for steps in (1, 30):
        runs = [make_run(0.9, 0.012, steps, 10_000, 150)]
        exact = epsilon_of_runs(runs, DELTA, "pld")
        assert exact <= running_epsilon(runs, DELTA) <= 1.05 * exact


# ---- 7. the data keeps its own ledger; the run folder is one run's ---------------------------
def own_data(data_dir, folder):
    """A private copy of the prepared data (with a ledger of its own)."""
    shutil.copytree(data_dir, folder, ignore=shutil.ignore_patterns("privacy_spent.jsonl"))
    return folder


def test_the_data_counts_every_step_whatever_copy_of_the_weights_continues(data_dir, tmp_path):
    data = own_data(data_dir, tmp_path / "data")
    Trainer(make_config(data, tmp_path / "parent", privacy={"steps": 6},
                        checkpoint={"every": 4, "keep_last": 2})).fit()
    shared = tmp_path / "shared"  # step 4, shared as the docs advise: without its private state
    shutil.copytree(tmp_path / "parent" / "checkpoints" / "step-00000004", shared,
                    ignore=shutil.ignore_patterns(STATE_FILE))
    child = Trainer(make_config(data, tmp_path / "child", init_from=str(shared), privacy={"steps": 2}))
    report = child.fit()
    q = BATCH / child.num_examples
    assert report["accounted_steps"] == 6  # what the weights carry: 4 of the parent's + 2
    spent = report["data_spent"]
    assert spent["steps"] == 8 and spent["runs"] == 2  # what touched the data: 6 + 2
    assert spent["epsilon"] >= epsilon_of_runs([make_run(SIGMA, q, 8)], DELTA, "pld") * (1 - 1e-9)
    assert spent["epsilon"] > report["epsilon"]["pld"]

    # an export whose ledger file was removed: the weights carry nothing, the data still counts all
    from dptrain.cli import main

    assert main(["export", str(shared), str(tmp_path / "hf")]) == 0
    (tmp_path / "hf" / "privacy_ledger.json").unlink()
    stripped = Trainer(make_config(data, tmp_path / "child2", init_from=str(tmp_path / "hf"), privacy={"steps": 2}))
    report = stripped.fit()
    assert report["accounted_steps"] == 2 and report["data_spent"]["steps"] == 10


def test_a_data_budget_refuses_the_run_that_would_exceed_it(data_dir, tmp_path):
    data = own_data(data_dir, tmp_path / "data")
    first = Trainer(make_config(data, tmp_path / "a")).fit()
    eps_one = first["epsilon"]["pld"]
    with pytest.raises(UserError, match="data_budget"):
        Trainer(make_config(data, tmp_path / "b", privacy={"data_budget": eps_one * 1.1}))
    Trainer(make_config(data, tmp_path / "c", privacy={"data_budget": eps_one * 3})).fit()


def test_a_resume_on_data_changed_in_place_is_refused(data_dir, tmp_path):
    data = own_data(data_dir, tmp_path / "data")
    cfg = make_config(data, tmp_path / "run", privacy={"steps": 6})
    crash_after_logging(cfg, 3, 1)
    manifest = json.loads((data / "manifest.json").read_text())
    tokens = data / manifest["splits"]["train"]["tokens_file"]
    raw = bytearray(tokens.read_bytes())
    raw[8:12] = raw[12:16]  # one token changed, same size and N
    tokens.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="changed"):
        Trainer(cfg)


def test_the_private_state_is_owner_only_and_a_run_folder_takes_one_run(data_dir, tmp_path):
    import stat

    from dptrain.train.run_folder import RunFolder

    cfg = make_config(data_dir, tmp_path / "run")
    Trainer(cfg).fit()
    (checkpoint,) = (tmp_path / "run" / "checkpoints").glob("step-*")
    assert stat.S_IMODE((checkpoint / STATE_FILE).stat().st_mode) == 0o600
    other = RunFolder(tmp_path / "run")
    other.lock()  # another run holds the folder
    try:
        with pytest.raises(UserError, match="another run"):
            Trainer(cfg)
    finally:
        other.unlock()
    journal = (tmp_path / "run" / "privacy_journal.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in journal] == [1, 2, 3]  # nothing journaled twice
