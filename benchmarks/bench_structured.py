"""What constrained decoding adds per output token, on the real vocabulary (151,936 logits, Qwen2's tokenizer).

    python benchmarks/bench_structured.py [--tokens 400] [--threads 1]

For each constraint a matcher is driven through whole outputs by random logits (a token is the argmax of masked
random logits, so every path the grammar allows can be taken); per token we time the three parts the engine runs:
`fill` (xgrammar computes the next-token bitmask), `apply` (the mask on the float32 logits row: xgrammar's CPU
kernel, and our plain-PyTorch reference path for comparison) and `accept` (the matcher rolls forward). Compile time
is per request (cached for a repeated schema) and reported separately. Needs no model weights: only the tokenizer,
written by qwen2vl.testing (the real Qwen2 vocabulary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "[0-9]{5}"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=400, help="tokens timed per constraint")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import xgrammar as xgr

    from qwen2vl.generate.structured import (
        Constraint,
        GrammarProcessor,
        apply_bitmask_reference,
        grammars_for,
    )
    from qwen2vl.processing.tokenizer import Tokenizer
    from qwen2vl.processing.tools import tool_call_grammar
    from qwen2vl.testing.tokenizer_files import write_tokenizer_files

    d = tempfile.mkdtemp()
    write_tokenizer_files(d)
    tokenizer = Tokenizer(f"{d}/tokenizer.json")
    vocab = 151936
    t0 = time.perf_counter()
    grammars = grammars_for(tokenizer, vocab, (151645, 151643))
    print(f"vocabulary table: {time.perf_counter() - t0:.3f} s once per process")
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
            },
        },
    }
    cases = {
        "json_schema (6 fields, nested)": Constraint.json_schema(SCHEMA),
        "json_object (any JSON)": Constraint.json_schema(None),
        "regex [A-Z]{3}-\\d{4}( [a-z]+){0,8}": Constraint("regex", r"[A-Z]{3}-\d{4}( [a-z]+){0,8}"),
        "tool_choice required (1 tool)": Constraint("structural_tag", tool_call_grammar([weather], "required")),
    }
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, c in cases.items():
        t0 = time.perf_counter()
        compiled = grammars.compile(c)
        compile_s = time.perf_counter() - t0
        fill, fast, ref, accept = [], [], [], []
        done = 0
        while done < args.tokens:
            p = GrammarProcessor(grammars, compiled)
            while done < args.tokens and not p.terminated:
                logits = torch.randn(1, vocab, generator=g)
                t0 = time.perf_counter()
                p.matcher.fill_next_token_bitmask(p.bitmask)
                t1 = time.perf_counter()
                masked = logits.clone()
                xgr.apply_token_bitmask_inplace(masked, p.bitmask)
                t2 = time.perf_counter()
                reference = apply_bitmask_reference(logits, p.bitmask)
                t3 = time.perf_counter()
                assert torch.equal(masked, reference)
                token = int(masked.argmax())
                t4 = time.perf_counter()
                p.accept(token)
                t5 = time.perf_counter()
                fill.append(t1 - t0)
                fast.append(t2 - t1)
                ref.append(t3 - t2)
                accept.append(t5 - t4)
                done += 1
        ms = lambda xs: 1e3 * statistics.median(xs)
        p99 = lambda xs: 1e3 * sorted(xs)[int(0.99 * (len(xs) - 1))]
        total = [a + b + c for a, b, c in zip(fill, fast, accept)]
        rows.append((name, 1e3 * compile_s, ms(fill), ms(fast), ms(ref), ms(accept), ms(total), p99(total)))
    print(
        "| constraint | compile ms | fill ms | apply ms (xgrammar) | apply ms (reference) | accept ms | "
        "total ms/token (median) | p99 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |")
    print(json.dumps({"threads": args.threads, "tokens_per_case": args.tokens}))


if __name__ == "__main__":
    main()
