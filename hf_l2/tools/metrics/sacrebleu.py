"""Corpus BLEU with sacreBLEU, as an `evaluate` module that loads without the Hub.

`evaluate.load("sacrebleu")` fetches its script from the Hub; this file is loaded by path instead
(`hf_l2.tools.metrics.load("sacrebleu")`). Scores match `sacrebleu.corpus_bleu` with its default 13a tokenization.
"""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = "Corpus BLEU (Papineni et al., 2002) computed by sacreBLEU (Post, 2018), 0–100."
_KWARGS = """
Args:
    predictions (`list[str]`): one hypothesis per source sentence.
    references (`list[str]` or `list[list[str]]`): one reference, or the same number of references, per hypothesis.
    tokenize (`str`, defaults to `"13a"`): sacreBLEU tokenizer.
    lowercase (`bool`, defaults to `False`).
Returns:
    `score` (float), `counts`, `totals`, `precisions`, `bp`, `sys_len`, `ref_len`.
"""


class Sacrebleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
            inputs_description=_KWARGS,
            features=[
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
                ),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        references = [[r] if isinstance(r, str) else list(r) for r in references]
        if len({len(r) for r in references}) > 1:
            raise ValueError("sacrebleu: every prediction needs the same number of references.")
        streams = [list(stream) for stream in zip(*references)]  # sacreBLEU wants one list per reference set
        result = sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize, lowercase=lowercase)
        return {
            "score": result.score,
            "counts": result.counts,
            "totals": result.totals,
            "precisions": result.precisions,
            "bp": result.bp,
            "sys_len": result.sys_len,
            "ref_len": result.ref_len,
        }
