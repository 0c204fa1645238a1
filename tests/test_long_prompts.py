"""A conversation longer than the model's context is an input error that names the limit, everywhere: never a
forward pass over untrained positions (meaningless answers, and time growing faster than the length: on 2
cores mmguard-mini v2 took 28 s for 32,000 characters, 74 s for 60,000, which are 14,428 tokens, past its 8,192
positions; now refused in 0.03 s), never a model error (503 or fail-closed). The tiny random model proves the
plumbing; its context is 4,096 positions."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmguard import Conversation
from mmguard.conversation import ConversationError
from mmguard.engine import CODE_GENERATION_ROOM, PromptTooLongError
from mmguard.guard import Guard
from mmguard.server.settings import ServerSettings
from mmguard.server.testing import LiveServer

from ocr_doubles import FixedOcr


def words(n: int) -> str:
    return " ".join(f"w{k % 10}" for k in range(n))


def tokens(guard: Guard, conv: Conversation) -> int:
    return len(guard.engine.encode(guard.render(conv), conv.image).input_ids)


def test_the_limit_is_the_models_context_less_room_for_codes(tiny_guard: Guard) -> None:
    limit = tiny_guard.engine.max_prompt_tokens
    assert limit == tiny_guard.engine.model.config.text_config.max_position_embeddings - CODE_GENERATION_ROOM
    long = Conversation.prompt(words(3000))
    assert tokens(tiny_guard, Conversation.prompt(words(100))) < limit < 2 * 3000  # "w3" is 2 tokens here
    with pytest.raises(PromptTooLongError, match=f"over this model's limit of {limit}") as err:
        tiny_guard.classify(long)
    assert isinstance(err.value, ConversationError)  # an input error, like the other conversation rules
    with pytest.raises(PromptTooLongError):
        tiny_guard.classify_batch([Conversation.prompt("hello"), long])


def test_the_server_answers_400_naming_the_limit_even_fail_closed(tiny_guard: Guard) -> None:
    body = {"messages": [{"role": "user", "content": words(3000)}]}
    for fail_closed in (False, True):
        with LiveServer(tiny_guard, ServerSettings(warmup=False, fail_closed=fail_closed)) as srv:
            answer = httpx.post(srv.url + "/v1/guard/classify", json=body, timeout=120)
            fine = httpx.post(srv.url + "/v1/guard/classify", json={"messages": [
                {"role": "user", "content": "hello"}]}, timeout=120)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "invalid_input" and "over this model's limit" in error["message"]
        assert fine.status_code == 200


def test_the_cli_fails_with_the_limit_in_its_message(tiny_model_dir: Path) -> None:
    from mmguard.cli import app

    res = CliRunner().invoke(app, ["classify", "-m", str(tiny_model_dir), "--device", "cpu",
                                   "--input", "-"], input=json.dumps({"messages": [
                                       {"role": "user", "content": words(3000)}]}))
    assert res.exit_code not in (0, 1) and "over this model's limit" in res.output, res.output


def test_text_in_the_image_that_would_pass_the_context_is_marked_unread(tiny_guard: Guard) -> None:
    """Padding the conversation to just under the limit must not leave the image's text unjudged silently."""
    limit = tiny_guard.engine.max_prompt_tokens
    assert limit is not None
    image = Image.new("RGB", (64, 48), "white")
    base = tokens(tiny_guard, Conversation.prompt(words(100), image=image))
    per_word = (tokens(tiny_guard, Conversation.prompt(words(300), image=image)) - base) / 200
    n = 100 + int((limit - 60 - base) / per_word)  # the main prompt just fits
    conv = Conversation.prompt(words(n), image=image)
    assert limit - 120 < tokens(tiny_guard, conv) <= limit
    guard = Guard(tiny_guard.engine, read_text="on", ocr=FixedOcr(words(200)))  # its check does not fit
    verdict = guard.classify(conv)
    assert verdict.text_unread and verdict.read_text == words(200)
    assert verdict.check_probabilities == {}
    assert any("not checked" in w and "limit" in w for w in verdict.warnings)
    short = Guard(tiny_guard.engine, read_text="on", ocr=FixedOcr("hello")).classify(conv)
    assert not short.text_unread and set(short.check_probabilities) == {"model", "ocr"}


def test_a_guard_can_set_a_lower_limit_than_the_model(tiny_guard: Guard) -> None:
    """An operator bounds the time one request holds the model: the guard refuses past its own limit, the main
    check and the image-text check alike, and says which limit."""
    short = Guard(tiny_guard.engine, max_prompt_tokens=400)
    assert short.describe()["max_prompt_tokens"] == 400
    assert tiny_guard.describe()["max_prompt_tokens"] == tiny_guard.engine.max_prompt_tokens
    assert short.classify(Conversation.prompt("hello")).threshold > 0  # fits: judged
    with pytest.raises(PromptTooLongError, match="over this guard's limit of 400 \\(max_prompt_tokens; the model "
                                                 f"allows {tiny_guard.engine.max_prompt_tokens}\\)"):
        short.classify(Conversation.prompt(words(400)))
    image = Image.new("RGB", (64, 48), "white")
    reading = Guard(tiny_guard.engine, max_prompt_tokens=400, read_text="on", ocr=FixedOcr(words(300)))
    verdict = reading.classify(Conversation.prompt("hello", image=image))
    assert verdict.text_unread and any("guard's limit of 400" in w for w in verdict.warnings)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        Guard(tiny_guard.engine, max_prompt_tokens=0)


def test_serve_and_proxy_take_max_prompt_tokens() -> None:
    from mmguard.cli import _register_tools, app

    for command in ("serve", "proxy"):
        _register_tools([command])  # the CLI registers its tool commands lazily, as its main() does
        res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
        assert "--max-prompt-tokens" in res.output, res.output


def test_batch_gives_a_line_past_the_limit_an_error_row_and_judges_the_rest(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    from mmguard.cli import _register_tools, app

    src = tmp_path / "convs.jsonl"
    lines = [{"id": i, "messages": [{"role": "user", "content": words(500) if i == 1 else "hello"}]} for i in range(3)]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    _register_tools(["batch"])
    res = CliRunner().invoke(app, ["batch", str(src), "-o", str(tmp_path / "out"), "-m", str(tiny_model_dir),
                                   "--device", "cpu", "--dtype", "float32", "--max-prompt-tokens", "400"])
    assert res.exit_code == 2 and "1 line(s) were invalid" in res.output, res.output
    rows = [json.loads(x) for p in sorted((tmp_path / "out").glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert "over this guard's limit of 400" in rows[1]["mmguard"]["error"]
    assert rows[0]["mmguard"]["label"] and rows[2]["mmguard"]["label"]
