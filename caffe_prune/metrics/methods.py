"""How a pruning method is named, wherever runs are grouped, stored or reported.

A run prunes with one saliency metric (its name, as given: a composition, an alias, ``eqN``, a
Domino variant) or with the myopic oracle over constituents. The oracle's name says which of
papers/004's five it composes (``PAPER_FORMS``: the forms that reproduce Table 2, the authors'
code's, or equations 1-5 as printed):

- ``oracle`` for the five as the authors' code computes them;
- ``oracle (FORMS forms)`` for the five in another of ``PAPER_FORMS`` (each reported in Table 2's
  oracle row);
- ``oracle:A+B+...`` for any other constituents;

with `` [authors-code shortlist]`` appended when the oracle short-listed by the authors' released
rule (caffe_prune.oracle.SHORTLISTS). Sweeps (their store's method column), the reports and the
results queries all read these names from here.
"""
from __future__ import annotations

from caffe_prune.metrics.taxonomy import ALIASES, PAPER_FORMS

ORACLE = "oracle"
PAPER_FIVE = tuple(ALIASES)          # papers/004's five constituents, in the paper's order
DEFAULT_FORMS = "table2"             # the forms `prune --oracle` and `reproduce oracle` compose by default


def oracle_of_forms(forms: str) -> str:
    """The method name of the oracle over the paper's five in ``forms`` (PAPER_FORMS); the authors'
    code's forms are plain ``oracle``."""
    return ORACLE if forms == "code" else f"{ORACLE} ({forms} forms)"


def forms_of(constituents) -> str | None:
    """Which of PAPER_FORMS the constituents are (in any order), or None."""
    return next((f for f, five in PAPER_FORMS.items() if sorted(constituents) == sorted(five)), None)


def oracle_method(constituents, shortlist: str = "paper") -> str:
    """An oracle run's method name (see the module docstring)."""
    forms = forms_of(constituents)
    name = oracle_of_forms(forms) if forms else ORACLE + ":" + "+".join(constituents)
    return name if shortlist == "paper" else f"{name} [{shortlist} shortlist]"


def method(metric: str | None, oracle=(), shortlist: str = "paper") -> str:
    """A run's method name: its metric, or its oracle's."""
    return metric if metric else oracle_method(list(oracle), shortlist)
