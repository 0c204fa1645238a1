"""The guardrail proxy: ``mmguard proxy`` / :func:`create_proxy_app`.

An OpenAI-compatible ``/v1/chat/completions`` (streaming and not) in front of any OpenAI-compatible
server, with Llama Guard input and output rails (docs/proxy.md).
"""

from .app import create_proxy_app
from .settings import ProxySettings

__all__ = ["ProxySettings", "create_proxy_app"]
