"""Runtime configuration: pydantic settings read from keyword arguments and `BLOCKPRESS_*` variables.

Every default works on one machine: the gateway listens on 127.0.0.1:50051, Redis is local, and `serve`
starts its own redis-server and Ray when no Redis URL or Ray address is given. Flags on the CLI become
keyword arguments here, so flags win over the environment, which wins over the defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from blockpress.runtime.contracts.errors import ConfigurationError

__all__ = ["DEFAULT_ADDRESS", "DEFAULT_HTTP_PORT", "DEFAULT_REDIS_URL", "NodeKind", "RuntimeSettings", "model_name"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_HTTP_PORT = 8000
"""The HTTP API's port in `blockpress serve` and `gateway` unless told otherwise, as vLLM's."""
# The tiny checkpoint the project trains and ships, so that `blockpress serve` works from a fresh clone.


def model_name(path_or_id: str) -> str:
    """The name a model is served under: a directory's last part, or the hub id as given.

    The same rule as `DiffusionEngine.from_pretrained`, so the gateway and the replicas agree on the
    queue a job goes to.
    """
    path = Path(path_or_id).expanduser()
    return path.name if path.is_dir() else path_or_id


def _split(value: Any) -> Any:
    # Environment variables hold lists as "a,b"; keyword arguments arrive as sequences already.
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class NodeKind(BaseModel):
    """Engine options of the replicas that land on one kind of node (a Ray node label `node-kind`).

    A field left None keeps the replica's own option (`RuntimeSettings.device`, `dtype`), so an entry
    names only what differs on that kind of node.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str | None = None
    """Device of the engine on this kind (cpu, cuda); None: `RuntimeSettings.device`."""
    dtype: str | None = None
    """Compute dtype on this kind (bfloat16, float16, float32); None: `RuntimeSettings.dtype`."""
    quantization: Literal["nf4", "fp8"] | None = None
    """Packed weights on this kind: nf4 where memory bandwidth is scarce (DGX Spark's GB10 at ~273 GB/s
    reads a quarter of the bytes), fp8 on RTX PRO 6000; None keeps the weights in `dtype`."""


class RuntimeSettings(BaseSettings):
    """Settings of the gateway, the replicas and the embedded runtime."""

    model_config = SettingsConfigDict(env_prefix="BLOCKPRESS_", frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    """Interface the gateway listens on; 0.0.0.0 in a container."""
    port: int = Field(default=50051, ge=0, le=65535)
    """Port the gateway listens on; 0 picks a free one (tests)."""
    redis_url: str | None = None
    """Redis holding queues and job records; None: `serve` starts its own, other commands use localhost."""
    ray_address: str | None = None
    """Ray cluster to join (`auto`, `ray://...`); None: `serve` and `replicas` start a local Ray."""
    models: Annotated[tuple[str, ...], NoDecode] = ()
    """Checkpoint directories or hub ids to serve (comma-separated); empty: the shipped tiny model."""
    replicas: int = Field(default=1, ge=0, le=1024)
    """Replicas per model started by `serve` and `replicas`."""
    device: str = "auto"
    """Device of each replica's engine: auto (CUDA when present), cpu, cuda."""
    dtype: str = "auto"
    """Weight dtype of each replica's engine: auto, float32, bfloat16, float16."""
    quantization: Literal["nf4", "fp8"] | None = None
    """Packed weights of every replica: nf4 (bitsandbytes' 4-bit NormalFloat) or fp8 (float8_e4m3 with a
    scale per output channel), quantized layer by layer as the checkpoint loads; a node kind's own
    `quantization` wins on its nodes. None keeps the weights in `dtype`."""
    data_dir: Path = Path(".data")
    """Where `serve` keeps its redis-server's append-only file and built checkpoints."""
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    """Accepted API keys (comma-separated); empty: no authentication. Never logged."""
    max_queue: int = Field(default=1024, ge=1)
    """Jobs that may wait per model; past it, submits get RESOURCE_EXHAUSTED with a retry hint."""
    max_streams_per_client: int = Field(default=256, ge=1)
    """Open `Generate`/`Watch` streams one client (API key, else peer address) may hold; past it a new
    stream gets RESOURCE_EXHAUSTED, so one client cannot take every stream the gateway holds."""
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest request message gRPC reads (its own RESOURCE_EXHAUSTED past it); above what the
    character limits allow, so that an oversized prompt gets INVALID_ARGUMENT naming the field."""
    max_prompt_chars: int = Field(default=1_000_000, ge=1)
    """Longest prompt or message content in characters, checked before tokenizing."""
    max_messages: int = Field(default=512, ge=1)
    """Most chat messages in one request."""
    max_tools: int = Field(default=128, ge=0)
    """Most tool definitions in one request."""
    max_images: int = Field(default=8, ge=0)
    """Most images in one request's messages (PNG, JPEG or WebP); 0 refuses images."""
    max_image_bytes: int = Field(default=5 * 1024 * 1024, ge=1)
    """Largest encoded image in bytes (Anthropic's limit per image)."""
    max_images_bytes: int = Field(default=12 * 1024 * 1024, ge=1)
    """Largest total of one request's encoded images in bytes: under `max_request_bytes`, so that an
    HTTP body carrying them as base64 (4/3 of their size) still fits it."""
    max_image_pixels: int = Field(default=32_000_000, ge=1)
    """Largest image in pixels (width times height), checked from its header before it is decoded."""
    lease_s: float = Field(default=30.0, gt=0)
    """Seconds a running job stays with its replica without a heartbeat before another may take it."""
    max_deliveries: int = Field(default=3, ge=1)
    """Deliveries of one job before it ends DEAD_LETTERED (a job that crashes its replica every time)."""
    tls_cert_file: Path | None = None
    """PEM certificate chain the gateway's gRPC port serves TLS with; set with `tls_key_file`, or
    neither for plaintext (behind a TLS-terminating proxy, or on loopback)."""
    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`; set both or neither."""
    reflection: bool = True
    """Serve gRPC server reflection, so grpcurl works without the .proto files."""
    drain_s: float = Field(default=20.0, ge=0)
    """On SIGTERM: seconds open calls may still run; inside Kubernetes' default 30 s grace period."""
    health_interval_s: float = Field(default=1.0, gt=0)
    """How often the gateway re-checks Redis and the replicas' heartbeats for its health status."""
    agent_http_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    """Host names the `http_get` agent tool may fetch from (comma-separated, exact names); empty: the
    tool is off, and a task naming it is refused with INVALID_ARGUMENT."""
    agent_default_max_turns: int = Field(default=8, ge=1, le=256)
    """Turns an agent task gets when it sets no `max_turns` of its own."""
    replica_max_sessions: int = Field(default=8, ge=0)
    """Client sessions (engine KV caches for a `session_id`) each replica keeps, least recently used
    dropped first; 0 keeps none, so every turn prefills its whole prompt."""
    replica_torch_threads: int | None = Field(default=None, ge=1, le=1024)
    """Intra-op threads of each CPU replica's torch; None leaves torch's default (every core). Set it
    to cores / replicas when several CPU replicas share a machine, so they do not fight for cores."""
    agent_pin: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """Text pinned at the start of agent turns, as `module:function` returning a TemplatePolicy (e.g.
    `blockpress.workers.agent_model:pin_tool_call_skeleton`); None pins nothing."""
    replica_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port each replica serves Prometheus `/metrics` on; 0 picks a free port per replica (several on one
    machine); None (default) serves none."""
    gateway_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port the gateway serves Prometheus `/metrics` on (queue depth, oldest wait, live replicas: what an
    autoscaler reads); None (default) serves none."""
    http_port: int | None = Field(default=None, ge=0, le=65535)
    """Port of the gateway's HTTP API (OpenAI `/v1/chat/completions`, Anthropic `/v1/messages`) on
    `host`; 0 picks a free one (tests); None serves none. `blockpress serve` and `gateway` default to
    `DEFAULT_HTTP_PORT` when neither the flag nor `BLOCKPRESS_HTTP_PORT` is given (`off` turns it off)."""
    trace_retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    """Seconds the trace store keeps a job's spans after its last span ended (for `GetTrace`)."""
    log_level: str = "INFO"
    """Log level of the CLI's processes."""
    node_kinds: dict[str, NodeKind] = Field(default_factory=dict)
    """Engine options per node kind, the one place they live, as JSON in the environment
    (`{"dgx-spark": {"quantization": "nf4"}, "rtx-pro": {"quantization": "fp8"}}`). Each replica applies
    the entry of the node it lands on, read from the node's Ray label `node-kind`, so a replica that Ray
    restarts on another kind of node runs with that node's options. Empty: every replica uses
    `device` and `dtype`."""
    placement: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    """Node kinds each model's replicas may run on, by model name (`*`: models not named), as JSON
    (`{"*": ["rtx-pro", "dgx-spark"]}`); replicas ask Ray for a node with one of these `node-kind`
    labels and wait (the KubeRay autoscaler adds such a node) until one has room. A model with no
    entry runs on any node."""
    replica_num_gpus: float | None = Field(default=None, ge=0)
    """GPUs each replica asks Ray for; None: 1 when `device` is not cpu and the cluster has a GPU at
    start (one machine). Set 1 on KubeRay, where GPU nodes appear only once a replica waits for one."""
    min_replicas: int | None = Field(default=None, ge=0, le=1024)
    """Fewest replicas per model when autoscaling; None: `replicas`."""
    max_replicas: int | None = Field(default=None, ge=1, le=1024)
    """Most replicas per model; setting it turns on autoscaling on the queue between `min_replicas`
    and this. None: a fixed `replicas` per model."""
    scale_jobs_per_replica: float = Field(default=2.0, gt=0)
    """Queued jobs per replica the autoscaler tolerates; more waiting adds replicas."""
    scale_max_wait_s: float = Field(default=5.0, gt=0)
    """Wait of the oldest queued job past which the autoscaler adds a replica, however short the queue."""
    scale_down_idle_s: float = Field(default=60.0, ge=0)
    """Seconds a model's queue must stay empty before the autoscaler drains one replica."""
    scale_interval_s: float = Field(default=2.0, gt=0)
    """Seconds between the autoscaler's looks at the queues."""
    pool_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Port the `replicas` command serves Prometheus `/metrics` on (the autoscaler's inputs and
    decisions); None (default) serves none."""

    @field_validator("http_port", mode="before")
    @classmethod
    def _off(cls, value: Any) -> Any:
        # BLOCKPRESS_HTTP_PORT=off (or empty) turns the HTTP API off in the commands that default it on.
        return None if isinstance(value, str) and value.strip().lower() in ("", "off", "none") else value

    @field_validator("models", "agent_http_allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _no_blank_keys(cls, value: Any) -> Any:
        # A blank entry (" , ", "key,") is a typo, and dropping it could leave no key at all, which
        # turns authentication off without a word; only an empty or unset value means no keys.
        # ConfigurationError, not ValueError: pydantic would print the input, the other keys with it.
        if isinstance(value, str) and not value.strip():
            return ()
        parts = value.split(",") if isinstance(value, str) else value
        if any(not str(p.get_secret_value() if isinstance(p, SecretStr) else p).strip() for p in parts):
            raise ConfigurationError(
                "api_keys (BLOCKPRESS_API_KEYS): a key is blank; list keys separated by commas "
                "(key1,key2), or leave it unset or empty to run without authentication"
            )
        return tuple(p if isinstance(p, SecretStr) else str(p).strip() for p in parts)

    @model_validator(mode="after")
    def _tls_pair(self) -> RuntimeSettings:
        # One without the other would serve plaintext where the operator asked for TLS.
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigurationError(
                "tls_cert_file and tls_key_file (BLOCKPRESS_TLS_CERT_FILE, BLOCKPRESS_TLS_KEY_FILE): "
                "set both for TLS, or neither for plaintext"
            )
        return self

    def redis_url_or_default(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    def api_key_values(self) -> frozenset[str]:
        return frozenset(key.get_secret_value() for key in self.api_keys)
