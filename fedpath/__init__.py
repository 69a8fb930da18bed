"""fedpath's entry points, the top layer: the ``fedpath`` CLI, the demo and the experiment runner.

They orchestrate the stages in ``pipeline`` (training, inference, report) and ``federation``
(aggregator, site jobs, attack); nothing below imports this package.
"""
