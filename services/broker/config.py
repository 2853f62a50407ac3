"""`loraloop broker` settings."""

from __future__ import annotations

from pydantic import Field

from services.common.config import AuthConfig, RedisConfig, Section, ServerConfig, TLSConfig


class RegistryConfig(Section):
    max_adapter_bytes: int = Field(256 * 1024 * 1024, ge=1)
    """Largest adapter_model.safetensors accepted (bytes); larger uploads get RESOURCE_EXHAUSTED."""
    keep_last: int = Field(10, ge=1)
    """Retention: versions kept per adapter name, plus every pinned one."""
    chunk_bytes: int = Field(256 * 1024, ge=4096, le=8 * 1024 * 1024)
    """Default chunk size for fetch streams (256 KiB measured fastest for 1 MB adapters, no worse for 150 MB)."""
    staging_ttl_s: int = Field(600, ge=10)
    """An upload that stops sending for this long expires (its bytes are dropped)."""
    max_concurrent_uploads: int = Field(16, ge=1)
    """Uploads in progress at once; more get RESOURCE_EXHAUSTED (backpressure)."""
    publish_id_ttl_s: int = Field(86400, ge=60)
    """How long publish ids are remembered after a name's last publish, so a retried publish is
    not committed twice."""
    publish_ids_kept: int = Field(100, ge=1)
    """Publish ids remembered per name (the newest). A publisher retries only the publish it has
    in flight, so a handful would do; what Redis holds for them stays bounded (~60 B each)."""
    relay_max_bytes: int = Field(64 * 1024 * 1024, ge=0)
    """Uploads up to this size are relayed to followers that ask (WatchRequest.include_staged)
    as their bytes arrive, so rollout servers load a version while its commit is made durable;
    each relayed upload holds a second copy of its bytes in the broker's memory until it ends.
    0 = off."""
    relay_grace_s: float = Field(10.0, ge=0)
    """How long an ended relayed upload stays fetchable (FetchStaged), for followers that ask
    late; at most relay_max_bytes of them are kept."""
    events_maxlen: int = Field(100, ge=1)
    """Events kept per adapter name (exactly; ~700 B each). Watch replays from them, and a
    watcher further behind is sent the live versions past its cursor from the version set
    instead (versions retired in between are skipped: they cannot be fetched any more). Keeps
    what Redis holds independent of the number of publishes."""


class BrokerConfig(Section):
    server: ServerConfig = ServerConfig(port=50050)
    """gRPC listener."""
    redis: RedisConfig = RedisConfig()
    """Redis holding versions, events and adapter bytes."""
    registry: RegistryConfig = RegistryConfig()
    """Limits and retention."""
    auth: AuthConfig = AuthConfig()
    """Bearer-token auth."""
    tls: TLSConfig = TLSConfig()
    """Optional TLS."""
    log_level: str = "INFO"
    """Python logging level."""


ALIASES = {"port": "server.port", "host": "server.host", "redis-url": "redis.url"}
