"""Paper reproductions, installed as ``fbalign.experiments`` (this folder is mapped to that package in
pyproject.toml, so ``fbalign reproduce`` works from an installed wheel as well as from a clone).

``PAPERS`` maps the name given to ``fbalign reproduce`` to the module that reproduces it; each such module is a
set of plain experiment functions returning results, plus the figures and the report.
"""

PAPERS: dict[str, str] = {
    "lillicrap2016": "fbalign.experiments.lillicrap2016",
    "liao2016": "fbalign.experiments.liao2016",
    "open-questions": "fbalign.experiments.open_questions",
    "akrout2019": "fbalign.experiments.akrout2019",
    "transformers": "fbalign.experiments.transformers",
}
