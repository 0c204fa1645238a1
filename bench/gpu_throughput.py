"""Throughput of Llama Guard 3 Vision's architecture (Mllama 11B, random bf16 weights) on one GPU:
the model-card recipe (generate, max_new_tokens=20), plain batched forward passes, mmguard's Engine
and mmguard.fast.FastEngine, on the same inputs (400-token prompts; 4-, 2-, 1-tile images; text-only).

Speed does not depend on weight values. Reports classifications/s, p50/p99 latency at batch 1, peak
memory, share of the compute ceiling, prompt+response of the same image vs two independent
classifications, and ratios. Engines are timed end to end (image preprocessing on the CPU included,
verdict only: decode_codes=False); the plain forward pass is timed on prepared tensors.

Candidates the issue keeps only if they measure faster (each also checked against the exact results):
``fast_mask_free_text`` (right padding, no attention mask), ``fast_pairs_two_calls_kept`` (prompt checks,
then the response checks in a later call reusing kept encodings); approximations ``--approx``
(real tiles only, real tokens only) and ``--quantize fp8|int8`` (run last: it changes the model in place).

GPU:  python bench/gpu_throughput.py --approx --quantize fp8 --out gpu_throughput.json
CPU plumbing check (numbers mean nothing):
    python bench/gpu_throughput.py --tiny --approx --quantize int8 --max-seconds 120
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmguard.checkpoints import make_image_processor
from mmguard.conversation import Conversation
from mmguard.engine import Engine
from mmguard.fast import FastEngine
from mmguard.fast.vision import patch_vision_attention, unpatch_vision_attention
from mmguard.guard import Guard

FILLER = "please describe what the person in this photo is doing and whether it is allowed here"
H200_BF16_DENSE_PEAK = 989e12  # FLOP/s, NVIDIA's H200 SXM bf16 dense spec (no sparsity)
H200_BF16_MATMUL_MEASURED = 790e12  # FLOP/s, what bf16 matrix products reached (shared/reference/gpu-baseline.md)


def build_model(tiny: bool, dev: str, dtype: torch.dtype) -> Any:
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    if tiny:
        from mmguard.tiny import tiny_config

        cfg = tiny_config()
    else:  # the 11B defaults of MllamaConfig are Llama 3.2 11B Vision (tile 560, vocab 128256)
        text = dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192},
                    vocab_size=128256, pad_token_id=128004, bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
        cfg = MllamaConfig(vision_config=dict(image_size=560, patch_size=14, max_num_tiles=4), text_config=text,
                           image_token_index=128256)
    torch.manual_seed(0)
    with torch.device(dev):  # created directly on the device: no CPU copy of 20 GB
        torch.set_default_dtype(dtype)
        try:
            model = MllamaForConditionalGeneration(cfg)
        finally:
            torch.set_default_dtype(torch.float32)
    if tiny:
        for name, p in model.named_parameters():  # open the tanh gates like the tiny checkpoints do
            if "gate" in name:
                p.data.fill_(0.5)
    return model.eval()


def flops_per_classification(model: Any, prompt_len: int, image: bool) -> float:
    """Estimate (shared/reference/attacks-and-performance.md B.3): dense 2*params*tokens, attention
    4*L^2*d per layer. The exact path always encodes all max_num_tiles tiles (padding included)."""
    vm = model.model.vision_model
    vc, tc = model.config.vision_config, model.config.text_config
    text_p = sum(p.numel() for n, p in model.model.language_model.named_parameters() if "embed_tokens" not in n)
    cross_kv = sum(p.numel() for n, p in model.model.language_model.named_parameters()
                   if "cross_attn.k_proj" in n or "cross_attn.v_proj" in n)
    lm_head = model.lm_head.weight.numel()
    n_cross = len(tc.cross_attention_layers)
    total = 2 * (text_p - cross_kv) * prompt_len + 2 * lm_head
    total += 4 * prompt_len ** 2 * tc.hidden_size * (tc.num_hidden_layers - n_cross) / 2  # causal
    if image:
        tile_len = vm.num_patches + (8 - vm.num_patches % 8) % 8
        length = vc.max_num_tiles * tile_len
        vis_p = sum(p.numel() for n, p in vm.named_parameters() if "layers." in n)
        total += 2 * vis_p * length + 4 * length ** 2 * vc.hidden_size * (vc.num_hidden_layers + vc.num_global_layers)
        proj = model.model.multi_modal_projector.weight.numel()
        vis_tokens = vc.max_num_tiles * vm.num_patches
        total += 2 * proj * vis_tokens + 2 * cross_kv * vis_tokens
        total += 4 * prompt_len * vis_tokens * tc.hidden_size * n_cross
    return float(total)


def max_abs_dp(a: list[Any], b: list[Any]) -> float:
    return max(abs(x.unsafe_probability - y.unsafe_probability) for x, y in zip(a, b, strict=True))


def random_image(tiles: int, tile: int, seed: int) -> Image.Image:
    w, h = {1: (tile, tile), 2: (2 * tile, tile), 4: (2 * tile, 2 * tile)}[tiles]
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
        self.dtype = torch.bfloat16 if self.dev == "cuda" else torch.float32
        self.deadline = time.perf_counter() + args.max_seconds
        from mmguard.tokenizer import load_default_tokenizer

        t0 = time.perf_counter()
        self.model = build_model(args.tiny, self.dev, self.dtype)
        self.init_s = time.perf_counter() - t0
        tok = load_default_tokenizer()
        tile = int(self.model.config.vision_config.image_size)
        self.tile = tile
        proc = make_image_processor(tile)
        self.engine = Engine(self.model, tok, proc, device=self.dev, dtype=self.dtype, source="random")
        # one model instance: FastEngine patches the vision attention modules' forward; the baselines unpatch it
        self.guard = Guard(self.engine)
        self.filler = self._filler_for(args.prompt_len)
        self.exact: dict[str, list[Any]] = {}  # scenario -> Engine results, for the approximations' distance

    def _filler_for(self, target: int) -> str:
        words = FILLER.split()
        base = len(self.guard.engine.encode(self.guard.render(Conversation.prompt("x")), None).input_ids)
        n = max(1, target - base)
        return " ".join(words[i % len(words)] for i in range(n))

    def items(self, tiles: int, n: int, seed: int, shared: bool = False) -> list[Any]:
        out = []
        for i in range(n):
            img = None if tiles == 0 else random_image(tiles, self.tile, seed + (i // 2 if shared else i))
            if shared and i % 2:
                conv = Conversation.response(self.filler, "it is a picture of a street", image=img)
            else:
                conv = Conversation.prompt(self.filler, image=img)
            out.append(self.engine.encode(self.guard.render(conv), conv.image))
        return out

    def verdicts(self, engine: Engine, items: list[Any]) -> list[Any]:
        """One end-to-end scoring call as the benchmark times it: verdict only, no code decode."""
        return engine.score(items, threshold=0.5, codes=(), batch_size=self.args.batch, decode_codes=False)

    def sync(self) -> None:
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def timed(self, fn: Any, reps: int) -> list[float]:
        fn()  # warm-up
        self.sync()
        ts = []
        for _ in range(reps):
            if ts and self.left() < 0:
                break
            t = time.perf_counter()
            fn()
            self.sync()
            ts.append(time.perf_counter() - t)
        return ts

    def peak(self) -> float | None:
        if self.dev != "cuda":
            return None
        return torch.cuda.max_memory_allocated() / 2 ** 30

    def reset_peak(self) -> None:
        if self.dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    # -- methods -----------------------------------------------------------------------------------
    def plain(self) -> None:
        unpatch_vision_attention(self.model)  # the baselines run the unmodified transformers attention

    def patched(self) -> None:
        patch_vision_attention(self.model)

    def recipe(self, item: Any) -> None:
        """Model-card recipe: the prompt alone, then generate(max_new_tokens=20)."""
        prefix = len(self.engine.decision_prefix_ids("\n\n"))
        it = type(item)(item.input_ids[:-prefix], item.image, item.prompt)
        batch = self.engine.collate([it])
        batch.pop("position_ids")
        with torch.inference_mode():
            self.model.generate(**batch, do_sample=False, max_new_tokens=20, pad_token_id=self.engine.pad_id)

    def forward(self, batch: dict[str, Any]) -> None:
        with torch.inference_mode():
            self.model(**batch, use_cache=False, logits_to_keep=1)

    def run_scenario(self, tiles: int, fast: FastEngine) -> dict[str, Any]:
        a = self.args
        image = tiles > 0
        name = f"{tiles}-tile" if image else "text-only"
        items = self.items(tiles, a.batch, seed=1000 * tiles)
        flops = flops_per_classification(self.model, len(items[0].input_ids), image)
        res: dict[str, Any] = {"scenario": name, "prompt_tokens": len(items[0].input_ids), "batch": a.batch,
                               "est_tflop_per_classification": flops / 1e12}
        reps = a.reps

        def entry(key: str, per_call_items: int, ts: list[float]) -> None:
            if not ts:
                return
            med = statistics.median(ts)
            res[key] = {"calls": len(ts), "median_s": med, "classifications_per_s": per_call_items / med,
                        "peak_gib": self.peak()}
            if per_call_items == 1:
                q = np.percentile(np.array(ts) * 1000, [50, 99])
                res[key].update(p50_ms=float(q[0]), p99_ms=float(q[1]))

        # batch-1 latency
        one = items[:1]
        self.plain()
        self.reset_peak()
        entry("recipe_b1", 1, self.timed(lambda: self.recipe(one[0]), reps))
        self.reset_peak()
        entry("engine_b1", 1, self.timed(lambda: self.verdicts(self.engine, one), reps))
        self.patched()
        self.reset_peak()
        entry("fast_b1", 1, self.timed(lambda: self.verdicts(fast, one), reps))
        # batched throughput
        self.plain()
        if self.left() > 0:
            batch = self.engine.collate(items)
            self.reset_peak()
            entry("plain_forward", len(items), self.timed(lambda: self.forward(batch), reps))
            del batch
        if self.left() > 0:
            self.reset_peak()
            entry("engine", len(items), self.timed(lambda: self.verdicts(self.engine, items), reps))
        self.patched()
        if self.left() > 0:
            self.reset_peak()
            entry("fast", len(items), self.timed(lambda: self.verdicts(fast, items), reps))
        # candidate: right padding, no attention mask in the forward pass (exact)
        free = FastEngine.from_engine(self.engine, vision_batch_size=a.batch, mask_free_text=True)
        if self.left() > 0:
            self.reset_peak()
            entry("fast_mask_free_text", len(items), self.timed(lambda: self.verdicts(free, items), reps))
        if image and self.left() > 0:  # prompt + response classification of the same image, in one call
            pairs = self.items(tiles, a.batch, seed=1000 * tiles + 500, shared=True)
            self.reset_peak()
            entry("fast_prompt_response_pairs", len(pairs), self.timed(lambda: self.verdicts(fast, pairs), reps))
        if image and self.left() > 0:  # ... and as a server sees it: prompts, then responses in a later call
            kept = FastEngine.from_engine(self.engine, vision_batch_size=a.batch, keep_images=a.batch)

            def two_calls() -> None:
                kept.clear_image_cache()
                for part in (pairs[0::2], pairs[1::2]):
                    self.verdicts(kept, part)

            self.reset_peak()
            entry("fast_pairs_two_calls_kept", len(pairs), self.timed(two_calls, reps))
        fast_results: list[Any] | None = None  # the exact results on these inputs, computed once
        for option in ("real_tiles_only", "real_tokens_only"):
            if not (a.approx and image and self.left() > 0):
                break
            approx = FastEngine.from_engine(self.engine, vision_batch_size=a.batch, **{option: True})
            self.reset_peak()
            entry(f"fast_{option}_APPROX", len(items), self.timed(lambda approx=approx: self.verdicts(approx, items),
                                                                  reps))
            fast_results = fast_results or self.verdicts(fast, items)
            res[f"{option}_max_abs_dp_unsafe"] = max_abs_dp(fast_results, self.verdicts(approx, items))
        # exactness check on these inputs: FastEngine vs Engine
        if self.left() > 0:
            self.plain()
            e = self.verdicts(self.engine, items)
            self.patched()
            res["fast_vs_engine_max_abs_dp_unsafe"] = max_abs_dp(e, fast_results or self.verdicts(fast, items))
            res["mask_free_text_vs_engine_max_abs_dp_unsafe"] = max_abs_dp(e, self.verdicts(free, items))
            self.exact[name] = e
        # ceiling share and ratios
        for key in list(res):
            v = res[key]
            if isinstance(v, dict) and "classifications_per_s" in v:
                v["share_of_peak_989"] = v["classifications_per_s"] * flops / H200_BF16_DENSE_PEAK
                v["share_of_matmul_790"] = v["classifications_per_s"] * flops / H200_BF16_MATMUL_MEASURED
        ratios = {}
        cps = {k: v["classifications_per_s"] for k, v in res.items() if isinstance(v, dict) and
               "classifications_per_s" in v}
        for num, den in (("fast", "recipe_b1"), ("fast", "plain_forward"), ("fast", "engine"),
                         ("engine", "plain_forward"), ("fast_b1", "recipe_b1"), ("fast_prompt_response_pairs", "fast"),
                         ("fast_pairs_two_calls_kept", "fast"), ("fast_mask_free_text", "fast"),
                         ("fast_real_tiles_only_APPROX", "fast"), ("fast_real_tokens_only_APPROX", "fast")):
            if num in cps and den in cps:
                ratios[f"{num}/{den}"] = cps[num] / cps[den]
        res["ratios"] = ratios
        return res

    def run(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {
            "device": torch.cuda.get_device_name() if self.dev == "cuda" else "cpu",
            "dtype": str(self.dtype), "tiny": a.tiny, "init_s": self.init_s, "torch": torch.__version__,
            "params_b": sum(p.numel() for p in self.model.parameters()) / 1e9,
            "ceiling_constants": {"h200_bf16_dense_peak": H200_BF16_DENSE_PEAK,
                                  "h200_bf16_matmul_measured": H200_BF16_MATMUL_MEASURED},
            "note": "CPU run: plumbing only, not performance" if self.dev == "cpu" else "random bf16 weights",
            "scenarios": [],
        }
        print(json.dumps({k: v for k, v in out.items() if k != "scenarios"}), flush=True)
        fast = FastEngine.from_engine(self.engine, vision_batch_size=a.batch)
        for tiles in a.tiles:
            if self.left() <= 0:
                out["stopped"] = f"--max-seconds {a.max_seconds} reached before {tiles}-tile"
                break
            res = self.run_scenario(tiles, fast)
            out["scenarios"].append(res)
            print(json.dumps(res), flush=True)
        if a.quantize and self.left() > 0:
            try:  # last and optional: a failure here must not lose the exact measurements above
                out["quantized"] = self.run_quantized(a.quantize)
                print(json.dumps(out["quantized"]), flush=True)
            except Exception as err:
                out["quantized_error"] = f"{type(err).__name__}: {err}"
                print(f"--quantize {a.quantize} failed: {out['quantized_error']}", flush=True)
        return out

    def run_quantized(self, kind: str) -> list[dict[str, Any]]:
        """Last, since it changes the model in place: FastEngine throughput with ``kind`` quantization, and its
        distance from the exact results (meaningless on random weights: see bench/approx_agreement.py)."""
        from mmguard.fast import quantize_model

        a = self.args
        t0 = time.perf_counter()
        quantize_model(self.model, kind)
        rows: list[dict[str, Any]] = [{"quantize": kind, "quantize_s": time.perf_counter() - t0}]
        self.patched()
        q = FastEngine.from_engine(self.engine, vision_batch_size=a.batch)
        for tiles in a.tiles:
            if self.left() <= 0:
                break
            name = f"{tiles}-tile" if tiles else "text-only"
            items = self.items(tiles, a.batch, seed=1000 * tiles)
            self.reset_peak()
            ts = self.timed(lambda items=items: self.verdicts(q, items), a.reps)
            row: dict[str, Any] = {"scenario": name, "method": f"fast_{kind}_APPROX",
                                   "classifications_per_s": len(items) / statistics.median(ts),
                                   "peak_gib": self.peak()}
            if name in self.exact:
                row["max_abs_dp_unsafe_vs_exact_RANDOM_WEIGHTS"] = max_abs_dp(self.exact[name], self.verdicts(q, items))
            rows.append(row)
        return rows


def summary(out: dict[str, Any]) -> str:
    lines = [f"device {out['device']} ({out['note']})",
             f"{'scenario':<10} {'method':<30} {'cls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'peak GiB':>8} {'%989':>6}"]
    for s in out["scenarios"]:
        for k, v in s.items():
            if isinstance(v, dict) and "classifications_per_s" in v:
                pk = "-" if v["peak_gib"] is None else f"{v['peak_gib']:.1f}"
                lines.append(f"{s['scenario']:<10} {k:<30} {v['classifications_per_s']:>9.2f} "
                             f"{v.get('p50_ms', float('nan')):>8.1f} {v.get('p99_ms', float('nan')):>8.1f} "
                             f"{pk:>8} {100 * v['share_of_peak_989']:>6.1f}")
        for k, v in s["ratios"].items():
            lines.append(f"{s['scenario']:<10} ratio {k:<40} {v:.2f}x")
        for key in ("fast_vs_engine_max_abs_dp_unsafe", "mask_free_text_vs_engine_max_abs_dp_unsafe"):
            if key in s:
                lines.append(f"{s['scenario']:<10} {key.replace('_', ' ')}: {s[key]:.2e}")
    for row in out.get("quantized", [])[1:]:
        lines.append(f"{row['scenario']:<10} {row['method']:<30} {row['classifications_per_s']:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU plumbing check; numbers mean nothing)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32; 4 with --tiny)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement, after a warm-up")
    p.add_argument("--prompt-len", type=int, default=400)
    p.add_argument("--tiles", type=int, nargs="+", default=[4, 2, 1, 0], help="0 = text-only")
    p.add_argument("--approx", action="store_true",
                   help="also measure the real-tiles-only and real-tokens-only approximations")
    p.add_argument("--quantize", choices=("int8", "fp8"), default=None,
                   help="last: quantize the model in place and measure FastEngine again (an approximation)")
    p.add_argument("--max-seconds", type=float, default=540.0, help="stop starting new measurements after this")
    p.add_argument("--out", default="gpu_throughput.json")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 4 if args.tiny else 32
    out = Bench(args).run()
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(summary(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
