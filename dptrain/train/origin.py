"""Where a run starts from: the weights it continues (and what they already spent), and its randomness.

Randomness is decided on rank 0 and shared with every other rank before any of it is used, in
every mode: one secret (default), the seed, or one draw of the OS (secure) for the initial
weights. So every rank samples the same global Poisson batch and starts from the same weights;
ranks each drawing their own would sample different "global" batches, using an example twice in a
step, which is no longer the Poisson sampling the accountant assumes. The secret crosses the
process group's transport (in memory on one node; the cluster network across nodes).
"""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import torch

from dptrain.errors import UserError
from dptrain.model import Decoder
from dptrain.privacy.accounting import PrivacyLedger
from dptrain.privacy.journal import JOURNAL_FILE, LedgerJournal, record_entries
from dptrain.privacy.lineage import is_public, read_spent
from dptrain.privacy.randomness import Streams, fresh_secret
from dptrain.train.checkpoints import STATE_FILE, load_state


def parent_of(init_from: str | None) -> tuple[dict | None, list[dict], PrivacyLedger]:
    """Where the weights come from, the runs before this one, and the steps they spent.

    A dptrain checkpoint has seen private data: its ledger (plus any steps its run released
    after it) carries into this run, as does the ledger file an export or an imported copy of one
    carries. Weights with no such record (a Hugging Face folder, a `dptrain import` of one) are
    taken as public: a fresh ledger, and the report names them. (The data's own ledger sees every
    run on it whatever the weights carry: dptrain.privacy.data_ledger.)
    """
    ledger = PrivacyLedger()
    if init_from is None:
        return None, [], ledger
    source = Path(init_from)
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
    state = load_state(source / STATE_FILE)
    ledger.load_state_dict(state["ledger"])
    if source.parent.name == "checkpoints":  # its run may have gone on past this checkpoint
        record_entries(ledger, LedgerJournal(source.parent.parent / JOURNAL_FILE).released_after(state["step"]))
    lineage = [*state.get("lineage", []),
               {"checkpoint": str(source), "steps": state["step"], "ledger_steps": ledger.steps}]
    return {"source": str(source), "kind": "dptrain checkpoint, its ledger continues"}, lineage, ledger


def run_randomness(seed: int | None, secure: bool, generation: int, state: dict | None, share) -> dict:
    """The run's randomness, as rank 0 decides it (`share` hands rank 0's value to every rank): the
    checkpoint's on resume, else a fresh secret, the explicit seed, or the OS (secure). `draw`
    names one draw of randomness in the journal; it reveals nothing of it. `generation` keeps a
    continuation from replaying its parent's streams."""
    if secure:
        mine = {"mode": "secure", "secret": None, "draw": uuid.uuid4().hex, "generation": generation}
    elif state is not None:
        if "randomness" not in state:
            raise UserError("the checkpoint was written by an older dptrain (no run randomness): use a new out_dir")
        saved = state["randomness"]
        mine = {**saved, "secret": int(saved["secret"], 16)}
    elif seed is not None:  # the seed is in the config anyway; its draw id is reproducible too
        draw = hashlib.sha256(f"dptrain-seed:{seed}:{generation}".encode()).hexdigest()[:32]
        mine = {"mode": "seed", "secret": seed, "draw": draw, "generation": generation}
    else:
        mine = {"mode": "secret", "secret": fresh_secret(), "draw": uuid.uuid4().hex, "generation": generation}
    return share(mine)


def streams_of(randomness: dict) -> Streams | None:
    """The keyed streams of a secret or seed; None under secure randomness (the OS, no streams)."""
    if randomness["secret"] is None:
        return None
    return Streams(randomness["secret"], generation=randomness["generation"])


def init_seed(public_seed: int | None, streams: Streams | None, share) -> int:
    """The seed of the initial weights: public (runtime.init_seed), from the run's streams, or one
    OS draw (secure) that rank 0 makes for everyone."""
    if public_seed is not None:
        return public_seed
    if streams is not None:
        return streams.torch_seed("model-init")
    return share(fresh_secret() >> 193)


def secret_state(randomness: dict) -> dict:
    """The randomness as the private state stores it (the secret as hex)."""
    secret = randomness["secret"]
    return {**randomness, "secret": None if secret is None else format(secret, "x")}


def initial_model(init_from: str | None, model_cfg):
    """A fresh decoder (under the seed already set), or the weights `init_from` names."""
    if init_from is None:
        return Decoder(model_cfg)
    source = Path(init_from)
    if (source / "config.json").is_file():
        from dptrain.export import from_hf

        model = from_hf(source)
    else:
        from dptrain.checkpoint import load_model

        model = load_model(source)
    if model.cfg != model_cfg:
        raise UserError(f"init_from {source} holds a model whose config differs from `model`")
    return model


def agreement_facts(randomness: dict, mechanism, fingerprint: str, model) -> dict[str, str]:
    """Digests every rank must share before step 1 (the secret only hashed, and only compared in memory)."""
    weights = hashlib.sha256()
    with torch.no_grad():
        for tensor in model.unique_state_dict().values():
            weights.update(torch.stack([tensor.double().sum(), tensor.double().square().sum()]).cpu().numpy().tobytes())
    return {"randomness": hashlib.sha256(f"{randomness['draw']}:{randomness['secret']}".encode()).hexdigest(),
            "mechanism": repr(mechanism), "data": fingerprint, "initial weights": weights.hexdigest()}
