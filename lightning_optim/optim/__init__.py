"""The algorithms: one module per optimizer family, each defining optimizer classes and nothing else.

Nothing is imported here and no module registers itself: the registry's entries (names, defaults, state
layouts, papers) are listed in :mod:`lightning_optim.builtins`. Shared pieces live beside the algorithms:
the elementwise base class and foreach buckets (``_elementwise``), low-precision state (``_low_precision``),
the hybrid matrix/AdamW base (``_hybrid``), sharded matrix handling (``_matrix_dist``), Newton-Schulz
(``newton_schulz``) and the schedule-free core (``_schedule_free``).
"""
