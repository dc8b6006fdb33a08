"""kdlib: an offline teacher-logit cache for knowledge distillation.

A precompute stage runs the teacher once over seeded views and stores its soft labels;
the student trainer replays the identical views from the store, with no teacher in memory.
See DESIGN.md for the words (source, recipe, group, view, plan, render, soft label, store).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
