"""Fine-tuning against the references: our loss and every gradient against transformers'
Qwen2VLForConditionalGeneration (float32, labels masked with -100), LoRA against PEFT (same adapter weights -> same
logits and gradients; each side loads the other's files), merged checkpoints, the schedule against transformers',
and the training loop (accumulation, checkpointing, resume)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from model_inputs import build
from processing_fixtures import make_video, noise_image
from qwen2vl.lora import AdapterError, lora_modules
from qwen2vl.processing import Processor
from qwen2vl.serve.config import ServerConfig
from qwen2vl.train import (
    IGNORE,
    LoRAConfig,
    TrainConfig,
    Trainer,
    apply_lora,
    causal_lm_loss,
    collate,
    encode,
    gradient_checkpointing,
    load_adapter,
    lr_lambda,
    merge_lora,
    read_jsonl,
    save_adapter,
    save_checkpoint,
)
from qwen2vl.train.loss import model_loss, output_weight
from qwen2vl.weights import load_model, our_name

GRAD_RTOL = 1e-5  # per parameter: max |ours - reference| <= GRAD_RTOL * max |reference|


def _ours(path):
    model = load_model(path, dtype=torch.float32, progress=False, cpu_kernels=False)
    return model.train()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _check_grads(ours, theirs: dict, parity_report, what: str, names=None) -> None:
    worst, checked = 0.0, 0
    for name, p in ours.named_parameters():
        if names is not None and name not in names:
            continue
        assert p.grad is not None, f"{name}: no gradient"
        rel = _rel(p.grad, theirs[name])
        assert rel <= GRAD_RTOL, f"{what}: {name} gradient differs by {rel:.3g} (relative)"
        worst, checked = max(worst, rel), checked + 1
    assert checked == len(theirs if names is None else names), (checked, len(theirs))
    parity_report(f"train: {what}, worst gradient (rel.)", worst, GRAD_RTOL)


def _hf_grads(hf, prefix_map=our_name) -> dict:
    return {prefix_map(n): p.grad for n, p in hf.named_parameters() if p.grad is not None}


# -- data ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    noise_image(84, 56, seed=1).save(d / "a.png")
    noise_image(60, 100, seed=2).save(d / "b.png")
    make_video(d / "clip.mp4", frames=8, fps=4, size=(64, 48))
    return d


def _conversations(media):
    small = {"min_pixels": 3136, "max_pixels": 3136 * 6}
    return [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(media / "a.png"), **small},
                    {"type": "text", "text": "What is this?"},
                ],
            },
            {"role": "assistant", "content": "A picture of noise."},
        ],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there, how are you today?"},
            {"role": "assistant", "content": "Fine."},
            {"role": "user", "content": "And now?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Still fine, thank you."}]},
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": str(media / "clip.mp4"), "nframes": 4, **small},
                    {"type": "text", "text": "Describe"},
                    {"type": "image", "image": str(media / "b.png"), **small},
                ],
            },
            {"role": "assistant", "content": "Colours move."},
        ],
    ]


def test_labels_cover_assistant_turns_with_im_end_and_newline(tiny_ckpt, media):
    proc = Processor.from_pretrained(tiny_ckpt)
    ex = encode(proc, _conversations(media)[1])
    ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
    trained = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert [lab for lab in labels if lab != IGNORE] == trained
    assert (
        proc.tokenizer.decode(trained, skip_special_tokens=False)
        == "Fine.<|im_end|>\nStill fine, thank you.<|im_end|>\n"
    )
    # everything before the first answer (system, user, the assistant header) is masked
    text = proc.tokenizer.decode(ids[: labels.index(next(lab for lab in labels if lab != IGNORE))], False)
    assert text.endswith("<|im_start|>assistant\n") and "Hello there" in text


def test_labels_when_an_answer_starts_with_newlines(tiny_ckpt):
    """The tokenizer merges the header's newline with the answer's leading ones; the turn is still found."""
    proc = Processor.from_pretrained(tiny_ckpt)
    ex = encode(proc, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\nlist:\n- a"}])
    trained = [t for t, lab in zip(ex.input_ids.tolist(), ex.labels.tolist()) if lab != IGNORE]
    assert proc.tokenizer.decode(trained, skip_special_tokens=False) == "list:\n- a<|im_end|>\n"


def test_data_errors_are_named(tiny_ckpt, tmp_path):
    from qwen2vl.processing.errors import InputError

    proc = Processor.from_pretrained(tiny_ckpt)
    with pytest.raises(InputError, match="last message must be the assistant"):
        encode(proc, [{"role": "user", "content": "hi"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}], "images": []}\n')
    with pytest.raises(InputError, match=r"unsupported fields \['images'\]"):
        read_jsonl(bad)
    bad.write_text("{not json\n")
    with pytest.raises(InputError, match="line 1"):
        read_jsonl(bad)


def test_jsonl_paths_are_relative_to_the_file(tmp_path, media):
    (tmp_path / "pics").mkdir()
    noise_image(56, 56).save(tmp_path / "pics" / "x.png")
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": "pics/x.png"}]},
            {"role": "assistant", "content": "ok"},
        ]
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n\n")
    [conv] = read_jsonl(tmp_path / "d.jsonl")
    assert conv[0]["content"][0]["image"] == str(tmp_path / "pics" / "x.png")


# -- loss and gradients against transformers -------------------------------------------------------------------
def test_loss_and_every_gradient_match_transformers_on_a_mixed_batch(tiny_ckpt, media, hf_model_factory, parity_report):
    """Images, a video and a text-only multi-turn row, right-padded, through our data pipeline; all weights train,
    the vision tower included."""
    proc = Processor.from_pretrained(tiny_ckpt)
    batch = collate([encode(proc, c) for c in _conversations(media)], proc.pad_id)
    assert batch["attention_mask"].min() == 0 and "pixel_values_videos" in batch and "pixel_values" in batch
    ours = _ours(tiny_ckpt).requires_grad_(True)
    loss = model_loss(ours, batch)  # the trainer's path: only trained positions projected to the vocabulary
    loss.backward()
    hf = hf_model_factory(tiny_ckpt, attn="eager")
    hf.train().zero_grad()
    ref = hf(**batch).loss
    ref.backward()
    parity_report("train: mixed-batch loss (rel.)", abs(loss.item() - ref.item()) / ref.item(), 1e-6)
    _check_grads(ours, _hf_grads(hf), parity_report, "mixed batch, full")
    hf.zero_grad()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_match_on_random_batches(tmp_path, seed, hf_model_factory, parity_report):
    """Random odd-sized checkpoints (tied and untied), random grids and label masks, right padding."""
    from qwen2vl.testing.checkpoint import make_config, write_checkpoint

    g = torch.Generator().manual_seed(seed)
    tied = seed % 2 == 1
    path = write_checkpoint(tmp_path / "ck", make_config(tie_word_embeddings=tied), seed=seed, tokenizer=False)

    def grid(kind):
        t = 1 if kind == "image" else 2 * int(torch.randint(1, 3, (1,), generator=g))
        h, w = (2 * int(torch.randint(1, 5, (1,), generator=g)) for _ in range(2))
        return (kind, (t, h, w))

    rows = [
        [int(torch.randint(3, 9, (1,), generator=g)), grid("image"), 5],
        [int(torch.randint(10, 30, (1,), generator=g))],
        [4, grid("video"), 3, grid("image"), 6],
    ]
    batch = build(rows, seed=seed)
    # build() pads on the left; move every row's tokens to the right (training pads on the right)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for r in range(ids.shape[0]):
        n = int(mask[r].sum())
        ids[r] = torch.cat([ids[r, -n:], ids[r, :-n]]) if n < ids.shape[1] else ids[r]
        mask[r] = torch.arange(ids.shape[1]) < n
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.5, ids, IGNORE)
    labels[mask == 0] = IGNORE
    ours = _ours(path).requires_grad_(True)
    inputs = dict(batch)
    model_loss(ours, {**inputs, "labels": labels}).backward()
    hf = hf_model_factory(path, attn="eager").train()
    hf(**inputs, labels=labels).loss.backward()
    _check_grads(ours, _hf_grads(hf), parity_report, f"random batch seed {seed}{' tied' if tied else ''}")


def test_trained_rows_loss_equals_the_plain_loss(tiny_tied_ckpt, parity_report):
    """The trainer's loss projects only trained positions to the vocabulary; the plain path projects all of them."""
    batch = build([[14, ("image", (1, 4, 6)), 9], [25]], seed=8)
    labels = torch.where(torch.arange(batch["input_ids"].shape[1]) % 4 == 1, batch["input_ids"], IGNORE)
    labels[:, :16] = IGNORE
    grads, losses = [], []
    for fast in (False, True):
        model = _ours(tiny_tied_ckpt).requires_grad_(True)
        loss = model_loss(model, {**batch, "labels": labels}, 7) if fast else causal_lm_loss(model(**batch), labels, 7)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    worst = max(_rel(g, grads[0][n]) for n, g in grads[1].items())
    parity_report("train: trained-rows loss vs plain loss, gradients (rel.)", worst, GRAD_RTOL)


@pytest.mark.parametrize("tied", [True, False])
def test_an_output_vocabulary_over_zero_rows_is_the_reference_loss(tiny_tied_ckpt, tiny_ckpt, tied):
    """`model_loss(vocab=...)` (the demo model's training) on a model whose output rows outside `vocab` are zero
    equals the cross entropy over the whole vocabulary, and its gradient for every weight but those rows, which it
    freezes at zero; a label outside the vocabulary is refused by name. The reference here is float64: the float32
    softmax over 151,936 columns is itself off by 4e-5 of this loss (measured), ours by 2e-6."""
    batch = build([[14, ("image", (1, 4, 6)), 9], [25]], seed=9)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    labels = torch.where(torch.arange(batch["input_ids"].shape[1]) % 3 == 1, batch["input_ids"], IGNORE)
    labels[:, :10] = IGNORE
    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    # the inputs' rows stay (a tied model's inputs must be in its output vocabulary), and a few others
    vocab = torch.tensor(sorted({*batch["input_ids"].flatten().tolist(), *targets[targets != IGNORE].tolist(), 5}))
    grads, losses = [], []
    for fast in (False, True):
        model = _ours(tiny_tied_ckpt if tied else tiny_ckpt).double().requires_grad_(True)
        with torch.no_grad():
            weight = output_weight(model)
            outside = torch.ones(weight.shape[0], dtype=torch.bool)
            outside[vocab] = False
            weight[outside] = 0
        if fast:
            loss = model_loss(model, {**batch, "labels": labels}, 7, vocab=vocab)
        else:
            rows = targets != IGNORE
            loss = F.cross_entropy(model(**batch)[rows], targets[rows], reduction="sum") / 7
        loss.backward()
        losses.append(loss.item())
        if fast:  # the rows outside are frozen at zero: no gradient reaches them
            assert not bool(output_weight(model).grad[outside].any())
        output_weight(model).grad[outside] = 0  # (the reference's would move them)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert max(_rel(g, grads[0][n]) for n, g in grads[1].items()) <= GRAD_RTOL
    short = vocab[vocab != int(targets[targets != IGNORE][0])]
    with pytest.raises(ValueError, match="outside the output vocabulary"):
        model_loss(model, {**batch, "labels": labels}, vocab=short)


def test_the_trainer_refuses_an_output_vocabulary_over_non_zero_rows(tiny_ckpt, tmp_path):
    data = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]]
    config = TrainConfig(lora=None, output_vocab=(1, 2, 3), max_steps=1)
    with pytest.raises(ValueError, match="output rows of every other token to be zero"):
        Trainer(tiny_ckpt, data, tmp_path / "out", config, progress=False)


def test_a_tied_model_refuses_inputs_outside_its_output_vocabulary(tmp_path):
    """Their rows are the zero output rows: training on them would move those rows and break the loss's premise."""
    from safetensors.torch import load_file, save_file

    from qwen2vl.testing.checkpoint import make_config, write_checkpoint

    path = write_checkpoint(tmp_path / "tied", make_config(tie_word_embeddings=True), seed=2)
    data = [[{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "ok"}]]
    ids = encode(Processor.from_pretrained(path), data[0], "c").input_ids.tolist()
    dropped = Processor.from_pretrained(path).tokenizer.encode(" there")[0]
    vocab = tuple(sorted(set(ids) - {dropped}))
    weights = load_file(path / "model.safetensors")
    keep = torch.zeros(weights["model.embed_tokens.weight"].shape[0], dtype=torch.bool)
    keep[list(vocab)] = True
    weights["model.embed_tokens.weight"][~keep] = 0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    trainer = Trainer(path, data, tmp_path / "out", TrainConfig(lora=None, output_vocab=vocab), progress=False)
    with pytest.raises(ValueError, match=rf"input tokens \[{dropped}\] are outside output_vocab"):
        trainer._batch(data, "micro-batch 0")


def test_checkpointing_and_accumulation_keep_the_gradients(tiny_tied_ckpt, parity_report):
    batch = build([[12, ("image", (1, 4, 6)), 7], [20], [3, ("video", (2, 4, 4)), 9]], seed=5)
    labels = torch.where(torch.arange(batch["input_ids"].shape[1]) % 3 == 0, batch["input_ids"], IGNORE)
    labels[batch["attention_mask"] == 0] = IGNORE
    labels[:, :12] = IGNORE  # nothing predicted from a left-padding slot

    def grads(checkpointing: bool, micro: bool):
        model = _ours(tiny_tied_ckpt).requires_grad_(True)
        gradient_checkpointing(model, checkpointing)
        if not micro:
            causal_lm_loss(model(**batch), labels).backward()
        else:  # three micro-batches of one row, each normalised by the tokens of the whole step
            total = int((labels[:, 1:] != IGNORE).sum())
            pix, vid = batch["pixel_values"], batch["pixel_values_videos"]
            parts = [
                {"pixel_values": pix, "image_grid_thw": batch["image_grid_thw"]},
                {},
                {"pixel_values_videos": vid, "video_grid_thw": batch["video_grid_thw"]},
            ]
            for r, extra in enumerate(parts):
                causal_lm_loss(
                    model(batch["input_ids"][r : r + 1], batch["attention_mask"][r : r + 1], **extra),
                    labels[r : r + 1],
                    total,
                ).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain = grads(False, False)
    for name, g in grads(True, False).items():
        assert torch.equal(g, plain[name]), f"checkpointing changed {name}'s gradient"
    worst = max(_rel(g, plain[n]) for n, g in grads(False, True).items())
    parity_report("train: 3 accumulated micro-batches vs one batch (rel.)", worst, GRAD_RTOL)


def test_schedules_match_transformers():
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    for name, ref in (
        ("cosine", get_cosine_schedule_with_warmup),
        ("linear", get_linear_schedule_with_warmup),
        ("constant", get_constant_schedule_with_warmup),
    ):
        for warmup, total in ((0, 10), (3, 17), (5, 5)):
            opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            sched = ref(opt, warmup) if name == "constant" else ref(opt, warmup, total)
            ours = lr_lambda(name, warmup, total)
            for step in range(total + 2):
                assert ours(step) == pytest.approx(sched.lr_lambdas[0](step), abs=1e-12), (name, warmup, step)


# -- LoRA against PEFT ---------------------------------------------------------------------------------------------
def _randomize_lora(model, seed):
    """A trained-looking adapter: A at its initial scale (1/sqrt(in)), B no longer zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) / m.lora_A.in_features**0.5)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


@pytest.mark.parametrize("vision", [False, True])
def test_peft_loads_our_adapter_same_logits_and_lora_gradients(
    tiny_ckpt, tmp_path, vision, hf_model_factory, parity_report
):
    import peft
    import transformers

    config = LoRAConfig(r=3, alpha=7.0, target_modules=("q_proj", "v_proj", "down_proj", "o_proj"), vision=vision)
    ours = _ours(tiny_ckpt)
    names = apply_lora(ours, config, seed=0)
    _randomize_lora(ours, 1)
    save_adapter(ours, tmp_path / "ad", str(tiny_ckpt))
    base = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_ckpt, dtype=torch.float32, attn_implementation="eager"
    )
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ad", is_trainable=True).train()
    peft_names = {
        our_name(n.removeprefix("base_model.model.").removesuffix(".lora_A.default"))
        for n, _ in theirs.named_modules()
        if n.endswith(".lora_A.default")
    }
    assert peft_names == set(names) and any(n.startswith("visual.") for n in names) == vision

    batch = build([[6, ("image", (1, 4, 6)), 9], [15], [2, ("video", (2, 4, 4)), 4]], seed=3)
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE)
    labels[:, :16] = IGNORE
    logits = ours(**batch)
    ref = theirs(**batch)
    mask = batch["attention_mask"].bool()
    with torch.no_grad(), theirs.disable_adapter():
        assert float((theirs(**batch).logits - ref.logits)[mask].abs().max()) > 1e-2, "the adapter must matter"
    diff = float((logits - ref.logits).detach()[mask].abs().max())
    parity_report(f"train: PEFT loads our adapter, logits (vision={vision})", diff, 1e-4)
    causal_lm_loss(logits, labels).backward()
    causal_lm_loss(ref.logits, labels).backward()
    their_grads = {}
    for n, p in theirs.named_parameters():
        if p.grad is not None:
            stem = n.removeprefix("base_model.model.").replace(".default", "")
            module, _, rest = stem.partition(".lora_")
            their_grads[f"{our_name(module)}.lora_{rest}"] = p.grad
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == set(their_grads)
    _check_grads(ours, their_grads, parity_report, f"LoRA vs PEFT (vision={vision})", names=trainable)


def test_we_load_peft_adapter_and_match_its_logits(tiny_ckpt, tmp_path, parity_report):
    import peft
    import transformers

    base = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_ckpt, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = peft.LoraConfig(
        r=5, lora_alpha=11, target_modules=["k_proj", "gate_proj", "up_proj"], init_lora_weights=False, use_rslora=True
    )
    theirs = peft.get_peft_model(base, cfg).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = _ours(tiny_ckpt).eval()
    names = load_adapter(ours, tmp_path / "peft")
    assert len(names) == 3 * 2
    batch = build([[5, ("image", (1, 6, 4)), 8], [3, ("video", (4, 4, 4)), 2]], seed=7)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        diff = float((ours(**batch) - theirs(**batch).logits)[mask].abs().max())
        plain = float((_ours(tiny_ckpt).eval()(**batch) - ours(**batch))[mask].abs().max())
    assert plain > 1e-2, "the adapter must change the logits for this test to mean anything"
    parity_report("train: our load of a PEFT adapter, logits", diff, 1e-4)


def test_unsupported_adapter_features_are_refused(tiny_ckpt, tmp_path):
    ours = _ours(tiny_ckpt)
    apply_lora(ours, LoRAConfig(r=2))
    save_adapter(ours, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    for key, value in (
        ("use_dora", True),
        ("bias", "all"),
        ("modules_to_save", ["lm_head"]),
        ("rank_pattern", {"q_proj": 4}),
    ):
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(AdapterError, match=key):
            load_adapter(_ours(tiny_ckpt), tmp_path / "ad")
    with pytest.raises(AdapterError, match="not an adapter directory"):
        load_adapter(ours, tmp_path)


def test_merged_checkpoint_equals_the_adapter_and_loads_in_transformers(
    tiny_ckpt, tmp_path, hf_model_factory, parity_report
):
    ours = _ours(tiny_ckpt).eval()
    apply_lora(ours, LoRAConfig(r=4, alpha=8.0, vision=True), seed=0)
    _randomize_lora(ours, 2)
    batch = build([[7, ("image", (1, 4, 4)), 5], [11]], seed=1)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        adapted = ours(**batch)
        save_checkpoint(ours, tiny_ckpt, tmp_path / "merged")
        assert not lora_modules(ours)
        merged = load_model(tmp_path / "merged", progress=False)(**batch)
        hf = hf_model_factory(tmp_path / "merged", attn="eager")(**batch).logits
    parity_report("train: merged checkpoint vs adapter, logits", float((merged - adapted)[mask].abs().max()), 1e-4)
    parity_report("train: merged checkpoint, ours vs transformers", float((merged - hf)[mask].abs().max()), 1e-4)


def test_merge_refuses_to_overwrite_the_checkpoint_it_reads(tiny_ckpt):
    model = _ours(tiny_ckpt).eval()  # its weights may be views of the files a save would truncate
    before = {p.name: p.stat().st_mtime_ns for p in tiny_ckpt.iterdir()}
    with pytest.raises(ValueError, match="loaded from"):
        save_checkpoint(model, tiny_ckpt, tiny_ckpt)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_ckpt.iterdir()} == before


def test_merge_lora_in_memory_equals_adapter(tiny_tied_ckpt):
    model = _ours(tiny_tied_ckpt).eval()
    apply_lora(model, LoRAConfig(r=2, alpha=3.0), seed=1)
    _randomize_lora(model, 3)
    batch = build([[9]], seed=2)
    with torch.no_grad():
        a = model(**batch)
        merge_lora(model)
        b = model(**batch)
    assert not lora_modules(model)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


# -- the training loop ---------------------------------------------------------------------------------------------
def _write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


def test_finetune_lowers_the_loss_and_resume_repeats_the_same_steps(tiny_ckpt, media, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _conversations(media))
    cfg = TrainConfig(
        lora=LoRAConfig(r=4, alpha=8.0, dropout=0.1),
        max_steps=4,
        batch_size=2,
        grad_accum=1,
        lr=5e-3,
        warmup_steps=1,
        save_steps=2,
        seed=3,
    )
    straight = Trainer(tiny_ckpt, data, tmp_path / "a", cfg, eval_data=data, progress=False)
    before = straight.evaluate()
    result = straight.train()
    assert result.steps == 4 and result.eval_loss < before
    assert (tmp_path / "a" / "checkpoint-2" / "optimizer.pt").exists()
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()

    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")  # as if stopped there
    resumed = Trainer(tiny_ckpt, data, tmp_path / "b", cfg, progress=False)
    assert resumed.resume()
    resumed.train()
    a = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), f"resume changed {name}"


def test_full_finetune_writes_a_checkpoint_transformers_loads(tiny_ckpt, media, tmp_path, hf_model_factory):
    data = _write_jsonl(tmp_path / "train.jsonl", _conversations(media)[:2])
    cfg = TrainConfig(lora=None, max_steps=2, lr=1e-3, gradient_checkpointing=True, grad_accum=2)
    trainer = Trainer(tiny_ckpt, data, tmp_path / "full", cfg, progress=False)
    assert not any(p.requires_grad for p in trainer.model.visual.parameters())
    vision_before = {n: p.clone() for n, p in trainer.model.visual.named_parameters()}
    trainer.train()
    for n, p in trainer.model.visual.named_parameters():
        assert torch.equal(p, vision_before[n]), "the frozen vision tower changed"
    batch = build([[5, ("image", (1, 4, 4)), 6]], seed=4)
    trained = trainer.model.eval()
    with torch.no_grad():
        ref = hf_model_factory(tmp_path / "full", attn="eager")(**batch).logits
        assert float((trained(**batch) - ref).abs().max()) < 1e-4
        assert float((_ours(tiny_ckpt).eval()(**batch) - ref).abs().max()) > 1e-3  # it did train


# -- the command line ----------------------------------------------------------------------------------------------
def test_cli_finetune_then_run_with_adapter_equals_run_on_the_merged_checkpoint(tiny_ckpt, media, tmp_path, capsys):
    from qwen2vl.cli import main

    data = _write_jsonl(tmp_path / "train.jsonl", _conversations(media))
    out = tmp_path / "adapter"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(tiny_ckpt),
                "--data",
                str(data),
                "--output",
                str(out),
                "--max-steps",
                "2",
                "--lr",
                "0.01",
                "--lora-rank",
                "4",
                "--eval-data",
                str(data),
                "--save-steps",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "adapter_config.json").exists() and (out / "checkpoint-1" / "trainer_state.json").exists()
    assert main(["merge", "--model", str(tiny_ckpt), "--adapter", str(out), "--output", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    answers = []
    for args in (
        ["--model", str(tiny_ckpt), "--adapter", str(out)],
        ["--model", str(tmp_path / "m")],
        ["--model", str(tiny_ckpt)],
    ):
        assert main(["run", *args, "--prompt", "Say something", "--max-new-tokens", "12"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0] != answers[2]


def test_cli_refuses_a_directory_without_adapter_files(tiny_ckpt, tmp_path, capsys):
    from qwen2vl.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--model", str(tiny_ckpt), "--adapter", str(tmp_path), "--prompt", "x"])
    assert "not an adapter directory" in capsys.readouterr().err


def test_adapter_on_bf16_weights_through_the_cpu_kernels(tmp_path):
    """An adapter on a bf16 checkpoint (the CPU path then stores its linear pieces compactly) moves the logits as
    the same adapter on the float32 model does."""
    from qwen2vl.testing.checkpoint import make_config, write_checkpoint

    cfg = make_config(tie_word_embeddings=True)
    f32 = write_checkpoint(tmp_path / "f32", cfg, seed=4, tokenizer=False)
    bf16 = write_checkpoint(tmp_path / "bf16", cfg, seed=4, tokenizer=False, dtype=torch.bfloat16)
    model = _ours(f32)
    apply_lora(model, LoRAConfig(r=8, alpha=16.0), seed=0)
    _randomize_lora(model, 5)
    save_adapter(model, tmp_path / "ad")
    batch = build([[6, ("image", (1, 4, 4)), 7]], seed=3)
    with torch.no_grad():
        ref = load_model(f32, progress=False, adapter=tmp_path / "ad")(**batch)
        fast = load_model(bf16, progress=False, adapter=tmp_path / "ad")(**batch)
        plain = load_model(bf16, progress=False)(**batch)
    assert float((fast - ref).abs().max()) < 0.25 * float((plain - ref).abs().max())


def test_bad_data_is_refused_before_the_model_loads(tiny_ckpt, tmp_path, monkeypatch):
    from qwen2vl.processing.errors import InputError
    from qwen2vl.train import trainer as trainer_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for bad data")

    monkeypatch.setattr(trainer_module, "load_model", no_load)
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    missing = [
        {"role": "user", "content": [{"type": "image", "image": str(tmp_path / "nope.png")}]},
        {"role": "assistant", "content": "x"},
    ]
    with pytest.raises(InputError, match=r"training data, conversation 1: .*nope\.png"):
        Trainer(tiny_ckpt, [good, missing], tmp_path / "o", progress=False)
    with pytest.raises(InputError, match="eval data, conversation 0: .*assistant"):
        Trainer(tiny_ckpt, [good], tmp_path / "o", eval_data=[good[:1]], progress=False)


def test_resume_without_a_checkpoint_is_an_error(tiny_ckpt, tmp_path):
    from qwen2vl.train import finetune

    data = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    with pytest.raises(ValueError, match="nothing to resume"):
        finetune(tiny_ckpt, data, tmp_path / "o", TrainConfig(max_steps=1), resume=True, progress=False)


def test_serve_with_adapter_answers_as_the_pipeline_with_it(tiny_ckpt, tmp_path):
    import openai

    from qwen2vl.cli import build_parser
    from qwen2vl.pipeline import load
    from qwen2vl.serve.server import build_server, serve_in_thread

    model = _ours(tiny_ckpt)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0), seed=0)
    _randomize_lora(model, 6)
    save_adapter(model, tmp_path / "ad")
    srv = build_server(
        ServerConfig.from_args(
            build_parser().parse_args(
                [
                    "serve",
                    "--model",
                    str(tiny_ckpt),
                    "--adapter",
                    str(tmp_path / "ad"),
                    "--served-model-name",
                    "tuned",
                    "--max-model-len",
                    "512",
                    "--kv-cache-memory",
                    "256MiB",
                ]
            )
        )
    )
    uv, base = serve_in_thread(srv, header_timeout_s=2.0)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model="tuned", messages=[{"role": "user", "content": "Hi there"}], temperature=0, max_tokens=10
        )
    finally:
        uv.should_exit = True
    conversation = [{"role": "user", "content": "Hi there"}]
    tuned = load(str(tiny_ckpt), progress=False, adapter=str(tmp_path / "ad")).chat(conversation, max_new_tokens=10)
    plain = load(str(tiny_ckpt), progress=False).chat(conversation, max_new_tokens=10)
    assert r.choices[0].message.content == tuned != plain


def test_side_by_side_adapters_give_each_row_its_own(tiny_ckpt, tmp_path):
    """MultiLoRALinear over a batch whose rows name adapter 0, 1, none and 0 gives each row what LoRALinear
    with that adapter (or the bare layer) gives it alone."""
    from qwen2vl.lora import MultiLoRALinear
    from qwen2vl.model.adapters import adapters_for_rows

    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(24, 16)
    pairs = [(torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g), 2.0) for _ in range(2)]
    multi = MultiLoRALinear(base)
    for i, (a, b, s) in enumerate(pairs):
        multi.add(i, a, b, s)
    x = torch.randn(4, 5, 24, generator=g)
    with torch.no_grad(), adapters_for_rows([0, 1, -1, 0]):
        y = multi(x)
    with torch.no_grad():
        for row, adapter in enumerate([0, 1, -1, 0]):
            want = base(x[row : row + 1])
            if adapter >= 0:
                a, b, s = pairs[adapter]
                want = want + (x[row : row + 1] @ a.T @ b.T) * s
            torch.testing.assert_close(y[row : row + 1], want, rtol=1e-6, atol=1e-6)
        assert torch.equal(multi(x), base(x))  # outside adapters_for_rows: the bare layer


def test_serve_several_adapters_by_model_name(tiny_ckpt, tmp_path):
    """--lora-modules: requests for the base model and for two adapters, sent at once (decoded in one batch),
    each answered as a pipeline with that adapter alone (or none) answers; /v1/models lists all three; a
    vision adapter cannot be served side by side."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from qwen2vl.cli import build_parser
    from qwen2vl.lora import AdapterError
    from qwen2vl.pipeline import load
    from qwen2vl.serve.server import build_server, serve_in_thread

    adapters = {}
    for name, seed in (("alpha", 6), ("beta", 7)):
        model = _ours(tiny_ckpt)
        apply_lora(model, LoRAConfig(r=4, alpha=8.0), seed=0)
        _randomize_lora(model, seed)
        adapters[name] = str(save_adapter(model, tmp_path / name))
    argv = ["serve", "--model", str(tiny_ckpt), "--served-model-name", "base", "--kv-cache-memory", "64MiB"]
    argv += ["--max-model-len", "512", "--lora-modules", *(f"{n}={d}" for n, d in adapters.items())]
    srv = build_server(ServerConfig.from_args(build_parser().parse_args(argv)))
    uv, url = serve_in_thread(srv, header_timeout_s=2.0)
    prompts = ["Hi there", "Tell me about cats and dogs"]
    asked = [(name, text) for name in ("base", "alpha", "beta") for text in prompts]

    def ask(name_text):
        name, text = name_text
        body = {"model": name, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 8}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        return r.json()["choices"][0]["message"]["content"]

    try:
        with ThreadPoolExecutor(len(asked)) as pool:
            got = dict(zip(asked, pool.map(ask, asked)))
        listed = httpx.get(url + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"]) for m in listed] == [("base", None), ("alpha", "base"), ("beta", "base")]
        r = httpx.post(
            url + "/v1/chat/completions", json={"model": "gamma", "messages": [{"role": "user", "content": "x"}]}
        )
        assert r.status_code == 404 and "'base', 'alpha', 'beta'" in r.json()["error"]["message"]
    finally:
        uv.should_exit = True
    for name in ("base", "alpha", "beta"):
        pipe = load(str(tiny_ckpt), progress=False, adapter=adapters.get(name))
        for text in prompts:
            want = pipe.chat([{"role": "user", "content": text}], max_new_tokens=8)
            assert got[(name, text)] == want, (name, text)
    assert len({got[(n, prompts[1])] for n in ("base", "alpha", "beta")}) == 3  # the adapters change the answer
    vision = _ours(tiny_ckpt)
    apply_lora(vision, LoRAConfig(r=4, alpha=8.0, vision=True), seed=0)
    save_adapter(vision, tmp_path / "v")
    with pytest.raises(AdapterError, match="adapts the vision tower .* serve it alone with --adapter"):
        load(str(tiny_ckpt), progress=False, adapters=[str(tmp_path / "v")])


def test_full_finetune_resume_repeats_the_same_steps(tiny_tied_ckpt, tmp_path):
    import shutil

    from qwen2vl.testing import tokenizer_files

    ckpt = tmp_path / "ck"
    shutil.copytree(tiny_tied_ckpt, ckpt)
    tokenizer_files.write_tokenizer_files(ckpt)
    tokenizer_files.write_preprocessor_config(ckpt)
    data = [
        [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i} " * i}]
        for i in range(1, 5)
    ]
    cfg = TrainConfig(lora=None, max_steps=3, batch_size=2, lr=1e-3, save_steps=1, weight_decay=0.1, seed=2)
    straight = Trainer(ckpt, data, tmp_path / "a", cfg, progress=False)
    straight.train()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = Trainer(ckpt, data, tmp_path / "b", cfg, progress=False)
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    b = dict(resumed.model.named_parameters())
    for name, value in straight.model.named_parameters():
        assert torch.equal(value, b[name]), f"resume changed {name}"
