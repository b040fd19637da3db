"""Verifiers: one module per task kind, each returning a :class:`~reward_service.verifiers.base.VerifyResult`."""
