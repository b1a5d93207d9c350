"""Run utilities for the entry points: config checks, instantiation, resume, DDP under Hydra, output."""
