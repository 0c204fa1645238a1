"""The prefix cache against the plain engine, in one run, on the same inputs.

    .venv/bin/python bench/prefix_cache.py                       # the default model + a larger random Mllama
    .venv/bin/python bench/prefix_cache.py --model DIR --batches 8 --no-large

1. Text-only classification at batch ``--batch`` (distinct prompts, the default policy): the plain engine,
   then the prefix-cached engine (the template prefix computed once, reused by every row). Timed after one
   warm-up batch each; the prompts of the timed batches were never seen by the cache, so only the template
   prefix is reused.
2. A streamed answer of ``--answer-tokens`` tokens checked every ``--check-every`` tokens (response
   classification of one conversation; checks that pass, see ``--stream-threshold``): re-classifying the
   whole conversation at each check with the plain engine, against incremental checks with the prefix
   cache (each check computes the new answer tokens plus the closing part of the template).

Both parts print the ratio and max |dp(unsafe)| / |dp(category)| against the plain engine, and whether the
labels and codes are identical. ``--large`` repeats them on a random-weight Mllama of a larger size
(``--large-hidden``, ``--large-layers``): its verdicts are meaningless, its timings are what a bigger model
costs per token. ``--tiny`` uses a tiny random checkpoint (tests: plumbing only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmguard.conversation import Conversation
from mmguard.guard import Guard
from mmguard.prefix_cache import PrefixCachingEngine, enable_prefix_cache
from mmguard.tokenizer import encode_text

TOPICS = ["the weather tomorrow", "a recipe with lentils", "how tides work", "fixing a bike chain",
          "the history of the printing press", "learning to juggle", "a budget for a trip", "growing tomatoes",
          "the rules of chess", "how vaccines are tested", "picking a lock on my own shed", "a poem about rain"]
STORY = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
         "had done before him. From the lamp room he could see the fishing boats returning, their lights "
         "bobbing on the dark water, and he wrote each one into the logbook with a careful hand. ")


def prompts(n: int, offset: int) -> list[Conversation]:
    out = []
    for i in range(offset, offset + n):
        topic = TOPICS[i % len(TOPICS)]
        out.append(Conversation.prompt(f"Question {i}: could you tell me about {topic}? "
                                       f"I am asking for request number {i} and want a short answer."))
    return out


def compare(a: list[Any], b: list[Any]) -> dict[str, Any]:
    dp = max(abs(x.unsafe_probability - y.unsafe_probability) for x, y in zip(a, b, strict=True))
    dc = max((abs(p - y.category_probabilities.get(c, 0.0)) for x, y in zip(a, b, strict=True)
              for c, p in x.category_probabilities.items()), default=0.0)
    same = all(x.label == y.label and x.codes == y.codes for x, y in zip(a, b, strict=True))
    return {"max_abs_dp_unsafe": dp, "max_abs_dp_category": dc, "identical_labels_and_codes": same}


def bench_batches(plain: Guard, cached: Guard, batch: int, batches: int, reps: int) -> dict[str, Any]:
    engine = cached.engine
    assert isinstance(engine, PrefixCachingEngine)
    plain.classify_batch(prompts(batch, 10_000), batch_size=batch)  # warm-up (and the cached anchor)
    cached.classify_batch(prompts(batch, 10_000), batch_size=batch)
    times: dict[str, list[float]] = {"plain": [], "prefix_cache": []}
    results: dict[str, list[Any]] = {"plain": [], "prefix_cache": []}
    for rep in range(reps):
        for name, guard in (("plain", plain), ("prefix_cache", cached)):
            t0 = time.perf_counter()
            out = []
            for k in range(batches):  # fresh prompts each batch: only the template prefix can be reused
                out += guard.classify_batch(prompts(batch, 1000 * (rep + 1) + k * batch), batch_size=batch)
            times[name].append(time.perf_counter() - t0)
            if rep == 0:
                results[name] = out
    n = batch * batches
    plain_s, cached_s = statistics.median(times["plain"]), statistics.median(times["prefix_cache"])
    return {"batch": batch, "classifications": n, "plain_per_s": n / plain_s, "prefix_cache_per_s": n / cached_s,
            "ratio": plain_s / cached_s, "prompt_tokens": len(plain.prompt_ids(prompts(1, 1000)[0])),
            **compare(results["plain"], results["prefix_cache"])}


def answer_prefixes(guard: Guard, tokens: int, every: int) -> list[str]:
    text = STORY * (tokens // 40 + 2)
    ids = encode_text(guard.engine.tokenizer, text)[:tokens]
    return [guard.engine.tokenizer.decode(ids[:k]) for k in range(every, tokens + 1, every)]


def bench_stream(plain: Guard, cached: Guard, tokens: int, every: int, reps: int,
                 threshold: float) -> dict[str, Any]:
    engine = cached.engine
    assert isinstance(engine, PrefixCachingEngine)
    answers = answer_prefixes(plain, tokens, every)
    question = "Tell me a long story about a lighthouse keeper."

    def run(guard: Guard, tag: int) -> tuple[float, list[Any]]:
        out = []
        t0 = time.perf_counter()
        for a in answers:  # one conversation (a new one each run: nothing kept from the last run)
            out.append(guard.classify(Conversation.response(f"{question} ({tag})", a), threshold=threshold))
        return time.perf_counter() - t0, out

    run(plain, -1)
    run(cached, -1)
    times: dict[str, list[float]] = {"plain": [], "prefix_cache": []}
    kept: dict[str, list[Any]] = {}
    computed = 0
    for rep in range(reps):
        for name, guard in (("plain", plain), ("prefix_cache", cached)):
            before = engine.stats.computed_tokens
            seconds, out = run(guard, rep)
            times[name].append(seconds)
            kept.setdefault(name, out)
            if name == "prefix_cache":
                computed = engine.stats.computed_tokens - before
    full_tokens = sum(len(plain.prompt_ids(Conversation.response(question, a))) for a in answers)
    plain_s, cached_s = statistics.median(times["plain"]), statistics.median(times["prefix_cache"])
    return {"answer_tokens": tokens, "check_every": every, "checks": len(answers), "threshold": threshold,
            "unsafe_checks": sum(v.is_unsafe for v in kept["plain"]),
            "full_recheck_s": plain_s, "incremental_s": cached_s, "ratio": plain_s / cached_s,
            "tokens_full_recheck": full_tokens, "tokens_incremental": computed,
            **compare(kept["plain"], kept["prefix_cache"])}


def large_checkpoint(hidden: int, layers: int, out: Path) -> Path:
    """A random-weight Mllama with a small vision tower and a bigger text model (Llama 3.2 tokenizer)."""
    from mmguard.checkpoints import make_image_processor
    from mmguard.tiny import TINY_MARKER, random_mllama, small_mllama_config
    from mmguard.tokenizer import load_default_tokenizer

    cfg = small_mllama_config(
        vision={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "image_size": 112},
        text={"hidden_size": hidden, "num_hidden_layers": layers,
              "cross_attention_layers": sorted({layers // 4, layers // 2, (3 * layers) // 4}),
              "intermediate_size": hidden * 4, "max_position_embeddings": 8192,
              "num_attention_heads": max(4, hidden // 64), "num_key_value_heads": max(2, hidden // 256)})
    model = random_mllama(cfg, seed=0, gate_init=0.5)
    model.save_pretrained(out)
    load_default_tokenizer().save_pretrained(out)
    make_image_processor(112).save_pretrained(out)
    (out / f"{TINY_MARKER}.json").write_text(json.dumps({"warning": "random weights"}))
    return out


def describe(path: Any) -> str:
    from mmguard.models import default_model_path

    p = Path(path) if path is not None else Path(default_model_path())
    try:
        text = json.loads((p / "config.json").read_text())["text_config"]
        return (f"{p.name}: text hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, "
                f"vocabulary {text['vocab_size']}")
    except (OSError, KeyError, ValueError):
        return str(p)


def run_model(label: str, path: Any, args: argparse.Namespace) -> dict[str, Any]:
    plain = Guard.from_pretrained(path, device=args.device, dtype=args.dtype)
    cached = enable_prefix_cache(Guard.from_pretrained(path, device=args.device, dtype=args.dtype))
    report = {"model": label, "about": describe(path),
              "text_batches": bench_batches(plain, cached, args.batch, args.batches, args.reps),
              "stream": bench_stream(plain, cached, args.answer_tokens, args.check_every, args.reps,
                                    args.stream_threshold)}
    tb, st = report["text_batches"], report["stream"]
    print(f"[{label}] {report['about']}")
    print(f"  text-only batch {tb['batch']} ({tb['prompt_tokens']} prompt tokens): plain {tb['plain_per_s']:.1f}/s, "
          f"prefix cache {tb['prefix_cache_per_s']:.1f}/s  -> {tb['ratio']:.2f}x   "
          f"max|dp| {tb['max_abs_dp_unsafe']:.1e} identical: {tb['identical_labels_and_codes']}")
    print(f"  {st['answer_tokens']}-token answer checked every {st['check_every']} ({st['checks']} checks): full "
          f"re-check {st['full_recheck_s']:.3f}s ({st['tokens_full_recheck']} tokens), incremental "
          f"{st['incremental_s']:.3f}s ({st['tokens_incremental']} tokens)  -> {st['ratio']:.2f}x   "
          f"max|dp| {st['max_abs_dp_unsafe']:.1e} identical: {st['identical_labels_and_codes']}")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="guard directory (default: the bundled default model)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random checkpoint instead (tests)")
    ap.add_argument("--large", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--large-hidden", type=int, default=512)
    ap.add_argument("--large-layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--answer-tokens", type=int, default=512)
    ap.add_argument("--check-every", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stream-threshold", type=float, default=1.0,
                    help="threshold of the streamed checks (default 1.0: every check passes, as all checks but the "
                    "last of a stream do; a lower one makes random-weight models run the category decode)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write the report as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from mmguard.tiny import make_tiny_checkpoint

            reports.append(run_model("tiny", make_tiny_checkpoint(Path(tmp) / "tiny", seed=0), args))
        else:
            reports.append(run_model("model", args.model, args))
        if args.large:
            path = large_checkpoint(args.large_hidden, args.large_layers, Path(tmp) / "large")
            reports.append(run_model(f"random Mllama {args.large_hidden}x{args.large_layers}", path, args))
    if args.out:
        args.out.write_text(json.dumps({"runs": reports}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
