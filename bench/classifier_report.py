"""How well does the reply classifier generalize? Accuracy, recall per label, confusion, danger.

    python3 bench/classifier_report.py [--shared PATH] [--own PATH] [--json]

Four sets: the shared corpus (../shared/corpora/smtp_replies.tsv, what the rules were first
written against), and this repository's own corpus (tests/data/replies_own.tsv) in its three
splits: ``dev`` (looked at while fixing classes of mistakes), ``heldout`` (chosen by a hash of
the text before any tuning, only ever measured) and ``heldout2`` (the same hash rule applied to
the lines of the second collection round, fixed before the classifier was run on them).
"Dangerous" counts block, policy, rate and greylist lines the classifier called ``not_exist``:
each would make a client delete a contact because *we* were refused. It must be 0 everywhere.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sounding.smtp.classify import CORPUS_LABEL, classify_parts

ROOT = Path(__file__).resolve().parents[1]
OWN = ROOT / "tests" / "data" / "replies_own.tsv"
SHARED_CANDIDATES = (ROOT.parent / "shared" / "corpora" / "smtp_replies.tsv",
                     ROOT.parents[1] / "shared" / "corpora" / "smtp_replies.tsv")
#: Labels whose lines are refusals of *us* or of the message, never evidence about the mailbox.
DANGER_LABELS = frozenset({"ip_blocked", "policy", "rate_limit", "greylist"})


@dataclass(frozen=True, slots=True)
class Row:
    """One labelled reply line."""

    code: int | None
    enhanced: tuple[int, int, int] | None
    text: str
    label: str
    source: str
    split: str


@dataclass
class Score:
    """Measured figures for one set of rows."""

    name: str
    n: int = 0
    correct: int = 0
    totals: Counter[str] = field(default_factory=Counter)
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)
    dangerous: list[Row] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        """Share of rows whose label the classifier reproduced."""
        return self.correct / self.n if self.n else 0.0

    def recall(self, label: str) -> float:
        """Share of the rows labelled ``label`` that were called ``label``."""
        return self.confusion[(label, label)] / self.totals[label] if self.totals[label] else 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready figures."""
        return {"set": self.name, "rows": self.n, "accuracy": round(self.accuracy, 4),
                "recall": {lab: round(self.recall(lab), 4) for lab in sorted(self.totals)},
                "support": dict(sorted(self.totals.items())),
                "dangerous_not_exist": len(self.dangerous),
                "confusion": {f"{a}->{b}": c for (a, b), c in sorted(self.confusion.items()) if a != b}}


def _enh(s: str) -> tuple[int, int, int] | None:
    parts = s.strip().split(".")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def load(path: Path) -> list[Row]:
    """Rows of a corpus TSV (code, enhanced_code, text, label, source[, split])."""
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:
        rd = csv.reader(fh, delimiter="\t")
        header = next(rd)
        has_split = len(header) > 5 and header[5] == "split"
        for rec in rd:
            code = int(rec[0]) if rec[0].strip().isascii() and rec[0].strip().isdigit() else None
            rows.append(Row(code, _enh(rec[1]), rec[2], rec[3], rec[4], rec[5] if has_split else "all"))
    return rows


def score(name: str, rows: list[Row]) -> Score:
    """Classify every row and tally the results."""
    sc = Score(name)
    for r in rows:
        got = CORPUS_LABEL[classify_parts(r.code, r.enhanced, r.text).outcome]
        sc.n += 1
        sc.totals[r.label] += 1
        sc.confusion[(r.label, got)] += 1
        sc.correct += got == r.label
        if got == "not_exist" and r.label in DANGER_LABELS:
            sc.dangerous.append(r)
    return sc


def shared_path() -> Path | None:
    """Where the shared corpus is, if present."""
    return next((p for p in SHARED_CANDIDATES if p.exists()), None)


def scores(shared: Path | None = None, own: Path = OWN) -> list[Score]:
    """The three measured sets (the shared one only when present)."""
    out = []
    sp = shared or shared_path()
    if sp is not None and sp.exists():
        out.append(score("shared", load(sp)))
    mine = load(own)
    out.append(score("own/dev", [r for r in mine if r.split == "dev"]))
    out.append(score("own/heldout", [r for r in mine if r.split == "heldout"]))
    out.append(score("own/heldout2", [r for r in mine if r.split == "heldout2"]))
    return out


def render(sc: Score, *, show_dangerous: bool = True) -> str:
    """A plain-text block: accuracy, per-label recall, confusion and the dangerous count."""
    labels = sorted(set(sc.totals) | {g for _, g in sc.confusion})
    lines = [f"== {sc.name}: {sc.n} lines, accuracy {sc.accuracy:.1%}, "
             f"dangerous (block/policy/rate/greylist -> not_exist): {len(sc.dangerous)}",
             "confusion (rows: label, columns: classifier)",
             f"{'':>13}" + "".join(f"{lab[:8]:>9}" for lab in labels) + "   recall"]
    for lab in sorted(sc.totals):
        cells = "".join(f"{sc.confusion[(lab, g)]:>9}" for g in labels)
        lines.append(f"{lab:>13}{cells}   {sc.recall(lab):.1%} (n={sc.totals[lab]})")
    if show_dangerous:
        lines += [f"  DANGEROUS: [{r.label}] {r.text[:150]}" for r in sc.dangerous]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the report; exit status 1 when any set has a dangerous error."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--shared", type=Path, default=None, help="shared corpus TSV")
    ap.add_argument("--own", type=Path, default=OWN, help="own corpus TSV (with a split column)")
    ap.add_argument("--json", action="store_true", help="JSON output")
    a = ap.parse_args(argv)
    res = scores(a.shared, a.own)
    if a.json:
        print(json.dumps([s.as_dict() for s in res], indent=2))
    else:
        print("\n\n".join(render(s) for s in res))
    return 1 if any(s.dangerous for s in res) else 0


if __name__ == "__main__":
    sys.exit(main())
