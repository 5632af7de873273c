"""Key numbers of a `hapo ablate` directory, per variant (means over seeds): response length at
step 1 (before any update) and over the last 10 steps, token entropy, clip fractions by side and
by entropy side, validation avg@k at the first and last validation; then the most clipped tokens
of each side over all runs' token rows. docs/results.md ("The tiny benchmark") quotes it.

Run: .venv/bin/python scripts/ablation_key_numbers.py results/steps-ablation
"""

from __future__ import annotations

import re
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis import schema as S  # noqa: E402
from analysis.io import read_jsonl  # noqa: E402

RUN_RE = re.compile(r"^(?P<variant>.+)-s\d+$")


def run_numbers(rows: list[dict]) -> dict[str, float] | None:
    train = [r for r in rows if S.CLIP_FRAC_LOW in r]
    val_key = next((k for r in rows for k in r if k.startswith(S.VAL_PREFIX) and "avg@" in k), None)
    if len(train) < 10 or val_key is None:
        return None
    val = [r[val_key] for r in rows if val_key in r]

    def col(k):
        return [r[k] for r in train]

    length, ent = col(S.RESPONSE_LEN_MEAN), col(S.ENTROPY_MEAN)
    low, high = col(S.CLIP_FRAC_LOW), col(S.CLIP_FRAC_HIGH)
    return {
        "len_start": length[0], "len_end": st.mean(length[-10:]),
        "ent_start": st.mean(ent[:3]), "ent_end": st.mean(ent[-10:]),
        "low": st.mean(low), "low_max": max(low), "low_steps": sum(x >= 0.01 for x in low),
        "high": st.mean(high), "high_max": max(high), "high_steps": sum(x >= 0.01 for x in high),
        "low_hi_ent": st.mean(col(S.CLIP_FRAC_LOW_HI_ENT)),
        "low_lo_ent": st.mean(col(S.CLIP_FRAC_LOW_LO_ENT)),
        "high_hi_ent": st.mean(col(S.CLIP_FRAC_HIGH_HI_ENT)),
        "high_lo_ent": st.mean(col(S.CLIP_FRAC_HIGH_LO_ENT)),
        "val_start": val[0], "val_end": val[-1],
    }


def main(root: Path) -> None:
    per: dict[str, list[dict]] = defaultdict(list)
    clipped: list[pd.DataFrame] = []
    for run in sorted(p for p in root.iterdir() if p.is_dir() and RUN_RE.match(p.name)):
        nums = run_numbers(read_jsonl(run / S.METRICS)[0])
        if nums is None:
            continue
        per[RUN_RE.match(run.name)["variant"]].append(nums)
        for f in sorted((run / S.TOKENS_DIR).glob("*.parquet")):
            t = pd.read_parquet(f, columns=["token_text", "entropy", "h", "clip_side"])
            clipped.append(t[t.clip_side != "none"])
    print("variant n | length step 1 -> last 10 | entropy first 3 -> last 10 | low clip mean/max/"
          "steps>=1% | high clip mean/max/steps>=1% | low: h>0 / h<=0 | high: h>0 / h<=0 | "
          "val first -> last")
    for var, xs in per.items():
        def m(k, xs=xs):
            return st.mean(x[k] for x in xs)
        pct = 100 * (m("len_end") / m("len_start") - 1)
        print(f"{var:14s} {len(xs)} | {m('len_start'):.1f} -> {m('len_end'):.1f} ({pct:+.0f}%) | "
              f"{m('ent_start'):.3f} -> {m('ent_end'):.3f} | "
              f"{100 * m('low'):.2f}/{100 * max(x['low_max'] for x in xs):.2f}/{m('low_steps'):.0f} | "
              f"{100 * m('high'):.2f}/{100 * max(x['high_max'] for x in xs):.2f}/"
              f"{m('high_steps'):.1f} | {100 * m('low_hi_ent'):.2f}/{100 * m('low_lo_ent'):.2f} | "
              f"{100 * m('high_hi_ent'):.2f}/{100 * m('high_lo_ent'):.2f} | "
              f"{m('val_start'):.3f} -> {m('val_end'):.3f}")
    if clipped:
        rows = pd.concat(clipped)
        for side in ("low", "high"):
            s = rows[rows.clip_side == side]
            top = (s.groupby("token_text").agg(n=("h", "size"), ent=("entropy", "mean"))
                   .sort_values("n", ascending=False).head(8))
            print(f"\n{side}-clipped tokens: {len(s)}, mean entropy {s.entropy.mean():.3f}, "
                  f"h > 0: {100 * (s.h > 0).mean():.0f} %")
            print("  " + ", ".join(f"{k!r}: {int(r.n)} (H {r.ent:.2f})" for k, r in top.iterrows()))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
