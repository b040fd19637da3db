"""Prometheus metrics: one registry per component, served on ``/metrics``.

Metric names follow ``dipo_<component>_<what>_<unit>``. A component builds its metrics on its own
``CollectorRegistry`` so that two components in one process (tests, the launcher) never collide.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app
from prometheus_client.registry import Collector

__all__ = ["ComponentMetrics", "metrics_asgi_app"]


class ComponentMetrics:
    """Factory of metrics named ``dipo_<component>_...`` on the component's own registry."""

    def __init__(self, component: str, registry: CollectorRegistry | None = None) -> None:
        if not component.isidentifier():
            raise ValueError(f"component name {component!r} must be a Python identifier (it becomes a metric prefix)")
        self.component = component
        self.registry = registry or CollectorRegistry()

    def _name(self, what: str) -> str:
        return f"dipo_{self.component}_{what}"

    def counter(self, what: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        """A counter ``dipo_<component>_<what>`` (prometheus adds ``_total``)."""
        return Counter(self._name(what), doc, labelnames=labels, registry=self.registry)

    def gauge(self, what: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        """A gauge ``dipo_<component>_<what>``."""
        return Gauge(self._name(what), doc, labelnames=labels, registry=self.registry)

    def histogram(
        self, what: str, doc: str, labels: Sequence[str] = (), buckets: Sequence[float] | None = None
    ) -> Histogram:
        """A histogram ``dipo_<component>_<what>``."""
        if buckets is None:
            return Histogram(self._name(what), doc, labelnames=labels, registry=self.registry)
        return Histogram(self._name(what), doc, labelnames=labels, registry=self.registry, buckets=tuple(buckets))

    def register(self, collector: Collector) -> None:
        """Add a custom collector to this component's registry."""
        self.registry.register(collector)


def metrics_asgi_app(metrics: ComponentMetrics):  # noqa: ANN201 - prometheus' ASGI app type is untyped
    """An ASGI app serving the component's registry; mount it at ``/metrics``."""
    return make_asgi_app(registry=metrics.registry)
