"""fedpath's foundations, below every other package: errors, durable file I/O, hashing, the run summary.

Pure standard library (no numpy, no torch) so that ``wsi``, ``pipeline`` and ``federation`` can all
build on it. The layers, enforced by ``tests/test_layering.py``::

    fedpath      entry points: CLI, demo, experiment
    federation   aggregator, site client, strategies, attack
    pipeline     config, data, models, DP training, inference, report
    wsi          pixels only: readers, tiling, stitching, export
    fedcore      errors, atomic I/O, sha256, summary.json
"""
