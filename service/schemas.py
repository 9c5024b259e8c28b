"""Request and response bodies (pydantic), shown in the OpenAPI docs at /docs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class PredictJSON(BaseModel):
    """JSON form of /predict: one base64 image or several (data: URLs accepted)."""

    model_config = ConfigDict(extra="forbid")
    image: str | None = None
    images: list[str] | None = None
    top_k: int | None = Field(None, ge=1)


class Prediction(BaseModel):
    label: str
    index: int
    score: float


class ImageResult(BaseModel):
    top_k: list[Prediction]


class PredictResponse(BaseModel):
    task: str
    model_version: str
    predictions: list[ImageResult]


class TaskInfo(BaseModel):
    name: str
    labels: list[str]
    num_classes: int
    input: dict[str, Any]
    variants: dict[str, str]
    shared_segments: list[str]


class TaskList(BaseModel):
    bundle: str
    version: str
    plan: str
    tasks: list[TaskInfo]


# -- Open Inference Protocol v2 --------------------------------------------------------------


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None  # validated with numpy, not pydantic: large tensors stay fast


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


# -- admin (docs/server.md "Live reload") -------------------------------------------------------


class ReloadRequest(BaseModel):
    """Optional body of ``POST /admin/reload``; without it, the configured bundle is reloaded."""

    model_config = ConfigDict(extra="forbid")
    bundle: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="bundle directory, relative to the model directory (or absolute inside it)",
    )
    allow_remove: bool = Field(
        False,
        description="let the new version drop tasks served now (their requests then answer 404); without "
        "it such a reload is refused with 409",
    )


class ReloadResult(BaseModel):
    bundle: str
    version: str
    previous_version: str
    path: str
    verify_s: float = Field(description="manifest, sha256 and shape checks")
    warmup_s: float = Field(description="onnxruntime sessions created and every variant warmed up")
    drain_s: float = Field(description="the old version finishing the requests admitted to it, then closed")
    total_s: float


class AdminModel(BaseModel):
    bundle: str
    version: str
    path: str
    model_dir: str
    tasks: list[str]
    providers: list[str]
    loaded_at: str | None
    reloads: int
    reload_in_progress: bool
