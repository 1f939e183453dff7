"""The sweep runner (real trainer, rows appended, reruns skipped), plan configs the trainer accepts,
and the shipped law."""
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import yaml

from dptrain.cli import main
from dptrain.data import PackedDataset
from dptrain.errors import UserError
from dptrain.scaling.law import load_law
from dptrain.scaling.plan import SHIPPED_LAW
from dptrain.scaling.results import read_results
from dptrain.scaling.sweep import expand, load_spec, run_sweep
from dptrain.train.config import load_train_config
from dptrain.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

MICRO_MODEL = dict(vocab_size=2048, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=16, max_seq_len=64, query_pre_attn_scalar=16.0)


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory):
    from dptrain.data.demo import prepare_demo

    return prepare_demo(tmp_path_factory.mktemp("demo"), seq_len=32, vocab_size=2048, num_records=400)


def write_spec(folder, data, sigma_bars) -> str:
    (folder / "micro.yaml").write_text(yaml.safe_dump(MICRO_MODEL))
    spec = {
        "results": "results.csv",
        "models": ["micro.yaml"],
        "batch_sizes": [8],
        "sigma_bars": sigma_bars,
        "steps": [3],
        "base": {"data": {"path": str(data)},
                 "out_dir": str(folder / "runs"),
                 "privacy": {"delta": 1e-5},
                 "runtime": {"micro_batch_size": 8, "device": "cpu"},
                 "eval": {"every": 2, "max_sequences": 8},
                 "logging": {"wandb": "disabled"}},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_sweep_appends_rows_and_skips_finished_runs(micro_data, tmp_path, capsys):
    spec = write_spec(tmp_path, micro_data, [0.05, 0.2])
    assert main(["sweep", "run", spec]) == 0
    rows = read_results(tmp_path / "results.csv")
    assert [r.run_id for r in rows] == ["micro-B8-sb0.05-T3-s0", "micro-B8-sb0.2-T3-s0"]
    for row, sigma_bar in zip(rows, [0.05, 0.2]):
        assert row.model == "micro" and row.batch_size == 8 and row.steps == 3
        assert row.sigma == pytest.approx(sigma_bar * 8) and row.sigma_bar == sigma_bar
        assert row.seq_len == 31 and row.tokens == 8 * 31 * 3
        assert [s for s, _ in row.eval_curve] == [0, 2, 3]  # every 2 steps, and the last
        assert row.params_total > row.params_nonembed > 0 and row.wall_time_s > 0
    # Same initial weights (the spec's seed), independent noise: the curves agree only before training.
    assert rows[0].eval_curve[0] == rows[1].eval_curve[0]
    assert rows[0].eval_curve[-1] != rows[1].eval_curve[-1]
    text = (tmp_path / "results.csv").read_text()

    assert main(["sweep", "run", spec]) == 0  # nothing left to do
    assert "0 run(s) trained" in capsys.readouterr().out
    assert (tmp_path / "results.csv").read_text() == text

    spec = write_spec(tmp_path, micro_data, [0.05, 0.2, 0.8])  # a grown spec runs only what is new
    assert [r.run_id for r in run_sweep(spec, progress=False)] == ["micro-B8-sb0.8-T3-s0"]
    assert (tmp_path / "results.csv").read_text().startswith(text)
    assert len(read_results(tmp_path / "results.csv")) == 3


def test_noise_free_runs_are_clipped_without_noise(micro_data, tmp_path):
    spec = write_spec(tmp_path, micro_data, [0.0])
    (run,) = run_sweep(spec, progress=False)
    (row,) = read_results(tmp_path / "results.csv")
    assert run.run_id == row.run_id == "micro-B8-sb0-T3-s0" and row.sigma == 0 and row.sigma_bar == 0
    # its journal records sigma = 0: the run is not private, and its ledger says so
    journal = [json.loads(line) for line in (tmp_path / "runs" / run.run_id / "privacy_journal.jsonl")
               .read_text().splitlines()]
    assert len(journal) == 3 and all(entry["noise_multiplier"] == 0 for entry in journal)


def test_spec_errors_are_one_line(micro_data, tmp_path, capsys):
    spec = write_spec(tmp_path, micro_data, [0.1])
    raw = yaml.safe_load(open(spec))
    assert [r.run_id for r in expand(load_spec(spec), tmp_path)] == ["micro-B8-sb0.1-T3-s0"]
    for change, message in [({"models": ["missing.yaml"]}, "not found"),
                            ({"sigma_bars": [-0.1]}, "sigma_bars"),
                            ({"stepz": [3]}, "stepz"),
                            ({"base": {**raw["base"], "privacy": {"delta": 2.0}}}, "delta")]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**raw, **change}))
        assert main(["sweep", "run", str(tmp_path / "bad.yaml")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["sweep", "run", spec, "--only", "ladder-9"]) == 2
    assert "ladder-9" in capsys.readouterr().err


def test_shipped_law_loads_and_predicts_in_range():
    law = load_law(SHIPPED_LAW)
    v = law.validity
    m, t, sb, b = [(lo * hi) ** 0.5 for lo, hi in (v["M"], v["T"], v["sigma_bar"], v.get("batch", (32, 32)))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the range: no extrapolation warning
        loss = float(law.predict(m, t, sb, b))
    assert 0 < loss < 8  # below the loss of a uniform guess over the 2048-token vocabulary (7.62)
    # more steps, less noise and a larger batch never predict a higher loss
    assert law.predict(m, v["T"][1], sb, b) <= law.predict(m, v["T"][0], sb, b)
    assert law.predict(m, t, v["sigma_bar"][0], b) <= law.predict(m, t, v["sigma_bar"][1], b)
    if law.reads_batch:
        assert law.predict(m, t, sb, v["batch"][1]) < law.predict(m, t, sb, v["batch"][0])
    # only a validated law ships: it predicted a larger model and longer runs within 5% on average
    assert law.validated() and {"largest-model", "late"} <= set(law.holdout)
    assert all(h["runs"] and h["mean_abs_rel_error"] < 0.05 for h in law.holdout.values())


def test_plan_config_loads_and_trains(micro_data, tmp_path):
    """`dptrain plan --write-config` (shipped law) writes what `dptrain train` takes as is."""
    data = micro_data
    n = len(PackedDataset(data, "train"))
    config = tmp_path / "plan" / "train.yaml"
    config.parent.mkdir()
    assert main(["plan", "--compute", "2e10", "--epsilon", "8", "--delta", "1e-4", "--data-size", str(n),
                 "--seq-len", "32", "--top", "1", "--write-config", str(config),
                 "--data-path", str(data), "--min-params", "5e4"]) == 0
    cfg = load_train_config(config, [f"out_dir={tmp_path / 'run'}", "privacy.steps=2",
                                     "logging.wandb=disabled", "logging.progress=false",
                                     "eval.max_sequences=8", "runtime.micro_batch_size=64"])
    written = yaml.safe_load(config.read_text())
    assert cfg.privacy.target_epsilon == 8 and cfg.privacy.noise_multiplier == written["privacy"]["noise_multiplier"]
    # the planner calibrated with the trainer's accountant: the two agree on sigma within 1%
    calibrating = load_train_config(config, [f"out_dir={tmp_path / 'calibrated'}", "privacy.noise_multiplier=null",
                                             f"privacy.steps={written['privacy']['steps']}",
                                             "logging.wandb=disabled"])
    own_sigma = Trainer(calibrating, config_dir=config.parent).noise_multiplier
    assert written["privacy"]["noise_multiplier"] == pytest.approx(own_sigma, rel=0.01)
    assert written["privacy"]["accountant"] == "pld"
    trainer = Trainer(cfg, config_dir=config.parent)  # the model path is relative to the file
    report = trainer.fit()
    assert trainer.step == 2 and report["epsilon"]["rdp"] <= 8
    # a config is written only for named data, and only for the data the plan was made for
    base = ["plan", "--compute", "2e10", "--epsilon", "8", "--delta", "1e-4", "--seq-len", "32",
            "--top", "1", "--write-config", str(tmp_path / "other.yaml")]
    assert main([*base, "--data-size", str(n)]) == 2
    assert main([*base, "--data-size", str(10 * n), "--data-path", str(data)]) == 2
    assert not (tmp_path / "other.yaml").exists()


def test_stdlib_corpus_splits_modules_from_test_suites(tmp_path):
    """The v3 sweep's corpus: modules train, test suites train only the tokenizer, installed
    packages are left out (they differ between machines)."""
    spec = importlib.util.spec_from_file_location("stdlib_corpus", ROOT / "scaling" / "stdlib_corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    for rel in ("os.py", "json/decoder.py", "test/test_os.py", "idlelib/idle_test/test_x.py",
                "unittest/test/test_case.py", "site-packages/numpy/core.py", "json/README"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    modules, tests = corpus.library_files(tmp_path)
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert names(modules) == ["json/decoder.py", "os.py"]
    assert names(tests) == ["idlelib/idle_test/test_x.py", "test/test_os.py", "unittest/test/test_case.py"]


def test_debian_corpus_reads_documentation_not_its_copyright_files(tmp_path):
    """The second corpus: changelog/NEWS/README files (gzipped or not, UTF-8 only) are documents;
    the copyright files train only the tokenizer."""
    import gzip

    spec = importlib.util.spec_from_file_location("debian_corpus", ROOT / "scaling" / "debian_corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    files = {"pkg-a/changelog.Debian.gz": gzip.compress(("entry " * 5000).encode()),
             "pkg-a/copyright": b"Copyright 2020 someone\n", "pkg-b/README": b"read me\n",
             "pkg-b/NEWS.gz": gzip.compress(b"\xff\xfe not utf-8"), "pkg-b/examples/run.sh": b"echo\n",
             "pkg-c/copyright": b"License: MIT\n"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    documents, copyrights = corpus.documentation_files(tmp_path)
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert names(documents) == ["pkg-a/changelog.Debian.gz", "pkg-b/NEWS.gz", "pkg-b/README"]
    assert names(copyrights) == ["pkg-a/copyright", "pkg-c/copyright"]
    assert len(corpus.read_text(tmp_path / "pkg-a/changelog.Debian.gz")) == 30000
    assert corpus.read_text(tmp_path / "pkg-b/NEWS.gz") is None  # not UTF-8: left out
