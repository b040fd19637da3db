"""Torch code shared by the learner and the rollout server only (model loading, weight-sync wire format).

Nothing is imported here on purpose: importing a submodule must not pull in transformers unless it needs it.
"""
