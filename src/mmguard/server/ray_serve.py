"""The moderation server on Ray Serve: ``create_app`` unchanged as a Serve ingress, N replicas behind one
HTTP endpoint (each replica loads its own guard and runs its own batcher).

``serve run mmguard.server.ray_serve:build_app model=meta-llama/Llama-Guard-3-11B-Vision num_gpus=1``, a
``serve deploy`` config whose ``import_path`` is ``mmguard.server.ray_serve:build_app`` (see
docs/scale-out.md for a KubeRay RayService), or ``mmguard serve --engine ray --replicas N`` on one machine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from ray import serve

from .settings import ServerSettings

__all__ = ["GuardIngress", "build_app", "guard_application", "run_on_ray"]

log = logging.getLogger("mmguard.server.ray")


@serve.ingress()  # late-bound: the app needs the guard, which each replica loads in __init__
class GuardIngress:
    """One Serve replica: a guard and the FastAPI app of ``mmguard serve`` around it."""

    def __init__(self, guard_args: dict[str, Any], settings: ServerSettings) -> None:
        from ..guard import Guard
        from .app import create_app

        args = dict(guard_args)
        model = args.pop("model", None)
        guard = Guard.from_pretrained(Path(model) if model and Path(model).exists() else model, **args)
        self._app = create_app(guard, settings)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


def guard_application(
    guard_args: Mapping[str, Any],
    settings: ServerSettings,
    *,
    num_replicas: int | str = 1,
    autoscaling: Mapping[str, Any] | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    max_ongoing_requests: int = 64,
) -> Any:
    """A Serve application of ``GuardIngress`` replicas.

    ``guard_args``: ``Guard.from_pretrained`` keywords plus ``model``. ``num_replicas`` a number or
    ``"auto"`` with ``autoscaling`` (Serve's autoscaling_config: min_replicas, max_replicas,
    target_ongoing_requests, ...). ``max_ongoing_requests`` per replica must exceed the batch size, or
    Serve never lets a batch fill (its default is 5).
    """
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": max_ongoing_requests,
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 20,
    }
    if autoscaling:
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = num_replicas
    deployment = serve.deployment(GuardIngress, name="mmguard").options(**options)
    return deployment.bind(dict(guard_args), settings)


_GUARD_KEYS = ("model", "device", "dtype", "policy", "threshold", "fast", "batch_size", "prompt_format", "read_text",
               "ocr_timeout_s", "max_prompt_tokens", "prefix_cache", "prefix_cache_tokens")
_SETTING_TYPES = {f.name: f.type for f in fields(ServerSettings)}


def _value(raw: Any) -> Any:
    """``serve run`` passes ``key=value`` as strings; a deploy config passes typed YAML values."""
    if not isinstance(raw, str):
        return raw
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def build_app(args: dict[str, Any]) -> Any:
    """The application builder for ``serve run`` and ``serve deploy``.

    ``import_path: mmguard.server.ray_serve:build_app`` in a Serve config.

    Arguments: ``model``, ``device``, ``dtype``, ``policy``, ``threshold``, ``fast``, ``batch_size``,
    ``prompt_format``, ``read_text``, ``ocr_timeout_s``, ``max_prompt_tokens``, ``prefix_cache``,
    ``prefix_cache_tokens`` (the guard); ``num_replicas`` (default 1), or ``min_replicas`` / ``max_replicas`` /
    ``target_ongoing_requests`` (autoscaling); ``num_gpus`` (default 1 when ``device`` is ``cuda``: one GPU
    per replica; else 0), ``num_cpus``, ``max_ongoing_requests``;
    every ``ServerSettings`` field (``model_id``, ``max_batch_size``, ``api_keys`` as ``k1,k2`` ...).
    ``api_keys`` default to ``MMGUARD_API_KEYS`` (comma-separated) of the builder's environment.
    """
    a = {k: _value(v) for k, v in dict(args).items()}
    guard_args = {k: a.pop(k) for k in _GUARD_KEYS if k in a}
    guard_args.setdefault("device", "auto")
    replicas = a.pop("num_replicas", 1)
    autoscaling = {k: a.pop(k) for k in ("min_replicas", "max_replicas", "target_ongoing_requests",
                                         "initial_replicas", "upscale_delay_s", "downscale_delay_s") if k in a}
    num_gpus = float(a.pop("num_gpus", 1.0 if str(guard_args["device"]).startswith("cuda") else 0.0))
    num_cpus = float(a.pop("num_cpus", 1.0))
    ongoing = int(a.pop("max_ongoing_requests", 64))
    settings_args: dict[str, Any] = {}
    for key, value in a.items():
        if key not in _SETTING_TYPES:
            raise ValueError(f"unknown argument {key!r} for mmguard's Serve application")
        if key in ("api_keys", "shield_ids", "remote_image_hosts") and isinstance(value, str):
            value = tuple(x.strip() for x in value.split(",") if x.strip())
        settings_args[key] = tuple(value) if isinstance(value, list) else value
    env_keys = tuple(k.strip() for k in os.environ.get("MMGUARD_API_KEYS", "").split(",") if k.strip())
    if env_keys and "api_keys" not in settings_args:  # keys from a secret, not from the config text
        settings_args["api_keys"] = env_keys
    if num_gpus == 0 and "torch_threads" not in settings_args:
        settings_args["torch_threads"] = max(1, int(num_cpus))  # replicas share the node's cores
    settings = ServerSettings(**settings_args)
    if "min_replicas" in autoscaling or "max_replicas" in autoscaling:
        return guard_application(guard_args, settings, autoscaling=autoscaling, num_cpus=num_cpus,
                                 num_gpus=num_gpus, max_ongoing_requests=ongoing)
    return guard_application(guard_args, settings, num_replicas=int(replicas), num_cpus=num_cpus,
                             num_gpus=num_gpus, max_ongoing_requests=ongoing)


def run_on_ray(guard_args: Mapping[str, Any], settings: ServerSettings, *, host: str, port: int, replicas: int,
               ray_address: str | None = None, num_gpus: float = 0.0, num_cpus: float | None = None,
               stop: threading.Event | None = None) -> None:
    """``mmguard serve --engine ray``: start (or join) Ray, serve ``replicas`` replicas on host:port until
    interrupted (or ``stop`` is set), then shut Serve down."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, logging_level=logging.WARNING)
    if num_cpus is None:
        # fractional CPUs: Serve's controller and proxy need some of a small machine too
        total = float(ray.cluster_resources().get("CPU", 1.0))
        num_cpus = 1.0 if num_gpus else max(0.1, min(1.0, (total - 0.5) / max(1, replicas)))
    serve.start(http_options={"host": host, "port": port})
    app = guard_application(guard_args, settings, num_replicas=replicas, num_cpus=num_cpus, num_gpus=num_gpus)
    serve.run(app, name="mmguard", route_prefix="/", blocking=False)
    log.info("serving on http://%s:%d with %d replica(s)", host, port, replicas)
    stop = stop or threading.Event()
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
