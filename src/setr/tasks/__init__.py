"""One module per entry task: the logic behind ``src/<task>.py`` (train, evaluate, predict, summary, export).

Each module has a ``run(cfg)`` that takes the composed Hydra config, prints what the user should see, and
returns the dict printed as the entry point's final JSON line. The thin scripts under ``src/`` only compose the
config and call :func:`setr.utils.launch.launch`.
"""
