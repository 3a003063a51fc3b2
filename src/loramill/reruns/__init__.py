"""Content-keyed reruns: which stages of which datasets must run, decided before anything runs.

Owns the code fingerprints (``code``), the stage fingerprints (``fingerprints``), the per-rule
view of a job (``rule_jobs``), the staleness decision and its reasons (``staleness``,
``explain``), how a decision reaches Snakemake (``gates``), the committed locks, the run-cache,
the job runner every stage script calls (``runner``), failure records and the Snakemake
versions the mechanism is tested with. Imports the core package only, never a stage: params
fingerprinted by content are looked up in ``loramill.content_params``.
"""
