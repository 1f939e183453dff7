"""The data's own ledger: every noisy step any run took on a prepared folder, kept in that folder.

A run's ledger follows its weights (checkpoints, exports, `init_from`), but weights can be copied,
shared without their private state or trained again from an export with its ledger file removed.
The data cannot lose track: `privacy_spent.jsonl` inside the prepared folder gets one line per
released step of every run that trains on it (train, resume, continuations, sweeps, audits),
appended under an exclusive lock and fsynced before the step's outputs leave the process. The total
ε spent on the data is the composition of every distinct release recorded there, whatever run
or copy of the weights it came from.

Each line names the run's draw (its randomness: a resume that replays a step with the same draw
releases nothing new, so duplicates count once) and the data's content fingerprint at the time.
What it cannot see: a copy of the prepared folder (the copy starts from the ledger as copied, and
later spending on either is not seen by the other), and the raw corpus prepared again into a new
folder (a new ledger). docs/privacy.md says how to carry it.
"""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from dptrain.errors import UserError
from dptrain.privacy.accounting import PrivacyLedger, make_run
from dptrain.privacy.bandmf import opens_round
from dptrain.privacy.blt import from_state, round_charge, second_release_charge
from dptrain.privacy.journal import read_appended

DATA_LEDGER_FILE = "privacy_spent.jsonl"
# The fields that make two lines the same release: one run's step, replayed with the same draw.
# The run id is part of it: two runs under the same seed draw alike but train differently.
RELEASE_KEYS = ("run", "draw", "step", "layout", "noise_multiplier", "sampling_rate", "dataset_size",
                "max_batch_size", "unit", "max_sequences_per_unit", "bands", "blt")


class DataLedger:
    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / DATA_LEDGER_FILE

    def check_writable(self) -> None:
        """Refuse, before any compute, a data folder whose ledger cannot be appended to."""
        try:
            with self.path.open("a"):
                pass
        except OSError as err:
            raise UserError(f"cannot write the data's privacy ledger {self.path} ({err.strerror}): "
                            "every run on private data records its spending there") from None

    def append(self, entries: list[dict]) -> None:
        """Append lines under an exclusive lock (runs on the same data may run at once); durable on return."""
        if not entries:
            return
        text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
        with self.path.open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def entries(self) -> list[dict]:
        return read_appended(self.path)

    def releases(self) -> list[dict]:
        """The distinct releases recorded: an exact replay of a step (same draw) counts once."""
        seen, out = set(), []
        for entry in self.entries():
            key = json.dumps({k: entry.get(k) for k in RELEASE_KEYS}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(entry)
        return out

    def spent(self) -> PrivacyLedger:
        """Every distinct release as one ledger, ready for the certified accountant. A BandMF run's
        steps are charged per round (at each round's first step); a second release of the same step
        of a run (another draw, after a crash) as an unsubsampled Gaussian (see journal.record_entries).
        A BLT run's rounds are charged as Gaussians carrying each round's share of the sensitivity."""
        counts: dict[tuple, int] = {}
        released: set[tuple] = set()
        for e in self.releases():
            q, count, bands = e["sampling_rate"], 1, e.get("bands", 1)
            if "blt" in e:
                again = (e.get("run"), e["step"]) in released
                released.add((e.get("run"), e["step"]))
                blt = from_state(e["blt"])
                run = (second_release_charge(blt, bands, e["noise_multiplier"]) if again else
                       round_charge(blt, bands, e["noise_multiplier"], e["step"]))
                key = (run.noise_multiplier, 1.0, None, None)
                counts[key] = counts.get(key, 0) + run.count
                continue
            if bands > 1:
                again = (e.get("run"), e["step"]) in released
                released.add((e.get("run"), e["step"]))
                q, count = (1.0, 1) if again else (q, int(opens_round(e["step"], bands)))
            key = (e["noise_multiplier"], q, e.get("dataset_size"), e.get("max_batch_size"))
            counts[key] = counts.get(key, 0) + count
        ledger = PrivacyLedger()
        for (sigma, q, size, cap), count in counts.items():
            ledger.add(make_run(sigma, q, count, size, cap))
        return ledger

    def runs(self) -> list[str]:
        """The runs recorded, in order of their first line."""
        return list(dict.fromkeys(e.get("run", "?") for e in self.entries()))
