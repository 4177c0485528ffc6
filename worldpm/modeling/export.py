"""The saved reward model folder, ready where users take it: a HF pipeline and TRL.

``save.save_final`` writes the weights and the tokenizer; for a reward model (objective bt) this module then makes
the folder say what it is:

* config.json: a regression head with one label, ``problem_type: regression`` and ``id2label {0: "reward"}``, so
  ``pipeline("text-classification", model=DIR)`` returns the raw reward under the label ``reward`` (without it the
  pipeline applied a sigmoid and said ``LABEL_0``);
* the tokenizer: ``model_max_length`` is the training max_length and ``truncation_side`` is left (a cut keeps the end
  of the response and the reward token: a decoder's end marker is at the end, an encoder's [CLS] is added after the
  cut), and its ``chat_template`` is worldpm's reward template: the conversation rendered as the model was trained on
  it (``reward_chat_template``). ``tok.apply_chat_template(messages, tokenize=False)`` then gives the text whose
  tokens (the tokenizer's usual call, its own special tokens added) are the ones the model was trained on;
  worldpm.json's ``hf`` entry records that call (``hf_record``; tests/test_downstream.py checks it);
* uniform file modes (model.safetensors was written 0600 and the rest 0644).

The template does not normalise text: give the pipeline text normalised as worldpm.json's ``text`` says (plain text
needs nothing). A plain pipeline call does not truncate (transformers passes no ``truncation`` unless asked, and a
tokenizer setting cannot change that): an encoder (BERT: 512 positions) fails on an input longer than its positions,
so the documented call passes ``truncation=True``, which cuts at this max_length from the left.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from worldpm.data.textpath import PLAIN_REWARD_TEMPLATE, RenderSettings, is_plain_reward_template

MARK = "worldpm reward template"
REWARD_LABEL = "reward"
_LAST = "the conversation must end with the assistant's response (the text the reward model scores)"


def _lit(s: str | None) -> str:
    """A Jinja string literal (Jinja reads Python escapes; non-ASCII is kept as is)."""
    return "none" if s is None else json.dumps(s, ensure_ascii=False)


def reward_chat_template(original: str | None, rs: RenderSettings) -> str:
    """worldpm's rendering of a conversation (prompt messages, then the assistant's response) as one Jinja template.

    Plain models (no chat template of their own): the plain template, a prompt that is one user message as its
    content and any other prompt as "Role: content" paragraphs (worldpm/data/render.py), without the tokenizer's own
    special tokens (the tokenizer adds them). Chat models: their own template, with worldpm's system turn where the
    conversation has none (tokenize.system_prompt) and without the whitespace after the end marker, where the
    reward is read."""
    if not original or is_plain_reward_template(original):
        pre, rest = rs.plain_template.split("{prompt}")
        mid, post = rest.split("{response}")
        return (
            PLAIN_REWARD_TEMPLATE + ": " + json.dumps(rs.plain_template) + ", written by worldpm for a reward "
            "model; the tokenizer adds its own special tokens -#}\n"
            "{%- if not messages or messages[-1]['role'] != 'assistant' -%}"
            "{{- raise_exception(" + _lit(_LAST) + ") -}}{%- endif -%}"
            "{%- set prompt = messages[:-1] -%}"
            "{%- if prompt|length == 1 and prompt[0]['role'] == 'user' -%}"
            "{%- set body = prompt[0]['content'] or '' -%}"
            "{%- else -%}{%- set ns = namespace(body='') -%}{%- for m in prompt -%}"
            "{%- set ns.body = ns.body ~ ('' if loop.first else '\\n\\n') ~ (m['role']|title) ~ ': ' ~ "
            "(m['content'] or '') -%}{%- endfor -%}{%- set body = ns.body -%}{%- endif -%}"
            "{{- " + _lit(pre) + " ~ body ~ " + _lit(mid) + " ~ (messages[-1]['content'] or '') ~ " + _lit(post)
            + " -}}")
    if original.lstrip().startswith("{#- " + MARK):
        return original  # already worldpm's (a model trained from a worldpm model folder)
    system = ""
    if rs.system_prompt is not None:
        system = ("{%- if not (messages and messages[0]['role'] == 'system') -%}{%- set messages = "
                  "[{'role': 'system', 'content': " + _lit(rs.system_prompt) + "}] + messages -%}{%- endif -%}")
    return ("{#- " + MARK + " (chat): the model's own chat template, with worldpm's system turn and without the "
            "whitespace after the end marker (the reward token) -#}\n"
            "{%- if not messages or messages[-1]['role'] != 'assistant' -%}"
            "{{- raise_exception(" + _lit(_LAST) + ") -}}{%- endif -%}"
            + system + "{%- set worldpm_rendered %}" + original + "{% endset -%}{{- worldpm_rendered.rstrip() -}}")


def reward_tokenizer(tok, rs: RenderSettings):
    """A copy of the training tokenizer for the model folder: model_max_length = max_length, truncation from the
    left, worldpm's reward chat template."""
    out = copy.deepcopy(tok)
    out.chat_template = reward_chat_template(getattr(tok, "chat_template", None), rs)
    out.model_max_length = int(rs.max_length)
    out.truncation_side = "left"
    out.init_kwargs["model_max_length"] = int(rs.max_length)
    out.init_kwargs["truncation_side"] = "left"
    # tokenizer.json's own truncation/padding (MiniLM's package ships max 128, right, padded to 128): transformers
    # turns them off on every call that does not ask for them; written as the call with truncation=True does it
    backend = out.backend_tokenizer
    backend.no_padding()
    backend.enable_truncation(max_length=int(rs.max_length), direction="left")
    for k in ("max_length", "stride", "truncation_strategy", "pad_to_multiple_of"):
        out.init_kwargs.pop(k, None)
    return out


def hf_record(reward_tok) -> dict:
    """worldpm.json's `hf` entry: how the reward template's text becomes the tokens the model was trained on.

    worldpm builds a plain-template model's tokens as the tokenizer's own special tokens around the text, and a chat
    model's from its template's text alone (worldpm/data/render.py): so the plain template's text wants the
    tokenizer's usual call (add_special_tokens true, what a pipeline does), and a chat template's text the same when
    the tokenizer adds nothing to a text (Qwen), else add_special_tokens false (a tokenizer that adds a BOS of its
    own: the template writes its own). tests/test_downstream.py checks both against worldpm score."""
    plain = is_plain_reward_template(reward_tok.chat_template)
    adds = list(reward_tok("x", add_special_tokens=True)["input_ids"]) != \
        list(reward_tok("x", add_special_tokens=False)["input_ids"])
    return {"chat_template": "plain" if plain else "chat", "add_special_tokens": plain or not adds,
            "truncation_side": reward_tok.truncation_side, "model_max_length": int(reward_tok.model_max_length)}


def finish_config(dest: Path) -> None:
    """config.json: one regression output labelled `reward` (a HF pipeline then returns the raw reward)."""
    f = dest / "config.json"
    if not f.is_file():
        return  # an adapter folder (QLoRA, LoRA under ZeRO-3): the base model's config is loaded with it
    cfg = json.loads(f.read_text())
    cfg.update(problem_type="regression", id2label={"0": REWARD_LABEL}, label2id={REWARD_LABEL: 0})
    f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _umask() -> int:
    """This process's umask, read without setting it (other threads may be creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def uniform_modes(*folders: Path) -> None:
    """Every file as a plain file is created here (0666 less the umask): torch/safetensors write the weights
    through a private temporary file (0600)."""
    mask = _umask()
    for folder in folders:
        if not folder.is_dir():
            continue
        for root, _, files in os.walk(folder):
            for name in files:
                p = Path(root) / name
                if not p.is_symlink():
                    p.chmod(0o666 & ~mask)


def score_head_model(model_dir: str | Path):
    """The reward model loaded as TRL loads one (``AutoModelForSequenceClassification``, num_labels=1), checked for
    the ``score`` head that TRL's PPO/RLOO reward call reads (``get_reward``: the backbone,
    ``getattr(model, model.base_model_prefix)``, then ``model.score`` on its hidden states at the reward token).
    Decoder reward models (Qwen2, Llama, ...) have it. An encoder (BERT, the default MiniLM) reads its reward at
    [CLS] through its pooler and ``classifier``, and transformers' encoder classes have no ``score``: a one-line
    ModelError says what such a folder serves."""
    from transformers import AutoModelForSequenceClassification

    from worldpm.modeling.models import ModelError, is_encoder

    d = Path(model_dir)
    if (d / "model" / "config.json").is_file() and not (d / "config.json").is_file():
        d = d / "model"
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(d), num_labels=1)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a reward model from {d}: {str(e).strip().splitlines()[0]}") from None
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Module) or getattr(model, model.base_model_prefix, None) is None:
        kind = f"an encoder ({model.config.model_type})" if is_encoder(model.config) else model.config.model_type
        raise ModelError(
            f"{d}: {kind} reward model with no `score` head (it reads its reward at the first token through "
            f"{type(model).__name__}'s pooler and `classifier`), so TRL's PPO/RLOO reward call (get_reward: "
            "model.score on the backbone's hidden states) cannot use it; it serves `worldpm score`/`worldpm "
            "evaluate`, a HF text-classification pipeline and reward functions (GRPO, RLOO, best-of-n) that call one; "
            "for get_reward train a decoder reward model (model.name_or_path: a Qwen2 or Llama checkpoint)")
    return model.eval()
