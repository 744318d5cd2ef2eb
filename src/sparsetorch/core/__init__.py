"""The building blocks every method composes, as small functions over tensors.

* ``patterns``: what shape the kept set has (unstructured, N:M, blocks, channels).
* ``distributions``: how much density each layer gets (uniform, ER, ERK, global).
* ``scores``: which weights matter (magnitude, random, gradient).
* ``schedules``: when (step -> density or update fraction).
* ``layer_selection``: which layers (include/exclude by type and name glob).
* ``masks``: masks as buffers on the model, and keeping pruned weights at zero.
* ``post_training``: ``sparsetorch.prune``, the data-free composition of the above.
"""
