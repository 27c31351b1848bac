"""Request and response models of the HTTP API (pydantic v2), and nothing else.

Every image endpoint takes the same body either as JSON (`image` = base64 or a `data:` URI) or as
multipart/form-data (`image` = the file, other fields as form fields; lists as repeated fields or one
JSON array). Boxes are `[x0, y0, x1, y1]` (x first) in pixels of the uploaded image as displayed,
i.e. after its EXIF orientation is applied. Each request model turns itself into the engine's
parameters: `task_fields()` (the task's record fields) and `options()` (GenerationConfig overrides).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

Box = list[float]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


Text = Annotated[str, AfterValidator(_not_blank)]


# ---------------------------------------------------------------------------------------------------
# Requests


class GenerationOptions(BaseModel):
    """Decoding overrides; unset fields keep the task's defaults (instructions/templates.json)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, description="tokens generated before eos is forced")
    beam_size: int | None = Field(None, ge=1, description="beams (or independent samples with do_sample)")
    do_sample: bool | None = Field(None, description="sample instead of beam search")
    temperature: float | None = Field(None, gt=0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, description="0 = off")
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, description="makes sampling reproducible")
    mean_image: bool | None = Field(
        None,
        description="image outputs: the pixel mean of the samples (least squared error, blurred where "
        "the model is unsure) instead of the best sample",
    )

    def options(self) -> dict[str, Any]:
        """GenerationConfig overrides that the client set."""
        return {k: v for k in GenerationOptions.model_fields if (v := getattr(self, k)) is not None}

    def task_fields(self) -> dict[str, Any]:
        return {}


class ImageRequest(GenerationOptions):
    image: str | None = Field(
        None,
        description="the image: base64 or a data: URI in JSON; a file field in multipart/form-data",
    )


class CaptionRequest(ImageRequest):
    """Describe the image."""


class VQARequest(ImageRequest):
    question: Text = Field(examples=["what color is the circle?"])
    candidates: list[str] | None = Field(
        None,
        description="closed answer set: decoding is constrained to these (trie)",
        examples=[["red", "blue"]],
    )

    def task_fields(self) -> dict[str, Any]:
        return {"question": self.question}


class GroundingRequest(ImageRequest):
    text: Text = Field(description="referring expression", examples=["the red circle"])

    def task_fields(self) -> dict[str, Any]:
        return {"text": self.text}


class GroundedCaptionRequest(ImageRequest):
    box: Box = Field(
        min_length=4,
        max_length=4,
        description="[x0, y0, x1, y1] in pixels of the uploaded image (after EXIF rotation), x first",
        examples=[[10.0, 20.0, 60.0, 80.0]],
    )

    def task_fields(self) -> dict[str, Any]:
        return {"box": self.box}


class ITMRequest(ImageRequest):
    text: Text = Field(description="does the image match this text?", examples=["a red circle"])

    def task_fields(self) -> dict[str, Any]:
        return {"text": self.text}


class DetectionRequest(ImageRequest):
    """List the objects in the image."""


class TextInfillingRequest(ImageRequest):
    text: Text = Field(
        description="text with one or more <mask> spans to fill in",
        examples=["a red <mask> on the left"],
    )

    @field_validator("text")
    @classmethod
    def _has_mask(cls, v: str) -> str:
        if "<mask>" not in v:
            raise ValueError("text must contain at least one <mask> to fill in")
        return v

    def task_fields(self) -> dict[str, Any]:
        return {"text": self.text, "masked_text": self.text}


class ImageInfillingRequest(ImageRequest):
    """Redraw the middle of the image (its centre is blanked and predicted as image codes)."""


class ImageGenerationRequest(GenerationOptions):
    caption: Text = Field(examples=["a large red circle"])

    def task_fields(self) -> dict[str, Any]:
        return {"caption": self.caption}


class VisualEntailmentRequest(ImageRequest):
    text1: Text = Field(description="premise", examples=["there is a red circle"])
    text2: Text = Field(description="hypothesis", examples=["there is a circle"])

    def task_fields(self) -> dict[str, Any]:
        return {"text1": self.text1, "text2": self.text2}


class GenerateRequest(ImageRequest):
    """A free `instruction`, or a `task` with its `fields` (see GET /v1/tasks)."""

    instruction: Text | None = Field(None, examples=["what does the image describe?"])
    task: str | None = Field(None, examples=["vqa"])
    fields: dict[str, str | float | list[float] | list[str]] = Field(
        default_factory=dict,
        description="the task's fields, e.g. {'question': ...}; a box is [x0, y0, x1, y1] in pixels",
        examples=[{"question": "what color is the circle?"}],
    )
    candidates: list[str] | None = Field(
        None, description="closed answer set: switches on trie-constrained decoding"
    )

    @model_validator(mode="after")
    def _one_of(self) -> GenerateRequest:
        if (self.instruction is None) == (self.task is None):
            raise ValueError("give exactly one of 'instruction' and 'task'")
        if self.instruction is not None and self.fields:
            raise ValueError("'fields' go with a 'task', not with a free 'instruction'")
        return self

    def task_fields(self) -> dict[str, Any]:
        return dict(self.fields)


# ---------------------------------------------------------------------------------------------------
# Responses


class Output(BaseModel):
    """What every answer carries besides its task-shaped fields."""

    text: str = Field(description="the decoded output tokens")
    tokens: list[int] = Field(description="generated token ids (no bos, no eos)")
    score: float | None = Field(description="length-normalised log-probability of the output")
    parse_error: str | None = Field(None, description="set when the output does not form a valid answer")
    image_size: list[int] | None = Field(
        None, description="[width, height] of the uploaded image as decoded: the frame of every box"
    )

    @field_validator("score", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        return v if v is None or math.isfinite(v) else None


class ClosedSetOutput(Output):
    probability: float | None = Field(None, description="probability of the answer among the candidates")
    probabilities: dict[str, float] | None = Field(None, description="every candidate's probability")


class CaptionResponse(Output):
    caption: str | None


class VQAResponse(ClosedSetOutput):
    answer: str | None


class GroundingResponse(Output):
    box: Box | None = Field(description="[x0, y0, x1, y1] in pixels of the uploaded image")


class GroundedCaptionResponse(Output):
    caption: str | None


class ITMResponse(ClosedSetOutput):
    answer: Literal["yes", "no"] | None
    match: bool | None = Field(description="answer == 'yes'")


class DetectedObject(BaseModel):
    box: Box = Field(description="[x0, y0, x1, y1] in pixels of the uploaded image")
    label: str


class DetectionResponse(Output):
    objects: list[DetectedObject] | None


class TextInfillingResponse(Output):
    filled_text: str | None = Field(description="the completed text")


class VisualEntailmentResponse(ClosedSetOutput):
    answer: Literal["yes", "no", "maybe"] | None


class ImageOutput(Output):
    image: str | None = Field(description="the output image as base64 PNG (GET it raw with ?format=png)")
    media_type: Literal["image/png"] = "image/png"
    width: int | None = None
    height: int | None = None
    codes: list[int] | None = Field(
        description="the image codes the model wrote (row-major grid; with mean_image, the best sample's)"
    )
    images_averaged: int | None = Field(
        None, description="with mean_image: how many decoded samples the image is the pixel mean of"
    )


class GenerateResponse(ClosedSetOutput):
    task: str | None
    result: dict[str, Any] = Field(
        description="the task's structured result: text / answer / box / objects / codes "
        "(free instructions: text, boxes, codes)"
    )
    image: str | None = Field(None, description="base64 PNG when the output is an image")


class TaskInfo(BaseModel):
    name: str
    endpoint: str | None = Field(
        description="the task's own endpoint (every task also works on /v1/generate)"
    )
    fields: list[str]
    output: str
    labels: list[str] | None
    template: str
    needs_image: bool
    available: bool = Field(
        description="false when the task needs a part this checkpoint lacks (VQ tokenizer)"
    )


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class ErrorBody(BaseModel):
    type: str
    message: str
    limit: str | None = Field(None, description="the server setting the request ran into, if any")
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Status(BaseModel):
    status: str
    detail: str | None = None
