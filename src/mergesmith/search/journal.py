"""OUT_DIR/journal: what a search has done, written as it goes, so that an interrupted search continues.

- ``header.json``: the search config and seed; a rerun with another config or seed is refused.
- ``evals.jsonl``: one line per evaluated candidate, appended and fsynced as each finishes (a line torn
  by kill -9 is ignored when read back).
- ``state-NNNNN.pkl``: the optimiser, pickled whole (random state included) before generation NNNNN is
  asked. Resuming loads the newest one and asks that generation again, which gives the same candidates;
  those already in ``evals.jsonl`` are not evaluated again.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

from mergesmith.core.errors import MergeError
from mergesmith.core.write import write_atomic

HEADER = "header.json"
EVALS = "evals.jsonl"
RECORD_KEYS = {"gen", "x", "fitness", "scores", "merge_s", "score_s"}  # what run.py journals per candidate
STATE = re.compile(r"state-(\d{5})\.pkl")


class Journal:
    def __init__(self, folder: Path):
        self.folder = folder

    def exists(self) -> bool:
        return (self.folder / HEADER).is_file()

    def create(self, header: dict) -> None:
        self.folder.mkdir()
        write_atomic(self.folder / HEADER, (json.dumps(header, indent=1, sort_keys=True) + "\n").encode())

    def header(self) -> dict:
        try:
            header = json.loads((self.folder / HEADER).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MergeError(
                f"search journal {self.folder / HEADER} cannot be read ({exc}); use a new OUT_DIR"
            ) from None
        if not isinstance(header, dict):
            raise MergeError(
                f"search journal {self.folder / HEADER} is not a journal header; use a new OUT_DIR"
            )
        return header

    def evals(self) -> list[dict]:
        path = self.folder / EVALS
        if not path.is_file():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line, torn by a kill: evaluated again
                continue
            # a line that is not a record (edited by hand): its candidate is evaluated again too
            if isinstance(record, dict) and RECORD_KEYS <= record.keys() and isinstance(record["x"], list):
                out.append(record)
        return out

    def append(self, record: dict) -> None:
        path = self.folder / EVALS
        with open(path, "ab+") as f:
            torn = False
            if f.tell() > 0:  # a line torn by a kill ends the file: start on a new line
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            f.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def save_state(self, generation: int, optimizer: Any) -> None:
        write_atomic(self.folder / f"state-{generation:05d}.pkl", pickle.dumps(optimizer))

    def latest_state(self) -> tuple[int, Any] | None:
        found = sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := STATE.fullmatch(p.name)))
        if not found:
            return None
        return found[-1], self.state(found[-1])

    def state(self, generation: int) -> Any:
        """The optimiser as it was before ``generation`` was asked."""
        path = self.folder / f"state-{generation:05d}.pkl"
        try:
            with open(path, "rb") as f:
                return pickle.load(f)  # our own file, written by this search
        except (OSError, pickle.UnpicklingError, EOFError) as exc:
            raise MergeError(f"search journal {path} cannot be read ({exc}); use a new OUT_DIR") from None
