"""What a model's weights have already spent on private data, in a file that travels with them.

A checkpoint's `train_state.pt` is private (it holds the run's secret); its ledger is not: the noise,
sampling rates and step counts are in the report anyway. So every checkpoint also carries
`privacy_ledger.json`, an export copies it, and `dptrain import` keeps it: training further from an
export, or from an imported copy of one, continues the ledger instead of starting a fresh one.
A checkpoint that `dptrain import` made from weights without that file records that it holds
public weights, and starts a fresh ledger.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from dptrain.errors import UserError
from dptrain.privacy.accounting import PrivacyLedger

LEDGER_FILE = "privacy_ledger.json"
PUBLIC_FILE = "public_weights.json"


def write_spent(folder: Path, ledger: PrivacyLedger, lineage: list) -> None:
    """Record in `folder` the ledger and lineage behind the weights it holds."""
    doc = {"ledger": ledger.state_dict(), "steps": ledger.steps, "lineage": lineage}
    (Path(folder) / LEDGER_FILE).write_text(json.dumps(doc, indent=1) + "\n")


def read_spent(folder: Path) -> tuple[PrivacyLedger, list] | None:
    """The ledger and lineage recorded in `folder`, or None when it records none."""
    file = Path(folder) / LEDGER_FILE
    if not file.is_file():
        return None
    try:
        doc = json.loads(file.read_text())
        ledger = PrivacyLedger()
        ledger.load_state_dict(doc["ledger"])
        return ledger, list(doc.get("lineage", []))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{file} is corrupt ({err})") from None


def copy_spent(source: Path, destination: Path) -> bool:
    """Copy the ledger file of `source` into `destination`; False when there is none."""
    file = Path(source) / LEDGER_FILE
    if file.is_file():
        shutil.copyfile(file, Path(destination) / LEDGER_FILE)
        return True
    return False


def mark_public(folder: Path, source: str) -> None:
    """Mark `folder` as holding weights imported from `source`, which spent nothing we know of."""
    (Path(folder) / PUBLIC_FILE).write_text(json.dumps({"imported_from": source}) + "\n")


def is_public(folder: Path) -> bool:
    return (Path(folder) / PUBLIC_FILE).is_file()
