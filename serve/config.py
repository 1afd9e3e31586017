"""The ``serve`` configuration section (YAML key ``serve``, variables ``REFLADE_SERVE_<FIELD>``): flat fields, as Ray
Serve's deployment options take them. Where the service listens is the ``stack`` section's (``host``,
``serve_port``), so that `reflade up` checks the port with the others. Imports neither Ray nor FastAPI (the loader imports every section at each
``reflade`` invocation)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["APP_NAME", "ServeConfig"]

APP_NAME = "reflade"
"""The Serve application's name on the cluster."""


@dataclass(kw_only=True)
class ServeConfig:
    """Settings of the decomposition service."""

    model: str = "model/reflayer@production"
    """Default model reference of a request that names none (an alias is re-resolved every ``alias_refresh_s``)."""
    min_replicas: int = 1
    """Fewest decomposer replicas (autoscaling)."""
    max_replicas: int = 2
    """Most decomposer replicas (autoscaling)."""
    target_ongoing_requests: float = 2.0
    """Requests in flight per replica the autoscaler aims at."""
    upscale_delay_s: float = 5.0
    """How long the load must stay high before a replica is added."""
    downscale_delay_s: float = 30.0
    """How long the load must stay low before a replica is removed."""
    max_ongoing_requests: int = 8
    """Requests a decomposer replica takes at once (more wait in the queue)."""
    max_queued_requests: int = 16
    """Requests waiting for a replica; beyond this the service answers 503 with Retry-After."""
    ingress_max_ongoing_requests: int = 256
    """Requests the ingress replica holds at once (each waits on the decomposer; as many again may wait for the
    ingress, then Serve's proxy answers 503). Keep it above the decomposers' ongoing + queued requests, so that
    overload is answered by their bounded queue (503 with Retry-After) and never waits without bound."""
    look_back_period_s: float = 30.0
    """Window over which the autoscaler averages ongoing requests (Ray Serve's default; shorter reacts faster)."""
    replica_retries: int = 2
    """Times the ingress sends a request again when its decomposer replica is lost mid-request (then 503)."""
    max_batch_size: int = 4
    """Requests one batched model call takes (they share steps and guidance; any image sizes)."""
    batch_wait_timeout_s: float = 0.02
    """How long a batch waits to fill up."""
    max_models_per_replica: int = 3
    """Model versions a replica keeps loaded side by side (least recently used goes first)."""
    alias_refresh_s: float = 5.0
    """Seconds an alias (``@production``) stays resolved before it is read again."""
    steps: int = 20
    """Default sampling steps."""
    max_steps: int = 100
    """Most sampling steps a request may ask for."""
    max_upload_mb: float = 20.0
    """Largest upload, MiB (refused before decoding)."""
    max_pixels: int = 40_000_000
    """Largest image area, pixels (refused from the header, before decoding)."""
    max_prompts: int = 16
    """Most prompts in one request."""
    max_text: int = 300
    """Longest prompt text, characters."""
    num_cpus: float = 1.0
    """CPUs per decomposer replica."""
    num_gpus: float = 0.0
    """GPUs per decomposer replica (the models run on ``cuda`` when > 0)."""
    bf16: bool = True
    """On a GPU (``num_gpus`` > 0), cast the models' weights to bfloat16 when a replica loads them (float32 on a
    CPU either way)."""
    require_token: bool = True
    """Refuse requests without a valid bearer token (health endpoints stay open); tokens are made with
    ``reflade serve token create``, which stores only their hashes, in the bucket."""
    cors_origins: list[str] = field(default_factory=list)
    """Origins allowed by CORS (empty: none; the pages are served from the same origin)."""

    def validate(self) -> None:
        """Check every field (the configuration loader calls this).

        Raises:
            ConfigError: a value out of range, named with its key.
        """
        from reflade.platform.config import ConfigError

        for name in (
            "min_replicas",
            "max_replicas",
            "max_ongoing_requests",
            "max_batch_size",
            "steps",
            "max_prompts",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name} must be at least 1, got {getattr(self, name)}")
        if self.min_replicas > self.max_replicas:
            raise ConfigError(
                f"serve.min_replicas {self.min_replicas} exceeds serve.max_replicas {self.max_replicas}"
            )
        if self.ingress_max_ongoing_requests < 1:
            raise ConfigError(
                f"serve.ingress_max_ongoing_requests must be >= 1, got {self.ingress_max_ongoing_requests}"
            )
        if not self.look_back_period_s > 0:
            raise ConfigError(f"serve.look_back_period_s must be > 0, got {self.look_back_period_s}")
        if self.replica_retries < 0:
            raise ConfigError(f"serve.replica_retries must be >= 0, got {self.replica_retries}")
        if self.max_queued_requests < 0 or self.max_upload_mb <= 0 or self.max_pixels < 1:
            raise ConfigError("serve.max_queued_requests must be >= 0, max_upload_mb and max_pixels > 0")
        if self.steps > self.max_steps:
            raise ConfigError(f"serve.steps {self.steps} exceeds serve.max_steps {self.max_steps}")
