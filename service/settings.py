"""Server settings: one typed object, read once at the edge (CLI flags or MTSERVE_* variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.host import available_cpus

MIN_TOKEN_CHARS = 16
AUTO_WORKERS_MAX = 8  # --workers auto: half the CPUs as API processes, at most this many (docs/server.md)


class Settings(BaseSettings):
    """Every field is also an environment variable: ``MTSERVE_<FIELD>`` (e.g. ``MTSERVE_MAX_WAIT_MS``)."""

    model_config = SettingsConfigDict(env_prefix="MTSERVE_", extra="ignore")

    bundle: Path = Field(description="bundle directory (manifest.json + segments/)")
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["cpu", "cuda"] = "cpu"
    device_id: int = Field(0, ge=0, description="CUDA device ordinal")
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads; 0 = CPUs available")
    max_batch_size: int = Field(32, ge=1, description="rows per batch through the model")
    max_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits to fill after its first row")
    queue_size: int = Field(1024, ge=1, description="rows admitted but not yet batched; beyond: 429")
    timeout_ms: float = Field(
        10_000, gt=0, description="deadline per request; past it: 504 (never computed if not started)"
    )
    max_inflight: int = Field(
        0,
        ge=0,
        description="inference requests admitted and not answered yet; beyond: 429 before the body is "
        "read; 0 = queue_size + 2 x max_batch_size (the queue, the batch computing and the next one)",
    )
    max_body_mb: float = Field(16.0, gt=0, description="request body limit; beyond: 413")
    max_images_per_request: int = Field(64, ge=1)
    max_pixels: int = Field(40_000_000, ge=1, description="decoded width*height per image; beyond: 413")
    top_k: int = Field(5, ge=1, description="default top_k of /predict")
    batching: Literal["cross-task", "per-task"] = Field(
        "cross-task", description="per-task: every batch holds one task (the per-model baseline)"
    )
    preprocess_workers: int = Field(0, ge=0, description="decode/preprocess threads; 0 = CPUs available")
    batch_buckets: str = Field(
        "auto",
        description="batch sizes every (segment, variant) call is padded to: auto (CUDA: powers of two up "
        "to max_batch_size; CPU: off), pow2, off, or a list such as 1,2,4,8,16,32",
    )
    cuda_graphs: Literal["on", "off"] = Field(
        "on", description="CUDA: replay one captured CUDA graph per (variant, bucket); needs batch buckets"
    )
    workers: int | Literal["auto"] = Field(
        "auto",
        description="API processes in front of one engine process (docs/server.md); 0 = everything in one "
        "process; auto = 0 on 2 CPUs or fewer (measured there: one process answers a lone request sooner "
        "and spends less CPU per request), else "
        "min(CPUs available // 2, 8)",
    )
    gil_switch_ms: float = Field(
        0.5,
        gt=0,
        le=100,
        description="the GIL switch interval (sys.setswitchinterval) of the process holding the engine: how "
        "long its event loop may keep the GIL while the engine's thread waits to start its next onnxruntime "
        "call; Python's default is 5",
    )
    rows_shm_mb: int = Field(
        32,
        ge=0,
        description="MiB of shared memory per API process for the rows it hands to the engine "
        "(service/row_arena.py); rows that do not fit travel on the socket; 0 = always the socket",
    )
    emulate_device_ms: float = Field(
        0.0, ge=0, description="benchmarks: the engine sleeps this long per batch instead of computing"
    )
    warmup: bool = True
    verify_sha256: bool = True
    model_dir: Path | None = Field(
        None, description="directory POST /admin/reload may load bundles from; default: the bundle's parent"
    )
    admin_token: SecretStr | None = Field(
        None, description="bearer token of the /admin routes; unset and no token file: no /admin routes"
    )
    admin_token_file: Path | None = Field(
        None, description="file holding the admin token (e.g. a Kubernetes secret), read once at start-up"
    )

    @model_validator(mode="after")
    def _admissible(self) -> Settings:
        if self.queue_size < self.max_images_per_request:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be >= max_images_per_request "
                f"({self.max_images_per_request}), or a full request could never be admitted"
            )
        return self

    @field_validator("workers")
    @classmethod
    def _workers(cls, v):
        if v != "auto" and not 0 <= v <= 64:
            raise ValueError("workers must be auto or 0 ... 64")
        return v

    @field_validator("batch_buckets")
    @classmethod
    def _buckets(cls, v: str) -> str:
        from service.buckets import check_spec

        return check_spec(v)

    @field_validator("model_dir", "admin_token", "admin_token_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        """``MTSERVE_ADMIN_TOKEN=`` (e.g. compose's ``${MTSERVE_ADMIN_TOKEN:-}``) means not set."""
        return None if v == "" else v

    @model_validator(mode="after")
    def _admin_token(self) -> Settings:
        """Read the token file once; refuse an ambiguous, empty or short token."""
        if self.admin_token_file is not None:
            if self.admin_token is not None:
                raise ValueError("set MTSERVE_ADMIN_TOKEN or MTSERVE_ADMIN_TOKEN_FILE, not both")
            try:
                text = self.admin_token_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"admin_token_file {self.admin_token_file}: unreadable ({exc})") from None
            self.admin_token = SecretStr(text.strip())
        if self.admin_token is not None:
            token = self.admin_token.get_secret_value()
            if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
                raise ValueError(
                    f"the admin token must be at least {MIN_TOKEN_CHARS} printable characters without "
                    "spaces (e.g. `openssl rand -hex 32`)"
                )
        return self

    def models_root(self) -> Path:
        """Where admin reloads may load from: ``model_dir``, else the directory holding the bundle."""
        return (self.model_dir or self.bundle.absolute().parent).resolve()

    def inflight_limit(self) -> int:
        return self.max_inflight or self.queue_size + 2 * self.max_batch_size

    def worker_count(self) -> int:
        """API processes to start (0: one process serves everything)."""
        if self.workers != "auto":
            return self.workers
        cpus = available_cpus()
        return 0 if cpus <= 2 else min(cpus // 2, AUTO_WORKERS_MAX)

    def intra_op_threads(self) -> int:
        return self.threads or available_cpus()

    def decode_workers(self) -> int:
        return self.preprocess_workers or available_cpus()

    def bucket_sizes(self) -> tuple[int, ...] | None:
        """The batch buckets on this device (None: no padding)."""
        from service.buckets import resolve

        return resolve(self.batch_buckets, self.max_batch_size, self.device)
