"""The HAPO authors' training grader ("dapo" verifier): DAPO-Math-17k's `Answer:` line.

Behaviour read from the authors' `verl/utils/reward_score/math_dapo.py` (`compute_score`,
`is_correct_minerva`, `normalize_final_answer`; commit 7671dde) and its math-verify fallback
`compute_score_for_dapo` in `verl/utils/reward_score/math_verify.py`:

1. only the last 300 characters of the response are looked at;
2. the prediction is the last match of `(?i)Answer\\s*:\\s*([^\\n]+)` (DAPO-Math-17k's prompt
   ends with "... The last line of your response should be of the form Answer: $Answer");
   none gives `[INVALID]`;
3. prediction and ground truth are normalised (`normalize_answer`, the Minerva/lm-eval
   normalisation) and compared as strings;
4. when that fails and a prediction was extracted, math-verify compares `\\boxed{pred}` with
   `\\boxed{gold}` and may still accept it.

The authors' score is +1 / -1 (`train.incorrect_score` sets the -1); the overlong penalty is
added by the reward manager (`rewards/shaping.py`). This module only decides correctness.
"""

from __future__ import annotations

import re

INVALID = "[INVALID]"
TAIL_CHARS = 300  # math_dapo.compute_score: "The longest answer in MATH-500 has 159 characters"
ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# (before, after) replacements, in order, then substrings deleted, in order
_REPLACE = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""),
    ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)
_DELETE = (
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
    "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;", ",\\!", "{,}", '"', "\\dots",
)
# (pattern, replacement) applied in order after the plain-string edits
_REGEX = (
    (re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), r"$\3$"),  # keep the first $...$ span
    (re.compile(r"(\\text\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\textbf\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\overline\{)(.*?)(\})"), r"\2"),
    (re.compile(r"(\\boxed\{)(.*)(\})"), r"\2"),
    (re.compile(r"(frac)([^{])(.)"), r"frac{\2}{\3}"),  # \frac12 -> \frac{1}{2}
    (re.compile(r"(sqrt)([^{])"), r"sqrt{\2}"),  # \sqrt2 -> \sqrt{2}
)


def normalize_answer(text: str) -> str:
    """The authors' `normalize_final_answer`: keep what follows the last '=', drop spaces,
    units and text wrappers, expand `\\frac12`/`\\sqrt2`, strip '$' and thousands separators
    (e.g. "x = \\frac12" -> "\\frac{1}{2}", "1,000 dollars" -> "1000")."""
    out = text.split("=")[-1]
    for before, after in _REPLACE:
        out = out.replace(before, after)
    for gone in _DELETE:
        out = out.replace(gone, "")
    for pattern, repl in _REGEX:
        out = pattern.sub(repl, out)
    out = out.replace("$", "")
    if out.replace(",", "").isdigit():
        out = out.replace(",", "")
    return out.strip()


def extract_answer_line(response: str) -> str:
    """The raw text of the last `Answer: ...` line in the last 300 characters, or `[INVALID]`."""
    matches = ANSWER_RE.findall(response[-TAIL_CHARS:])
    return matches[-1] if matches else INVALID


def dapo_prediction(response: str) -> str:
    """The normalised prediction the authors' grader compares (`[INVALID]` normalises to
    itself: no rule touches it)."""
    return normalize_answer(extract_answer_line(response))


def dapo_string_match(response: str, answer: str) -> tuple[bool, str]:
    """(correct by normalised string equality, normalised prediction)."""
    pred = dapo_prediction(response)
    return pred == normalize_answer(answer), pred


def math_verify_boxed(pred: str, answer: str) -> bool:
    """The authors' fallback (`compute_score_for_dapo`): math-verify with both sides wrapped in
    `\\boxed{}`; gold parsed as LaTeX, prediction as an expression or LaTeX. No timeout here:
    the caller (`verify.verify_dapo`) bounds it."""
    from .mathverify import NO_TIMEOUT, math_verify_module

    mv = math_verify_module()
    gold = mv.parse("\\boxed{" + answer + "}", [mv.LatexExtractionConfig()],
                    parsing_timeout=NO_TIMEOUT)
    got = mv.parse(
        "\\boxed{" + pred + "}",
        [mv.ExprExtractionConfig(), mv.LatexExtractionConfig()],
        parsing_timeout=NO_TIMEOUT,
    )
    if not gold or not got:
        return False
    return bool(mv.verify(gold, got, timeout_seconds=None))
