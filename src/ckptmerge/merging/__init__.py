"""The offline merge: discovery of a run, window selection, schedules (coefficients), recipes, the plan
(validation), the streaming engine, the in-memory merge and the manifest.

May import ``io``, ``data``, ``errors`` and ``console``.
"""
