"""EmpathDiffuser's evaluation on AvaMERG (eval_avamerg.py; docs/evaluation.md), in separate rooms:

- ``generate``: the speaker turns of a split, one response per pair, the run folder's records, resume and preemption;
- ``score``: every metric from the records and faces (FID features per pair, BLEU, Dist-n, emotion, face expression);
- ``uncertainty``: bootstrap intervals over pairs and the paired comparison of two runs;
- ``baselines``: copy the speaker, retrieval, shuffled speaker, no speaker guidance;
- ``report``: report.md / metrics.json, the baselines, sweep and comparison tables;
- ``run``: one evaluation or sweep from loading to report, and ``--compare``.
"""
from libs.evaluation.run import compare_runs, evaluate, evaluate_sweep  # noqa: F401
