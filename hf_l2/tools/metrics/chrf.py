"""chrF (and chrF++) with sacreBLEU, as an `evaluate` module that loads without the Hub.

Loaded by path (`hf_l2.tools.metrics.load("chrf")`); scores match `sacrebleu.corpus_chrf` with the same settings.
"""

import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = "Character n-gram F-score (Popović, 2015) computed by sacreBLEU, 0–100."
_KWARGS = """
Args:
    predictions (`list[str]`): one hypothesis per source sentence.
    references (`list[str]` or `list[list[str]]`): one reference, or the same number of references, per hypothesis.
    word_order (`int`, defaults to 0): 2 gives chrF++.
    char_order (`int`, defaults to 6), beta (`int`, defaults to 2), lowercase (`bool`, defaults to `False`).
Returns:
    `score` (float), `char_order`, `word_order`, `beta`.
"""


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Popović, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015.",
            inputs_description=_KWARGS,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False):
        references = [[r] if isinstance(r, str) else list(r) for r in references]
        if len({len(r) for r in references}) > 1:
            raise ValueError("chrf: every prediction needs the same number of references.")
        streams = [list(stream) for stream in zip(*references)]
        scorer = CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)
        result = scorer.corpus_score(predictions, streams)
        return {"score": result.score, "char_order": char_order, "word_order": word_order, "beta": beta}
