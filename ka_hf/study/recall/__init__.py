"""In-context recall: Zoology's multi-query associative recall (MQAR, Arora et al. 2023) for KA against KV and
bounded caches.

    python -m ka_hf.study.recall --preset quick --out runs/recall

Modules: data (the generator), scoring (accuracy on query tokens under a mode's cache), training (curriculum and
early stopping on recall accuracy), verdicts (power check, noise bands, sentences), report, experiment (the job).
docs/recall.md describes the task, the modes and what the verdicts say.
"""
