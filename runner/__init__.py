"""The `dipo` command and its tooling: launcher and supervisor, live panel, run report, chaos runner, experiments.

A client of the services: it starts them as processes and reads what they publish (Redis, the run folder); it never
imports the learner, rollout server or reward service.
"""
