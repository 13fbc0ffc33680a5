"""Token choice against transformers 4.57: its logits processors, the list `_get_logits_processor` builds from a
GenerationConfig, `_sample`'s softmax + multinomial draw, and GenerationConfig's reading of generation_config.json."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerationMixin

from qwen2vl.generate.sampling import SamplingParams, chooser, new_generator, process_logits, sample

V, PAD = 500, 499
# the official generation_config.json variants (7B-Instruct; the 2B mirror's), plus settings that exercise each
# processor on its own
OFFICIAL_7B = {
    "do_sample": True,
    "top_k": 1,
    "top_p": 0.001,
    "temperature": 0.01,
    "eos_token_id": [151645, 151643],
    "bos_token_id": 151643,
    "pad_token_id": 151643,
}
OFFICIAL_2B = {**OFFICIAL_7B, "temperature": 0.1, "repetition_penalty": 1.05}
CONFIGS = [
    OFFICIAL_7B,
    OFFICIAL_2B,
    {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05},
    {"do_sample": True, "temperature": 1.3, "top_k": None, "top_p": 0.5},
    {"do_sample": True},  # transformers' default top_k=50 applies
    {"do_sample": True, "top_k": 600, "top_p": 1.0, "temperature": 1.0},  # k beyond the vocabulary
    {"do_sample": False, "repetition_penalty": 1.2, "temperature": 0.3, "top_k": 5},  # warpers unused when greedy
    {},
]


class _Generator(GenerationMixin):
    """Just enough of a model for transformers to build its processor list."""


def hf_processors(config: dict) -> LogitsProcessorList:
    gc = GenerationConfig(**config)
    return _Generator()._get_logits_processor(
        generation_config=gc, input_ids_seq_length=40, device="cpu", model_kwargs={}
    )


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, V, generator=g) * 4
    logits[0, :20] = 2.5  # ties, some of them seen (penalised) and some not
    logits[1, 7] = -float("inf")
    logits[2, :] = logits[2, 0]  # a flat row: every token tied
    logits[3, 100:] = -float("inf")
    seen = torch.randint(0, V, (4, 40), generator=g)
    seen[1, :6] = PAD  # left padding: transformers penalises the pad id like any other
    seen[0, :10] = torch.arange(10)
    seen[3, -3:] = 7  # repeats
    return logits, seen


@pytest.mark.parametrize("config", CONFIGS)
def test_processed_logits_equal_transformers_processor_list(config):
    p = SamplingParams.from_generation_config(config)
    for seed in range(3):
        logits, seen = batch(seed)
        expected = hf_processors(config)(seen, logits.clone())
        assert torch.equal(process_logits(logits, seen, p), expected)


@pytest.mark.parametrize(
    "params",
    [
        dict(do_sample=True, temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.05),
        dict(do_sample=True, temperature=0.1, top_k=1, top_p=0.001, repetition_penalty=0.8),
        dict(do_sample=True, temperature=2.0, top_p=0.3),
        dict(do_sample=True, top_p=1e-8),  # the cumulative sum can reach 1 - top_p: min_tokens_to_keep matters
        dict(do_sample=False, repetition_penalty=1.2),
    ],
)
def test_processed_logits_equal_the_individual_processors(params):
    p = SamplingParams(**params)
    procs = [RepetitionPenaltyLogitsProcessor(p.repetition_penalty)]
    if p.do_sample:
        procs.append(TemperatureLogitsWarper(p.temperature))
        procs += [TopKLogitsWarper(p.top_k)] if p.top_k else []
        procs += [TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []
    logits, seen = batch(7)
    assert torch.equal(process_logits(logits, seen, p), LogitsProcessorList(procs)(seen, logits.clone()))


def hf_draws(config: dict, steps: list[tuple[torch.Tensor, torch.Tensor]], seed: int) -> list[torch.Tensor]:
    """transformers `_sample`: processors, softmax, torch.multinomial on the global generator."""
    procs, out = hf_processors(config), []
    torch.manual_seed(seed)
    for logits, seen in steps:
        scores = procs(seen, logits.clone())
        out.append(torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1))
    return out


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.get("do_sample")])
def test_draws_equal_transformers_sample_with_the_same_seed(config):
    steps = [(batch(s)[0] / 3, batch(s)[1]) for s in range(12)]  # flatter scores, so draws vary
    expected = hf_draws(config, steps, seed=1234)
    # seeded: our private generator replays torch.manual_seed(seed) + global draws
    choose = chooser(SamplingParams.from_generation_config(config, seed=1234))
    assert all(torch.equal(choose(lg, s), e) for (lg, s), e in zip(steps, expected))
    # unseeded: the global generator, exactly as transformers uses it
    choose = chooser(SamplingParams.from_generation_config(config))
    torch.manual_seed(1234)
    assert all(torch.equal(choose(lg, s), e) for (lg, s), e in zip(steps, expected))


def test_seeded_sampling_is_reproducible_and_varies():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0)) / 4
    seen = torch.zeros(3, 1, dtype=torch.long)
    p = SamplingParams(do_sample=True, seed=7)
    draws = lambda choose: torch.stack([choose(logits, seen) for _ in range(30)])  # noqa: E731
    first = draws(chooser(p))
    assert torch.equal(first, draws(chooser(p)))  # a fresh chooser replays the same stream
    assert len(first.unique()) > 10  # and the draws really are random
    assert not torch.equal(first, draws(chooser(p.with_(seed=8))))


def test_greedy_is_argmax_and_top_k_1_only_draws_among_the_maxima():
    logits, seen = batch(3)
    greedy_params = SamplingParams()
    assert torch.equal(chooser(greedy_params)(logits, seen), process_logits(logits, seen, greedy_params).argmax(-1))
    assert torch.equal(chooser(SamplingParams(do_sample=True, temperature=0))(logits, seen), logits.argmax(-1))
    official = SamplingParams.from_generation_config(OFFICIAL_2B)
    scores = process_logits(logits, seen, official)
    best = scores.max(-1, keepdim=True).values
    for seed in range(20):
        token = chooser(official.with_(seed=seed))(logits, seen)
        assert torch.equal(scores.gather(1, token[:, None]), best)  # on a tie (rows 0, 2) any maximum may come
    untied = torch.randn(2, V, generator=torch.Generator().manual_seed(5))
    want = process_logits(untied, seen[:2], official).argmax(-1)
    assert torch.equal(chooser(official.with_(seed=3))(untied, seen[:2]), want)


def test_sample_and_generator_helpers():
    scores = torch.tensor([[0.0, -float("inf"), 1.0], [-float("inf"), -float("inf"), 0.0]])
    assert sample(scores, SamplingParams()).tolist() == [2, 2]
    assert new_generator(SamplingParams()) is None and new_generator(SamplingParams(do_sample=True)) is None
    g = new_generator(SamplingParams(do_sample=True, seed=5))
    assert sample(scores, SamplingParams(do_sample=True), g)[1] == 2  # never a token at -inf
    with pytest.raises(ValueError, match=r"logits \(B, V\) and seen ids \(B, S\)"):
        process_logits(scores, torch.zeros(3, 1, dtype=torch.long), SamplingParams())


@pytest.mark.parametrize(
    "config",
    CONFIGS
    + [{"do_sample": True, "top_p": None, "temperature": None, "repetition_penalty": None, "eos_token_id": 151645}],
)
def test_generation_config_is_read_like_transformers(config):
    p, gc = SamplingParams.from_generation_config(config), GenerationConfig(**config)
    assert p.do_sample == bool(gc.do_sample)
    assert p.temperature == (gc.temperature if gc.temperature is not None else 1.0)
    assert p.top_k == (gc.top_k or 0) and p.top_p == (gc.top_p if gc.top_p is not None else 1.0)
    assert p.repetition_penalty == (gc.repetition_penalty if gc.repetition_penalty is not None else 1.0)
    eos = gc.eos_token_id
    assert p.stop_token_ids == ((151645, 151643) if eos is None else tuple(eos) if isinstance(eos, list) else (eos,))


def test_generation_config_overrides_and_validation():
    p = SamplingParams.from_generation_config(OFFICIAL_2B)
    assert p.do_sample and not p.greedy and p.top_k == 1 and p.temperature == 0.1 and p.repetition_penalty == 1.05
    assert p.stop_token_ids == (151645, 151643) and p.max_new_tokens == 256 and p.stop == ()
    assert SamplingParams.from_generation_config(OFFICIAL_2B, temperature=0).greedy
    assert SamplingParams.from_generation_config(OFFICIAL_2B, temperature=None) == p  # unset flags are ignored
    assert SamplingParams.from_generation_config({"max_new_tokens": 9}).max_new_tokens == 9
    assert not SamplingParams.from_generation_config({}).do_sample  # transformers' default: greedy
    assert SamplingParams.from_generation_config({}, temperature=0.8).do_sample  # asking for a temperature samples
    assert SamplingParams.from_generation_config({}, top_p=0.5, do_sample=False).greedy
    s = SamplingParams.from_generation_config({}, stop=["\n\n", "END"], stop_token_ids=[7])
    assert s.stop == ("\n\n", "END") and s.stop_token_ids == (7,) and hash(s)
    assert SamplingParams(stop="END").stop == ("END",)
    with pytest.raises(TypeError, match="unknown sampling parameters: \\['temprature'\\]"):
        SamplingParams.from_generation_config({}, temprature=0.5)
    bad = [
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-2), "top_k must be an integer >= 0"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)
    with pytest.raises(TypeError, match="stop must be a list of strings"):
        SamplingParams(stop=["ok", 3])
    with pytest.raises(TypeError, match="stop_token_ids must be non-negative integers"):
        SamplingParams(stop_token_ids=(-1,))
