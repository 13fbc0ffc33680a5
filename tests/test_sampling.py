"""Token choice against transformers 4.57's logits processors, and stop strings."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.generate.sampling import SamplingParams, chooser, process_logits
from qwen2vl.generate.stopping import StopMatcher


def reference(logits, seen, p: SamplingParams):
    from transformers import GenerationConfig, LogitsProcessorList
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    procs = LogitsProcessorList()
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if not p.greedy:
        if p.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            procs.append(TopPLogitsWarper(p.top_p))
    assert GenerationConfig  # imported to keep the oracle's version pinned with the rest
    return procs(seen, logits.clone())


@pytest.mark.parametrize("params", [
    dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.05),
    dict(do_sample=True, temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=1.05),
    dict(do_sample=True, temperature=1.3, top_k=0, top_p=0.5),
    dict(do_sample=False, repetition_penalty=1.2),
    dict(do_sample=True, top_k=40),
])
def test_processed_logits_equal_reference(params):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 500, generator=g) * 4
    logits[0, :20] = 2.5  # ties
    logits[1, 7] = -float("inf")
    seen = torch.randint(0, 500, (3, 40), generator=g)
    seen[2, :5] = 499  # repeated, like left padding
    p = SamplingParams(**params)
    assert torch.equal(process_logits(logits, seen, p), reference(logits, seen, p))


def test_generation_config_semantics():
    official = {"do_sample": True, "top_k": 1, "top_p": 0.001, "temperature": 0.1, "repetition_penalty": 1.05,
                "eos_token_id": [151645, 151643], "bos_token_id": 151643, "pad_token_id": 151643}
    p = SamplingParams.from_generation_config(official)
    assert p.do_sample and p.top_k == 1 and p.repetition_penalty == 1.05 and p.stop_token_ids == (151645, 151643)
    assert SamplingParams.from_generation_config(official, temperature=0).greedy
    assert not SamplingParams.from_generation_config({}).do_sample  # transformers' default: greedy
    assert SamplingParams.from_generation_config({}, temperature=0.8).do_sample  # asking for a temperature samples
    with pytest.raises(TypeError, match="unknown sampling parameters"):
        SamplingParams.from_generation_config({}, temprature=0.5)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax():
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    seen = torch.zeros(2, 1, dtype=torch.long)
    p = SamplingParams(do_sample=True, temperature=1.0, seed=7)
    a = [chooser(p)(logits, seen) for _ in range(1)][0]
    draws = lambda: torch.stack([c(logits, seen) for c in [chooser(p)] for _ in range(20)])  # noqa: E731
    assert torch.equal(draws(), draws()) and a.shape == (2,)
    assert torch.equal(chooser(SamplingParams())(logits, seen), logits.argmax(-1))
    # top_k=1 sampling is greedy whatever the seed
    assert torch.equal(chooser(SamplingParams(do_sample=True, top_k=1, seed=3))(logits, seen), logits.argmax(-1))


@pytest.mark.parametrize("pieces, stops, shown", [
    (["Hello wor", "ld. STO", "P here"], ["STOP"], "Hello world. "),
    (["abc"], ["x"], "abc"),
    (["ST", "OP"], ["STOP"], ""),
    (["one\n\n", "two"], ["\n\n", "two"], "one"),
    (["日本", "語の停", "止です"], ["停止"], "日本語の"),
    (["almost ST", "ill going"], ["STOP"], "almost STill going"),
])
def test_stop_strings(pieces, stops, shown):
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces) + m.flush()
    assert out == shown
