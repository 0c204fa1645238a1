"""The moderation server: ``mmguard serve`` / :func:`create_app`.

OpenAI-compatible ``/v1/moderations``, the full verdict at ``/v1/guard/classify``, llama-stack's
``/v1/safety/run-shield`` and ``/v1/shields``, dynamic batching, health, readiness and Prometheus metrics.
"""

from .app import create_app
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
