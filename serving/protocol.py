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
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


# Documented as a pattern too (some non-space character), so that schema-driven clients know.
Text = Annotated[str, AfterValidator(_not_blank), Field(json_schema_extra={"pattern": r"\S"})]


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
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="makes sampling reproducible")
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
    stream: bool | None = Field(
        None,
        description="answer as server-sent events: a 'delta' event per piece of text as the tokens "
        "are decoded (greedy or one sample; beam search sends its text in one delta at the end), then "
        "a 'result' event with the response body, then [DONE]",
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


class EmbeddingRequest(BaseModel):
    """One image or one text to embed (give exactly one); needs a model with a retrieval head."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(
        None,
        description="the image: base64 or a data: URI in JSON; a file field in multipart/form-data",
    )
    text: Text | None = Field(None, examples=["a large red circle"])


class RetrievalRequest(BaseModel):
    """Rank candidates against one query: an `image` and its candidate `texts`, or a `text` and its
    candidate `images`; `rerank` re-scores the top k with the fusion model's image-text matching."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(
        None,
        description="the query image: base64 or a data: URI in JSON; a file field in multipart/form-data",
    )
    text: Text | None = Field(None, description="the query text", examples=["a large red circle"])
    texts: list[Text] | None = Field(
        None,
        description="candidate texts for an image query",
        examples=[["a large red circle", "two blue squares"]],
    )
    images: list[str] | None = Field(
        None,
        description="candidate images for a text query: base64 or data: URIs in JSON; repeated file "
        "fields in multipart/form-data",
    )
    rerank: int = Field(
        0,
        ge=0,
        description="re-score the top k by embedding with the fusion model's ITM P('yes') and re-sort "
        "them (0 = embedding scores only)",
    )


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


class EmbeddingResponse(BaseModel):
    input: Literal["image", "text"] = Field(description="what was embedded")
    embedding: list[float] = Field(description="unit-length vector; compare two by their dot product")
    dim: int


class RankedCandidate(BaseModel):
    index: int = Field(description="the candidate's position in the request's `texts` or `images`")
    score: float = Field(description="what the order is by: itm_score when re-ranked, else embedding_score")
    embedding_score: float = Field(description="cosine similarity of the query's and candidate's embeddings")
    itm_score: float | None = Field(
        None, description="the fusion model's P('yes') that image and text match (re-ranked ones only)"
    )
    text: str | None = Field(None, description="the candidate text (text candidates)")


class RetrievalResponse(BaseModel):
    query: Literal["image", "text"]
    reranked: int = Field(
        description="how many of the top results are ordered by itm_score; they come first, the rest "
        "follow by embedding_score"
    )
    results: list[RankedCandidate] = Field(description="every candidate, best first")


class GenerateDelta(BaseModel):
    """A streamed /v1/generate event: text the model wrote since the last delta."""

    type: Literal["delta"] = "delta"
    text: str = Field(description="never empty; the deltas add up to the result's `text`")


class GenerateResult(BaseModel):
    """The last event of a streamed /v1/generate (before [DONE]): the non-streamed response body."""

    type: Literal["result"] = "result"
    response: GenerateResponse


class TaskInfo(BaseModel):
    name: str
    endpoint: str | None = Field(
        description="the task's own endpoint (every task but itc also works on /v1/generate)"
    )
    fields: list[str]
    output: str
    labels: list[str] | None
    template: str
    needs_image: bool
    available: bool = Field(
        description="false when the task needs a part this checkpoint lacks (VQ tokenizer, retrieval head)"
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


# ---------------------------------------------------------------------------------------------------
# OpenAI-compatible chat API (/v1/chat/completions, /v1/models): OpenAI's field names and shapes, so
# the official clients work unchanged; what OFA adds travels in extension fields (`task` and the
# task's fields in, `ofa` out).


class ImageURL(BaseModel):
    url: str = Field(
        description="a data: URI ('data:image/png;base64,...'), or http(s) if the server fetches"
    )
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted and ignored")


class ContentPart(BaseModel):
    """One part of a message's content: `{"type": "text", "text"}` or `{"type": "image_url", "image_url"}`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _matches_type(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a 'text' part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an 'image_url' part needs 'image_url': {'url': ...}")
        return self


def _content_schema(schema: dict[str, Any]) -> None:
    """Document `content` as OpenAI does (a string or a list of parts); validation turns a string
    into one text part first, so an error names one shape, not every member of a union."""
    schema["properties"]["content"]["anyOf"].insert(0, {"type": "string"})


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_content_schema)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: list[ContentPart] | None = Field(None, description="a string, or a list of content parts")
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, str | list):
            raise ValueError("content must be a string or a list of content parts")
        return [{"type": "text", "text": v}] if isinstance(v, str) else v


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="one more chunk before [DONE], with `usage`")


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat/completions request. Keys not listed here are OFA extension fields (the OpenAI
    client sends them with `extra_body`): the named `task`'s fields (`candidates`, `box`, `text1`...),
    and `beam_size`, `top_k`, `mean_image`; they are validated by the task's own request model."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="the served model id (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="= max_new_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="= max_new_tokens")
    temperature: float | None = Field(
        None,
        ge=0,
        le=2,
        allow_inf_nan=False,
        description="unset: the task's decoding (beam search); 0: greedy; > 0: sampling",
    )
    top_p: float | None = Field(None, ge=0, le=1, description="samples (nucleus) when set")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="makes sampling reproducible")
    n: int | None = Field(None, ge=1, description="only 1: one choice per request")
    stop: str | list[str] | None = Field(
        None, description="up to 4 strings; the content is cut before the first one the answer holds"
    )
    stream: bool | None = Field(
        None,
        description="server-sent events: a content chunk per text delta as the tokens are decoded "
        "(temperature 0 or > 0); the task's beam search sends its content in one chunk at the end",
    )
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted and ignored")
    task: str | None = Field(
        None,
        description="OFA extension: run this task (GET /v1/tasks); the user text fills its text "
        "field (vqa: question, grounding: text, ...)",
        examples=["grounding"],
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> list[str] | None:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("give at most 4 non-empty stop strings")
        return stops


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="encoder positions the model read: text tokens + image patches")
    completion_tokens: int = Field(description="tokens the model wrote (eos not counted)")
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str = Field(description="'chatcmpl-' + the request id (X-Request-ID)")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    ofa: dict[str, Any] = Field(
        description="OFA extension: the body the task's own endpoint returns (POST /v1/grounding: box, "
        "/v1/itm: answer and probabilities, ...); /v1/generate's for a free instruction"
    )


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer; `usage` and `ofa` are null but on the chunks that
    carry them."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    ofa: dict[str, Any] | None = Field(None, description="on the chunk that carries finish_reason")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="the checkpoint directory's modification time (Unix seconds)")
    owned_by: str = "ofa-unified"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="'invalid_request_error' (4xx) or 'server_error' (5xx)")
    param: str | None = Field(description="the request field at fault, if one is")
    code: str | None = Field(description="this server's error type (unknown_task, limit_exceeded, ...)")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError
