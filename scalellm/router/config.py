"""Router configuration: one dataclass, filled from the command line (``scalellm.router.__main__``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scalellm.triton.contract import FIELDS

POLICIES = ("least-tokens", "prefix")
# max_tokens of a request that leaves it out: the ensemble's own default (the contract table owns it), so a
# request means the same through every door (capped by the model's context length in the OpenAI one).
DEFAULT_MAX_TOKENS: int = FIELDS["max_tokens"].default  # type: ignore[assignment]
DEFAULT_NUM_RETURN_SEQUENCES: int = FIELDS["num_return_sequences"].default  # type: ignore[assignment]
# OpenAI's default temperature; the Triton ensemble itself defaults to greedy.
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class ReplicaAddress:
    """Where one Triton replica listens: ``host:http_port:grpc_port``."""

    host: str
    http_port: int
    grpc_port: int

    @classmethod
    def parse(cls, text: str) -> ReplicaAddress:
        host, sep, ports = text.rpartition(":")
        host2, sep2, http = host.rpartition(":")
        if not sep or not sep2 or not host2 or not http.isdigit() or not ports.isdigit():
            raise ValueError(f"replica must be HOST:HTTP_PORT:GRPC_PORT (got {text!r})")
        return cls(host2, int(http), int(ports))

    @property
    def _netloc_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address found by DNS

    @property
    def http_url(self) -> str:
        return f"http://{self._netloc_host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self._netloc_host}:{self.grpc_port}"

    @property
    def name(self) -> str:
        return f"{self._netloc_host}:{self.http_port}"


@dataclass(frozen=True)
class RouterConfig:
    replicas: tuple[ReplicaAddress, ...] = ()
    # DNS names whose every address is a replica serving these ports (a Kubernetes headless Service), looked
    # up again every dns_interval_s: addresses that appear are added, ones that vanish leave the pool.
    replica_dns: tuple[ReplicaAddress, ...] = ()
    dns_interval_s: float = 5.0
    host: str = "127.0.0.1"
    http_port: int = 9000
    grpc_port: int = 9001  # 0: no gRPC front end
    policy: str = "least-tokens"
    # prefix policy (SGLang's cache-aware routing): follow the prefix when at least this share of the prompt
    # is cached on a replica and that replica's outstanding tokens exceed the least loaded one's by at most
    # balance_tokens; otherwise least outstanding tokens.
    prefix_match_ratio: float = 0.5
    prefix_balance_tokens: int = 4096
    prefix_chunk_chars: int = 32
    prefix_table_entries: int = 1 << 16  # remembered prefix chunks per replica (LRU)
    health_interval_s: float = 1.0
    connect_timeout_s: float = 5.0
    model_name: str = "ensemble"  # the Triton model the OpenAI front door calls
    cancel_model: str = "llm"  # the engine model: accepts {cancel_request_id}, its max_num_seqs sizes the slots
    model_dir: Path | None = None  # engine + tokenizer for the OpenAI front door (chat template, usage)
    served_model_name: str | None = None  # the OpenAI "model"; default: the model dir's name
    api_key: str | None = None
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    # Overload (scalellm/router/slots.py): at most replica_slots requests in flight at a replica (0: its llm
    # model's max_num_seqs x instances, read from the replica; a model without that parameter: no limit); the
    # rest wait in a FIFO of at most queue_size for at most queue_timeout_s, then get 429/503 + Retry-After.
    replica_slots: int = 0
    queue_size: int = 1024
    queue_timeout_s: float = 30.0
    # Every request ends within request_timeout_s of its arrival: past it the router stops it in the engine.
    request_timeout_s: float = 600.0
    # A replica's "busy" / "shutting down" answer before the first response: tried again (another replica
    # first) up to max_attempts in all, backoff_s x backoff_multiplier^k (at most backoff_max_s, +-jitter).
    max_attempts: int = 5
    backoff_s: float = 0.05
    backoff_multiplier: float = 1.5
    backoff_max_s: float = 2.0
    backoff_jitter: float = 0.2

    def __post_init__(self) -> None:
        if not self.replicas and not self.replica_dns:
            raise ValueError("at least one --replica or --replica-dns is needed")
        if self.dns_interval_s <= 0:
            raise ValueError(f"dns_interval_s must be > 0 (got {self.dns_interval_s})")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)} (got {self.policy!r})")
        if not 0.0 <= self.prefix_match_ratio <= 1.0:
            raise ValueError(f"prefix_match_ratio must be in [0, 1] (got {self.prefix_match_ratio})")
        for name in ("replica_slots", "queue_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("queue_timeout_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (got {self.max_attempts})")
