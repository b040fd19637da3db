"""Shared helper of the benchmark scripts: write one result file with the machine it was measured on."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """Return what a reader needs to compare figures across machines (and library versions already imported)."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    # Report versions only of libraries the benchmark itself imported: importing torch here would cost seconds.
    for name in ("numpy", "torch", "transformers", "vllm"):
        module = sys.modules.get(name)
        if module is not None:
            info[f"{name}_version"] = getattr(module, "__version__", "unknown")
    torch_module = sys.modules.get("torch")
    if torch_module is not None:
        info["torch_threads"] = torch_module.get_num_threads()
        if torch_module.cuda.is_available():
            info["gpu"] = torch_module.cuda.get_device_name(0)
    return info


def write_result(name: str, figures: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json with the figures, the machine info and a UTC timestamp; return its path."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a plain file stem such as 'dipo', got {name!r}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {
        "name": name,
        "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "figures": figures,
    }
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path
