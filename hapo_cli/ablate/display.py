"""Progress display of the running ablation: a live rich table on a terminal; one line per
start/finish otherwise (logs, CI)."""

from __future__ import annotations

import time
from typing import Any

from ..recipe import Recipe
from .plan import DONE, FAILED, AblationSpec, PlanEntry, RunState
from .runner import ActiveRun, MetricsTail


class Display:
    """A live rich table on a terminal; one line per start/finish otherwise (logs, CI)."""

    def __init__(self, console: Any, spec: AblationSpec, todo: list[PlanEntry],
                 resolved: dict[str, Recipe]) -> None:
        self.console, self.spec, self.todo, self.resolved = console, spec, todo, resolved
        self.live_mode = bool(getattr(console, "is_terminal", False))
        self.live = None
        self.rows: dict[str, dict[str, str]] = {
            e.run_dir: {"status": "queued", "step": "", "val": "", "time": ""} for e in todo
        }
        self.t0 = time.time()

    def __enter__(self) -> Display:
        if self.live_mode:
            from rich.live import Live

            # auto_refresh=False: no refresh thread in this process while children are forked.
            self.live = Live(self._table(), console=self.console, auto_refresh=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table(), refresh=True)
            self.live.__exit__(*exc)
            self.live = None

    def _max_steps(self, run: str) -> int:
        return self.resolved[run].train.max_steps

    def started(self, entry: PlanEntry, resumed_from: int | None, gpu: str | None) -> None:
        how = f"resume from step {resumed_from}" if resumed_from else "start"
        self.rows[entry.run_dir].update(status=f"running ({how})")
        if not self.live_mode:
            where = f" on GPU {gpu}" if gpu is not None else ""
            self.console.print(f"{how} {entry.run_dir}{where}", highlight=False)

    def finished(self, entry: PlanEntry, st: RunState, tail: MetricsTail) -> None:
        took = (st.ended or 0) - (st.started or 0)
        row = self.rows[entry.run_dir]
        row.update(status=st.status, step=f"{tail.step or 0}/{self._max_steps(entry.run_dir)}",
                   val=tail.val_text(), time=f"{took:.0f}s")
        if not self.live_mode:
            color = "green" if st.status == DONE else "red"
            extra = f": {st.error}" if st.error else ""
            self.console.print(
                f"[{color}]{st.status}[/{color}] {entry.run_dir} step {row['step']} val "
                f"{row['val']} ({row['time']}){extra}",
                highlight=False,
            )

    def refresh(self, active: dict[int, ActiveRun]) -> None:
        if self.live is None:
            return
        now = time.time()
        for a in active.values():
            self.rows[a.entry.run_dir].update(
                step=f"{a.tail.step or 0}/{self._max_steps(a.entry.run_dir)}",
                val=a.tail.val_text(), time=f"{now - a.started:.0f}s",
            )
        self.live.update(self._table(), refresh=True)

    def _table(self):
        from rich.table import Table

        done = sum(r["status"] in (DONE, FAILED) for r in self.rows.values())
        table = Table(title=f"ablation {self.spec.name}: {done}/{len(self.rows)} finished, "
                      f"{time.time() - self.t0:.0f}s")
        for col in ("run", "status", "step", "val avg@k", "time"):
            table.add_column(col)
        for e in self.todo:
            r = self.rows[e.run_dir]
            status = r["status"]
            color = {"done": "green", "failed": "red"}.get(status, "yellow"
                                                             if status.startswith("running")
                                                             else "dim")
            table.add_row(e.run_dir, f"[{color}]{status}[/{color}]", r["step"], r["val"],
                          r["time"])
        return table

