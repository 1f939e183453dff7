"""An append-only journal of the noisy steps a run has taken, written before anything leaves.

A step's outputs (metrics, checkpoints, the weights themselves) may be seen as soon as they leave
the process, so the step is journaled first: one JSON line, flushed and fsynced. A crash loses the
checkpoint's later steps but never the journal. On resume, journaled steps past the checkpoint
are added to the ledger unless the resumed run replays them exactly: same randomness (the same
`draw` id, saved with the secret) and the same step, so the same batch and noise give the same
release and nothing new is spent. Secure randomness never replays: every process start has a
new draw id, and its lost steps are all counted.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dptrain.errors import UserError
from dptrain.privacy.blt import from_state, second_release_charge

JOURNAL_FILE = "privacy_journal.jsonl"


class LedgerJournal:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = None

    def append(self, step: int, fields: dict) -> None:
        """Record step `step` (the step count after it) with the fields that define its release
        (draw id, noise layout, σ, q, dataset size, max batch size); durable on return."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
        self._file.write(json.dumps({"step": step, **fields}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def entries(self) -> list[dict]:
        return read_appended(self.path)

    def released_after(self, step: int, replayed_by: dict | None = None) -> list[dict]:
        """The distinct releases journaled past `step`, less those a run whose journal fields are
        `replayed_by` will replay exactly (None: it replays nothing)."""
        seen, out = set(), []
        for entry in self.entries():
            key = json.dumps(entry, sort_keys=True)
            if entry["step"] <= step or key in seen:
                continue
            seen.add(key)  # the same step replayed by the same draw is one release
            if replayed_by is not None and all(entry.get(k) == v for k, v in replayed_by.items()):
                continue
            out.append(entry)
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def record_entries(ledger, entries: list[dict]) -> None:
    """Add journaled steps a crash lost, and that the run does not replay, to a PrivacyLedger.

    A lost BandMF step is released again by the resumed run with noise that shares its correlated
    part with the lost one, so it is not a fresh round of cyclic Poisson sampling: each is charged
    as an unsubsampled Gaussian release (q = 1), which bounds any query of sensitivity 1; a lost
    BLT step likewise, at the sensitivity of one row of its strategy (dptrain.privacy.blt)."""
    for e in entries:
        if "blt" in e:
            ledger.add(second_release_charge(from_state(e["blt"]), e["bands"], e["noise_multiplier"]))
            continue
        rate = 1.0 if e.get("bands", 1) > 1 else e["sampling_rate"]
        ledger.record(e["noise_multiplier"], rate, dataset_size=e.get("dataset_size"),
                      max_batch_size=e.get("max_batch_size"))


def read_appended(path: Path) -> list[dict]:
    """The JSON lines of an append-only file; a torn last line (a crash mid-write, before that
    step's outputs left its process) is dropped, a corrupt earlier one is an error."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path} line {number} is corrupt") from None
    return rows
