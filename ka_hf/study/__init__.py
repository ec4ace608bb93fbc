"""The KA study: the code that answers research questions with the ka_hf library (data, training, adapter fitting,
evaluation, reports, Hub publishing, the one-command experiment). It imports the library; the library never
imports it, so `import ka_hf` does not load this package or its dependencies (datasets, accelerate, evaluate,
matplotlib, ...).

Modules: data, facts (text and reversal facts), models, training, fit_adapters, evaluation/ (modes, ppl, reversal,
run), metrics/ (the `evaluate` module), measure, report, experiment_report, hub, cli, experiment (the main job:
`python -m ka_hf.experiment`).
"""
