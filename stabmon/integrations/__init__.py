"""Adapters for trainers other than Lightning. Each module imports its framework itself, when
it is imported: ``import stabmon`` never pulls one in.

- ``stabmon.integrations.transformers.StabilityMonitorCallback``: the monitor as a
  ``transformers.TrainerCallback`` (``pip install stabmon[transformers]``).
"""
