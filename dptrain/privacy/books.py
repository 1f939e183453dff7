"""A run's privacy books: where every step it takes is recorded, once, before anything of it leaves.

Three records of one spending, each for its own reader:
- the ledger (`PrivacyLedger`): every step behind the weights, the parents' included; saved in each
  checkpoint and in the public `privacy_ledger.json` that travels with the weights;
- the run's journal (`privacy_journal.jsonl`): each step as it is released, so a crash never loses
  one (see dptrain.privacy.journal);
- the data's ledger (`privacy_spent.jsonl` in the prepared folder): every run's steps on that data
  (see dptrain.privacy.data_ledger).

`record_step` writes all three; only the process that `writes` (rank 0) touches the files.
"""
from __future__ import annotations

from dptrain.errors import UserError
from dptrain.privacy.accounting import PrivacyLedger
from dptrain.privacy.data_ledger import DataLedger
from dptrain.privacy.journal import LedgerJournal, record_entries
from dptrain.privacy.mechanism import Mechanism


class PrivacyBooks:
    def __init__(self, mechanism: Mechanism, spent: PrivacyLedger, journal: LedgerJournal,
                 data: DataLedger | None, release: dict, run_id: str, fingerprint: str | None,
                 writes: bool) -> None:
        """`spent`: the steps behind the initial weights; `release`: what names this run's draws
        (draw id, noise layout); `fingerprint`: the data's content, recorded in the data's ledger."""
        self.mechanism = mechanism
        self.ledger = PrivacyLedger()
        self.ledger.load_state_dict(spent.state_dict())
        self.journal, self.data, self.writes = journal, data, writes
        self.release, self.run_id, self.fingerprint = dict(release), run_id, fingerprint
        self.crash_released_steps = 0  # journaled steps a crash lost and this run does not replay

    def step_fields(self) -> dict:
        """What makes a step's release what it is: a journaled step with the same fields is replayed
        exactly (same batch, same noise), so it is not spent twice."""
        return {**self.release, **self.mechanism.journal_fields()}

    def record_step(self, step: int) -> None:
        """Step `step` (the count after it) was taken: into the ledger, and durably into the journal
        and the data's ledger before its metrics, eval or checkpoint leave the process."""
        self.ledger.add(self.mechanism.run_of_step(step))
        if self.writes:
            fields = self.step_fields()
            self.journal.append(step, fields)
            if self.data is not None:
                self.data.append([{"run": self.run_id, "step": step, "fingerprint": self.fingerprint, **fields}])

    def count_unreplayed(self, step: int, replays: bool) -> None:
        """Steps journaled past `step` (a crash lost them) that this run will not replay exactly:
        their outputs may have been seen, so they are spent. `replays`: whether this run's draws
        are those of the journal's (False under secure randomness: nothing replays)."""
        lost = self.journal.released_after(step, replayed_by=self.step_fields() if replays else None)
        record_entries(self.ledger, lost)
        self.crash_released_steps += len(lost)

    def check_budget(self, data_budget: float | None, delta: float, accountant: str, steps_left: int) -> None:
        """Refuse a run that would take the data's total past `privacy.data_budget`."""
        if data_budget is None or self.data is None:
            return
        total = self.data.spent()
        total.add(self.mechanism.step_run(steps_left))
        eps = total.epsilon(delta, accountant)
        if eps > data_budget:
            raise UserError(f"the data at {self.data.path.parent} has a budget of ε={data_budget:g} "
                            f"(privacy.data_budget) and this run would bring what was spent on it to "
                            f"ε={eps:.4g} at δ={delta:g}")

    def data_epsilon(self, delta: float, accountant: str, own: float, compose: bool = True) -> dict | None:
        """ε spent on the data by every run its ledger records (this one included). `own`: this
        run's ε, which it is whenever the data's ledger holds exactly this ledger's steps (one run
        per data folder: nothing to compute); otherwise composed anew when `compose` (seconds for
        each distinct σ and q), else left None."""
        if self.data is None:
            return None
        spent = self.data.spent()
        if spent.by_mechanism() == self.ledger.by_mechanism():
            epsilon = own
        else:
            epsilon = (spent.epsilon(delta, accountant) if spent.steps else 0.0) if compose else None
        return {"epsilon": epsilon, "accountant": accountant, "steps": spent.steps, "runs": len(self.data.runs())}

    def state_dict(self) -> dict:
        return {"ledger": self.ledger.state_dict(), "crash_released_steps": self.crash_released_steps}

    def load_state_dict(self, state: dict) -> None:
        self.ledger = PrivacyLedger()  # the checkpoint's ledger already holds the parent's steps
        self.ledger.load_state_dict(state["ledger"])
        self.crash_released_steps = state["crash_released_steps"]

    def close(self) -> None:
        self.journal.close()
