"""The bundle contract shared by the trainer and the server (DESIGN.md §3).

Torch-free and HTTP-free: ``training/`` and ``service/`` both import it, it imports neither.

- :mod:`contract.manifest`   the manifest schema and its one reader (errors name file and field)
- :mod:`contract.bundle`     a bundle on disk: load and verify (sha256, shapes that chain)
- :mod:`contract.plan`       sharing plans, segments x variants, and ``group_rows``
- :mod:`contract.accounting` total vs task-specific parameters, bytes held vs N models
- :mod:`contract.images`     Pillow image -> 8-bit RGB, the one conversion of both sides
- :mod:`contract.errors`     error types (no HTTP: ``service/errors.py`` maps them to statuses)
- :mod:`contract.host`       host facts both sides read alike (CPUs available, INT8 CPU features)
"""
