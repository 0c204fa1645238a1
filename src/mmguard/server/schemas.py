"""Request and response models (they also make the OpenAPI document at ``/docs``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictStr

__all__ = [
    "ClassifyRequest",
    "ClassifyResponse",
    "ErrorResponse",
    "ModerationRequest",
    "ModerationResponse",
    "Readiness",
    "RunShieldRequest",
    "RunShieldResponse",
    "Shield",
    "ShieldList",
]


class TextInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: StrictStr = Field(description="A data URL (data:image/png;base64,...); http(s) only when enabled")


class ImageURLInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


MultiModalInput = Annotated[TextInput | ImageURLInput, Field(discriminator="type")]


class ModerationRequest(BaseModel):
    """OpenAI's ``POST /v1/moderations`` body; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    input: StrictStr | list[StrictStr] | list[MultiModalInput] = Field(
        description="A string, a list of strings (one result each), "
        "or a list of text/image_url parts (one result)"
    )
    model: StrictStr | None = Field(
        None, description="Accepted and ignored; the response names the served model"
    )
    category_names: Literal["codes", "openai"] | None = Field(
        None, description="mmguard extension: S-codes (default) or OpenAI category names"
    )


class ModerationResult(BaseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text", "image"]]]


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorObject


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Any] = Field(
        description="Chat messages: user and assistant/agent turns, at most one image"
    )
    role: Literal["user", "agent", "assistant"] | None = Field(
        None,
        description="The role judged (default: the last message's); 'user' on a conversation ending with "
        "the agent judges the last user turn",
    )
    policy: dict[str, Any] | Literal["default"] | None = Field(
        None, description="A policy ({'categories': [...]} as in mmguard.policy) for this request only"
    )
    exclude: list[StrictStr] = Field(
        default_factory=list, description="Category codes left out of the prompt"
    )
    threshold: StrictFloat | None = Field(  # strict: JSON true is not the number 1
        None, ge=0.0, le=1.0, description="Decision threshold for this request"
    )
    category_scores: Literal["unsafe", "always"] | None = Field(
        None, description="Compute per-category probabilities for unsafe verdicts only, or always"
    )


class ClassifyResponse(BaseModel):
    id: str
    model: str
    policy: dict[str, Any]
    verdict: dict[str, Any]
    fail_closed: bool = False
    # the served weights and settings, hashed (as OpenAI's chat completions say it): equal fingerprints, equal
    # verdicts for the same input (mmguard.server.state.served_fingerprint)
    system_fingerprint: str | None = None


class RunShieldRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    shield_id: StrictStr = Field(min_length=1)
    messages: list[Any]
    params: dict[str, Any] | None = None


class SafetyViolation(BaseModel):
    violation_level: Literal["info", "warn", "error"]
    user_message: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class RunShieldResponse(BaseModel):
    violation: SafetyViolation | None = None


class Shield(BaseModel):
    identifier: str
    provider_resource_id: str | None
    provider_id: str
    type: Literal["shield"] = "shield"
    params: dict[str, Any] | None = None


class ShieldList(BaseModel):
    data: list[Shield]


class Readiness(BaseModel):
    status: Literal["ready", "loading", "not_ready"]
    queue_depth: int
    max_queue: int
