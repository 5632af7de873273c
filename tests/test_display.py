"""What users read in an 80-column terminal: the training bar and the evaluate table show
every count, time and value whole (they used to read `400/…`, `0:00:…`, `setti…`, `dapo_…`)."""

from __future__ import annotations

import io

from rich.console import Console

from hapo_cli.evaluate import result_table
from hapo_cli.progress import step_progress


def _render(renderable) -> str:
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def test_training_bar_shows_total_elapsed_and_remaining_at_80_columns():
    bar = step_progress("train", 400, console=Console(file=io.StringIO(), width=80))
    bar.add_task("train", total=400, completed=12,
                 info="reward 0.125  acc 0.125  entropy 2.274  val 0.005 and more text")
    line = _render(bar.get_renderable()).splitlines()[0]
    assert len(line) <= 80
    assert " 12/400 " in line
    assert "0:00:00" in line and "…/" not in line and "0:00:…" not in line
    assert "reward 0.125" in line  # the info column is the one shortened
    wide = step_progress("warm-up", 1500)
    wide.add_task("warm-up", total=1500, completed=1500, info="")
    assert "1500/1500" in _render(wide.get_renderable())


def test_evaluate_table_values_are_readable_at_80_columns():
    rows = []
    for setting in ("T=0.5", "T=1.1", "adaptive@0.5", "greedy"):
        rows.append({"benchmark": "dapo_math_val", "checkpoint_step": 400, "setting": setting,
                     "n": 8, "avg@8": 0.5125, "pass@1": 0.5125, "pass@8": 0.875, "maj@8": 0.625,
                     "response_len_mean": 21.25, "truncation_rate": 0.0,
                     "critical_tokens_mean": 2.3125})
    text = _render(result_table(rows, 8))
    assert all(len(x) <= 80 for x in text.splitlines())
    assert "…" not in text
    for value in ("dapo_math_val", "adaptive@0.5", "setting", "pass@1", "pass@8", "maj@8",
                  "0.512", "0.875", "0.625", "21.2", "0.00", "2.31", "400"):
        assert value in text, value
