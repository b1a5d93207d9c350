"""The measures of ``src/bench.py`` (:mod:`setr.tasks.bench`), one module per job, so each can be read and tested
on its own and the task only checks the config, orchestrates the rounds and prints.

* :mod:`~setr.benchmark.variant`: one side of the comparison (setting or baseline) resolved from a config and built;
* :mod:`~setr.benchmark.timing`: timed calls, warm-up, the measures and their min / median / ratio;
* :mod:`~setr.benchmark.train`: a full training step and its peak memory;
* :mod:`~setr.benchmark.inference`: whole / sliding-window / multi-scale + flip inference of one image;
* :mod:`~setr.benchmark.data`: the data pipeline's throughput and the workers it takes to keep up;
* :mod:`~setr.benchmark.mfu`: training FLOPs, the GPUs' dense peaks and the model FLOPs utilisation;
* :mod:`~setr.benchmark.profile`: the operators with the most self time in a training step.

Nothing here imports :mod:`setr.tasks`: the task sits above these modules.
"""
