"""The extension tables: every name resolves to an implementation of its interface, and nothing else is accepted."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, get_args

import pytest

from services.config import RunConfig
from services.extensions import BACKENDS, LOSSES, VERIFIERS, BackendKind, LossName, TaskKind, UnknownExtension, load

TABLES = {"verifier": (VERIFIERS, TaskKind), "backend": (BACKENDS, BackendKind), "loss": (LOSSES, LossName)}


@pytest.mark.parametrize("what", TABLES)
def test_the_literal_and_the_table_name_the_same_implementations(what: str) -> None:
    table, literal = TABLES[what]
    assert tuple(table) == get_args(literal)


def test_every_verifier_and_loss_implements_its_interface() -> None:
    from learner.losses import Loss
    from reward_service.verifiers.base import Verifier

    for path in VERIFIERS.values():
        assert issubclass(load(path), Verifier), path
    for path in LOSSES.values():
        assert issubclass(load(path), Loss), path


def test_the_hf_backend_implements_the_backend_interface() -> None:
    from rollout_server.backends import backend_class
    from rollout_server.backends.base import Backend

    assert issubclass(backend_class("hf"), Backend)


@pytest.mark.parametrize(("section", "field", "name"), [("data", "task_kind", "poetry"), ("rollout", "backend", "tgi"),
                                                        ("learner", "loss", "ppo2")])  # fmt: skip
def test_config_refuses_names_no_table_lists(section: str, field: str, name: str) -> None:
    with pytest.raises(ValueError, match=field):
        RunConfig.model_validate({section: {field: name}})


def test_unknown_names_are_clear_errors() -> None:
    from learner.losses import build_loss
    from reward_service.verifiers import verifier_class
    from rollout_server.backends import backend_class

    for call in (lambda: verifier_class("poetry"), lambda: backend_class("tgi")):
        with pytest.raises(UnknownExtension, match="choose one of"):
            call()
    cfg: Any = RunConfig().learner.model_copy()
    object.__setattr__(cfg, "loss", "ppo2")  # past the config's own check, as a stale pickled config might be
    with pytest.raises(UnknownExtension, match="unknown loss 'ppo2'"):
        build_loss(cfg)


def test_load_needs_module_and_attribute() -> None:
    with pytest.raises(ValueError, match="module:attribute"):
        load("learner.losses")
    with pytest.raises(ImportError, match="has no Nope"):
        load("learner.losses:Nope")


def test_the_kernel_imports_no_torch_and_no_service_package() -> None:
    code = (
        "import sys, services.config, services.protocol, services.streams, services.contracts, services.extensions, "
        "services.api_models, services.bfcl, services.http, services.ledger, services.stream_upkeep; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'vllm', 'transformers', 'learner', 'rollout_server', 'reward_service', 'runner', 'evaluation')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
