"""What a scaling law was fitted on: corpus, tokenizer, sequence length, optimizer, schedule,
learning-rate rule, clip norm and compute, recorded in the law file (`"fitted_on"`) and checked by
the planner against the user's data.

A law holds for the protocol of its sweep. `dptrain fit` takes what it can from the results (the
sequence length, the compute of every run), the sweep specs the results came from (`--spec`:
optimizer, schedule, clip norm, data) and the sweep's prepared data folder (`--data`: corpus
fingerprint, tokenizer, vocabulary, sequence length); what none of them says is recorded as
"unknown".
"""
from __future__ import annotations

import json
from pathlib import Path

from dptrain.errors import UserError
from dptrain.scaling.results import RunResult

UNKNOWN = "unknown"
COMPUTE_RULE = ("6 * M * B * S * T FLOPs per run (M total parameters, B expected batch, S tokens "
                "predicted per sequence, T steps): counted, not timed, so it holds on any hardware")


def _same(values: list, what: str):
    """The one value all sources agree on; 'mixed: a | b' when they differ; unknown with none."""
    distinct = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    if not distinct:
        return UNKNOWN
    if len(distinct) == 1:
        return distinct[0]
    return "mixed: " + " | ".join(json.dumps(v) for v in distinct)


def data_facts(folder: str | Path) -> dict:
    """Corpus, tokenizer and sequence length of a prepared folder, from its manifest (the content
    fingerprint is computed when the manifest predates fingerprints)."""
    from dptrain.data.packed import PackedDataset

    folder = Path(folder)
    ds = PackedDataset(folder, "train")
    m = ds.manifest
    sources = [Path(s.get("path", "?")).name for s in m.get("sources", []) if isinstance(s, dict)]
    return {"corpus": {"name": ", ".join(sources) or folder.name,
                       "fingerprint": m.get("fingerprint") or ds.fingerprint,
                       "train_sequences": len(ds)},
            "tokenizer": {"vocab_size": int(m["vocab_size"]),
                          "sha256": m.get("tokenizer", {}).get("sha256", UNKNOWN)},
            "seq_len": int(m["seq_len"])}


def spec_facts(path: str | Path) -> dict:
    """Optimizer, schedule, clip norm and data of a sweep spec's runs (the trainer's defaults
    filled in where the spec's base leaves them out)."""
    from dptrain.scaling.sweep import expand, load_spec, train_config

    path = Path(path)
    spec = load_spec(path)
    cfg = train_config(spec, expand(spec, path.parent)[0])
    o, s, d = cfg.optimizer, cfg.schedule, cfg.data
    facts = {"optimizer": {"name": o.name, "lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay},
             "schedule": {"warmup_steps": s.warmup_steps, "decay": s.decay, "min_lr_ratio": s.min_lr_ratio},
             "clip_norm": cfg.privacy.max_grad_norm, "data": {"source": d.source, "path": d.path}}
    if d.source == "demo":
        facts["demo"] = {"name": f"dptrain demo corpus ({d.demo_records} records, {d.demo_vocab_size}-piece tokenizer)",
                         "seq_len": d.demo_seq_len, "vocab_size": d.demo_vocab_size}
    return facts


def fit_provenance(runs: list[RunResult], results: list[str] = (), specs: list[str] = (),
                   data: str | None = None, corpus: str | None = None, learning_rates: dict | None = None) -> dict:
    """The `fitted_on` record of a law fitted on `runs` (read from `results`), made by the sweep
    `specs`, on the prepared folder `data` (else a spec's data folder, where it exists here);
    `learning_rates`: each cell's best rate, where the sweep tried several (`best_learning_rates`)."""
    from dptrain.data.prepare import MANIFEST

    spec_list = [spec_facts(p) for p in specs]
    folder = data
    if folder is None:  # a spec's data folder, if it is on this machine
        folder = next((f["data"]["path"] for f in spec_list
                       if f["data"]["source"] == "prepared" and (Path(f["data"]["path"]) / MANIFEST).is_file()), None)
    if data is not None and not (Path(data) / MANIFEST).is_file():
        raise UserError(f"--data {data}: not a prepared data folder (no {MANIFEST})")
    facts = data_facts(folder) if folder is not None else None
    demo = next((f["demo"] for f in spec_list if "demo" in f), None)
    # Results record the tokens predicted per sequence: one less than the prepared length.
    seq_from_results = _same([r.seq_len + 1 for r in runs], "seq_len")
    seq_len = facts["seq_len"] if facts else (demo["seq_len"] if demo else seq_from_results)
    if facts and isinstance(seq_from_results, int) and abs(seq_from_results - facts["seq_len"]) > 1:
        raise UserError(f"--data {folder} holds sequences of {facts['seq_len']} tokens, but the runs "
                        f"were trained on {seq_from_results}: not the sweep's data")
    corpus_rec = {"name": UNKNOWN, "fingerprint": UNKNOWN}
    tokenizer = {"vocab_size": UNKNOWN, "sha256": UNKNOWN}
    if facts:
        corpus_rec, tokenizer = dict(facts["corpus"]), facts["tokenizer"]
    elif demo:
        corpus_rec["name"], tokenizer["vocab_size"] = demo["name"], demo["vocab_size"]
    if corpus:
        corpus_rec["name"] = corpus
    flops = [6.0 * r.params_total * r.tokens for r in runs]
    optimizer = _same([f["optimizer"] for f in spec_list], "optimizer")
    lr_rule = UNKNOWN
    if learning_rates:
        lr_rule = (f"the best of {', '.join(f'{x:g}' for x in learning_rates['grid'])} in each cell; a plan "
                   "takes the best rate of the fitted cell nearest to it")
    elif isinstance(optimizer, dict):
        lr_rule = f"one learning rate for every run ({optimizer['lr']:g}), not tuned per run"
    elif spec_list:
        lr_rule = "mixed: the specs set different optimizers (" + optimizer[len("mixed: "):] + ")"
    return {
        "corpus": corpus_rec,
        "tokenizer": tokenizer,
        "seq_len": seq_len,
        "optimizer": optimizer,
        "schedule": _same([f["schedule"] for f in spec_list], "schedule"),
        "lr_rule": lr_rule,
        **({"learning_rates": learning_rates} if learning_rates else {}),
        "clip_norm": _same([f["clip_norm"] for f in spec_list], "clip_norm"),
        "compute": {"counted_as": COMPUTE_RULE, "per_run": [min(flops), max(flops)], "total": sum(flops),
                    "devices": sorted({r.device for r in runs}),
                    "wall_time_s": round(sum(r.wall_time_s for r in runs), 1)},
        "sources": {"results": [Path(p).name for p in results], "specs": [Path(p).name for p in specs],
                    "data": str(folder) if folder is not None else None},
    }


def learning_rate_for(fitted_on: dict | None, params: float, sigma_bar: float) -> float | None:
    """The learning rate the law assumes at (M, sigma_bar): the best rate of the nearest fitted cell
    (distance in log M and log(sigma_bar + 1e-4), noise-free cells near the smallest noise), or the
    sweep's one rate; None when the law records neither."""
    import math

    fitted_on = fitted_on or {}
    cells = (fitted_on.get("learning_rates") or {}).get("best")
    if cells:
        def distance(c):
            return (math.log(c["params"] / params) ** 2
                    + math.log((c["sigma_bar"] + 1e-4) / (sigma_bar + 1e-4)) ** 2)
        return float(min(cells, key=distance)["lr"])
    o = fitted_on.get("optimizer")
    return float(o["lr"]) if isinstance(o, dict) else None


def known(value) -> bool:
    return value is not None and value != UNKNOWN and not (isinstance(value, str) and value.startswith("mixed"))


def describe(fitted_on: dict | None) -> str:
    """One line naming what the law was fitted on."""
    if not fitted_on:
        return ("the law records nothing of what it was fitted on (a file from before laws recorded "
                "it): corpus, sequence length, optimizer and schedule unknown")
    c, tok, o, s = fitted_on["corpus"], fitted_on["tokenizer"], fitted_on["optimizer"], fitted_on["schedule"]
    fp = c["fingerprint"][:12] if known(c.get("fingerprint")) else UNKNOWN
    opt = (f"{o['name']} lr {o['lr']:g} betas {tuple(o['betas'])} weight decay {o['weight_decay']:g}"
           if isinstance(o, dict) else str(o))
    sch = (f"{s['warmup_steps']} warm-up steps then {s['decay']}" if isinstance(s, dict) else str(s))
    return (f"corpus {c['name']} (fingerprint {fp}), tokenizer {tok['vocab_size']} pieces, "
            f"{fitted_on['seq_len']} tokens per sequence; {opt}; schedule {sch}; "
            f"learning rate: {fitted_on['lr_rule']}; clip norm {fitted_on['clip_norm']}")


def check_against(fitted_on: dict | None, seq_len: int, data: str | Path | None = None) -> dict:
    """How the user's sequence length and prepared data compare with what the law was fitted on:
    {"matches": bool, "differences": [...], "data": facts or None}. `matches` only when the data
    was given and is the law's corpus (same content fingerprint) at the law's sequence length."""
    facts = data_facts(data) if data is not None else None
    diffs = []
    if not fitted_on:
        return {"matches": False, "data": facts,
                "differences": ["the law does not record what it was fitted on: predictions are unvalidated"]}
    law_seq, c, tok = fitted_on["seq_len"], fitted_on["corpus"], fitted_on["tokenizer"]
    what = f"{c['name']} at {law_seq} tokens"
    if facts is not None and facts["seq_len"] != seq_len:
        diffs.append(f"--seq-len {seq_len} is not your data's sequence length ({facts['seq_len']})")
    if known(law_seq) and abs(law_seq - seq_len) > 1:  # one apart: tokens predicted vs prepared length
        diffs.append(f"the law was fitted on {what}; this plan is at {seq_len} tokens per sequence: "
                     "predictions are unvalidated")
    if facts is not None:
        yours = f"{facts['corpus']['name']} at {facts['seq_len']}"
        if not known(c.get("fingerprint")):
            diffs.append(f"the law's corpus fingerprint is unknown, so your data ({yours}) cannot be "
                         "checked against it: predictions are unvalidated")
        elif facts["corpus"]["fingerprint"] != c["fingerprint"]:
            diffs.append(f"the law was fitted on {what}; your data is {yours} (another content "
                         "fingerprint): predictions are unvalidated")
        if known(tok.get("vocab_size")) and facts["tokenizer"]["vocab_size"] != tok["vocab_size"]:
            diffs.append(f"your tokenizer has {facts['tokenizer']['vocab_size']} pieces, the law's "
                         f"{tok['vocab_size']}: losses are not comparable")
    else:
        diffs.append(f"your data was not checked against the law's corpus ({what}; pass --data PREPARED): "
                     "predictions are validated only on that corpus")
    return {"matches": not diffs, "differences": diffs, "data": facts}
