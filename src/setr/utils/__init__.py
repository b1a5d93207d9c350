"""Helpers of the entry points, one module per job: launch (entry and per-job wrappers), config (checks,
instantiation, extras), resume, distributed (rank, DDP children under Hydra), output (metrics.json, final JSON
line), optuna_storage (the Optuna sweeper's database)."""
