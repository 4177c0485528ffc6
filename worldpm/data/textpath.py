"""The text path: how a text becomes what a model scores. One value, built once from the config (``TextPath.of``):

1. normalisation (``normalize_markup``: clean.normalize_markup, the normalise stage's setting; the rules are
   worldpm/data/text.py's), then
2. the template and the cut (``render``: tokenize.max_length, plain_template, system_prompt; worldpm/data/render.py
   does the work).

The tokenize stage renders with ``render`` (RenderSettings.of its section, the constructor TextPath.of uses), the
trainer writes the whole value into the model folder's worldpm.json (``card``), the evaluate stage scores its eval
sets through it, and `worldpm evaluate` / `worldpm score` read it back from worldpm.json (``from_card``), so a text
is normalised, templated and cut at scoring as it was at training.

This module holds the settings only, not the rules: a stage that records the text path (train) must not retrain
when a normalisation rule is edited (that reaches it through its inputs' digests, or not at all).
"""
from __future__ import annotations

from typing import Any

from worldpm.config import PipelineConfig, Strict, TokenizeConfig

# The chat template worldpm writes into a plain-template reward model's folder (worldpm/modeling/export.py) starts
# with this comment: such a tokenizer is still rendered with the plain template and its own special tokens
# (render.Renderer).
PLAIN_REWARD_TEMPLATE = "{#- worldpm reward template (plain)"


def is_plain_reward_template(template) -> bool:
    return isinstance(template, str) and template.lstrip().startswith(PLAIN_REWARD_TEMPLATE)


# what each setting of normalize_markup runs (worldpm/data/text.py), for the records
NORMALIZERS = {True: "markup", False: "light"}
_FUNCTIONS = {True: "worldpm.data.text.normalize_columns", False: "worldpm.data.text.light_text"}


class RenderSettings(Strict):
    """How text becomes token ids: the tokenize stage's template and cut, shared by every scorer."""

    max_length: int
    plain_template: str
    system_prompt: str | None

    @classmethod
    def of(cls, tokenize: TokenizeConfig | dict) -> "RenderSettings":
        """From pipeline.yaml's `tokenize:` (or a worldpm.json `render` record)."""
        get = tokenize.get if isinstance(tokenize, dict) else lambda k: getattr(tokenize, k)
        return cls.model_construct(max_length=int(get("max_length")), plain_template=get("plain_template"),
                                   system_prompt=get("system_prompt"))


class TextPath(Strict):
    normalize_markup: bool
    render: RenderSettings

    @classmethod
    def of(cls, cfg: PipelineConfig) -> "TextPath":
        return cls.model_construct(normalize_markup=cfg.clean.normalize_markup, render=RenderSettings.of(cfg.tokenize))

    def describe(self) -> dict:
        """The normalisation, for metrics.json and worldpm.json."""
        m = bool(self.normalize_markup)
        return {"normalize_markup": m, "normalization": NORMALIZERS[m], "function": _FUNCTIONS[m]}

    def card(self) -> dict:
        """Its entries in a model folder's worldpm.json: `text` (the normalisation) and `render`."""
        return {"text": self.describe(), "render": self.render.model_dump()}

    @classmethod
    def from_card(cls, card: dict, default: "TextPath") -> tuple["TextPath", dict[str, str]]:
        """The text path a model folder's worldpm.json records, each part it lacks taken from `default`; and where
        each part came from (the folder or the default)."""
        text, render = card.get("text") or {}, card.get("render") or {}
        origin: dict[str, Any] = {}
        markup = text.get("normalize_markup")
        origin["normalize_markup"] = "the model's worldpm.json" if markup is not None else "the default"
        rs = default.render.model_dump()
        for k in rs:
            if k in render:
                rs[k] = render[k]
        origin["render"] = "the model's worldpm.json" if render else "the default"
        return cls.model_construct(normalize_markup=bool(default.normalize_markup if markup is None else markup),
                                   render=RenderSettings.of(rs)), origin
