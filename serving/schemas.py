"""The funnel's HTTP contract: pydantic request and response models, and the typed
arguments of the Serve app builder. Every request model is strict and forbids unknown
fields, so a wrong type or a misspelt key is a 422 naming it; sizes are bounded here."""


from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from configs import ABTestConfig, ServeConfig

MAX_HISTORY = 1000
MAX_CANDIDATES = 2000
MAX_BODY_BYTES = 256 * 1024
MAX_TS = 4_102_444_800  # 2100-01-01: every ts is bounded here; the data's own cut-off is checked per request
Id = Annotated[str, Field(min_length=1, max_length=128)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RetrieveRequest(_Strict):
    user_id: Id
    history: list[Id] | None = Field(None, min_length=1, max_length=MAX_HISTORY)
    n: int = Field(500, ge=1, le=MAX_CANDIDATES)
    ts: int | None = Field(None, ge=0, le=MAX_TS)  # the request time (now if absent): unreleased items are dropped


class PrerankRequest(_Strict):
    user_id: Id
    history: list[Id] | None = Field(None, min_length=1, max_length=MAX_HISTORY)
    candidates: list[Id] = Field(min_length=1, max_length=MAX_CANDIDATES)
    m: int = Field(100, ge=1, le=MAX_CANDIDATES)
    ts: int | None = Field(None, ge=0, le=MAX_TS)


class RankRequest(_Strict):
    user_id: Id
    history: list[Id] | None = Field(None, min_length=1, max_length=MAX_HISTORY)
    candidates: list[Id] = Field(min_length=1, max_length=500)
    k: int = Field(10, ge=1, le=500)
    ts: int | None = Field(None, ge=0, le=MAX_TS)


class RecommendRequest(_Strict):
    user_id: Id
    history: list[Id] | None = Field(None, min_length=1, max_length=MAX_HISTORY)
    k: int = Field(10, ge=1, le=100)
    ts: int | None = Field(None, ge=0, le=MAX_TS)


class Click(_Strict):
    item_id: Id
    position: int = Field(ge=0, le=100)


class FeedbackRequest(_Strict):
    """Clicks on one served slate: one (`item_id`, `position`) or several (`clicks`). The
    request id must be one the funnel served to this user; the arm logged is the server's own
    record of it (`arm`, if sent, is ignored: a client cannot move a click to another arm)."""

    user_id: Id
    request_id: Id
    arm: Id | None = None
    ts: int | None = Field(None, ge=0, le=MAX_TS)
    item_id: Id | None = None
    position: int | None = Field(None, ge=0, le=100)
    clicks: list[Click] | None = Field(None, min_length=1, max_length=100)

    @model_validator(mode="after")
    def _one_form(self) -> "FeedbackRequest":
        single = (self.item_id is not None, self.position is not None)
        if (self.clicks is None) != all(single) or (self.clicks is not None and any(single)):
            raise ValueError("send one click as item_id + position, or several as clicks: [{item_id, position}, ...]")
        return self

    def all_clicks(self) -> list[Click]:
        return self.clicks if self.clicks is not None else [Click(item_id=self.item_id, position=self.position)]


class Items(BaseModel):
    items: list[str]
    scores: list[float]
    model_version: str = ""


class Recommendation(Items):
    request_id: str
    arm: str
    stages: dict[str, str] = {}


class FunnelArgs(BaseModel):
    """Typed arguments of the app builder (also the `args:` of serving/config.yaml): where the
    processed data and the registry are, and the config's own `serve` and `abtest` sections
    (configs/schema.py: one definition of every serving knob; a misspelt key is an error)."""

    model_config = ConfigDict(extra="forbid")

    data_dir: str
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    max_ts: int = Field(0, ge=0, le=MAX_TS)  # the data's cut-off (data.max_ts); 0 = now + 1 day per request
    serve: ServeConfig = Field(default_factory=ServeConfig)
    abtest: ABTestConfig = Field(default_factory=ABTestConfig)
