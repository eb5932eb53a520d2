"""The trainer: the config schema and its validator, the optimizer, the jitted steps, sharding,
checkpoints, preemption and the loop (``loop.train_and_evaluate``).

The step, the optimizer, sharding and checkpoints import no TensorFlow; only the loop does,
through the input pipeline and the metric writers.
"""
