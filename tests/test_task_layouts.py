"""The fine-tuning tasks' layouts (xfusion.model.sequence: I2I, VQA) through the one model path:
the clean source image is context, only the target image gets the flow loss, only the answer gets
the text loss, and the KV-cached samplers serve both layouts."""

from __future__ import annotations

import pytest
import torch

from test_sample import PIXEL_LATENTS, trained_like
from xfusion import sample
from xfusion.model import Sample, SpecialIds
from xfusion.model.mask import attention_mask
from xfusion.model.sequence import IGNORE, build_batch

IDS = SpecialIds(bos=1, eos=2, pad=0, boi=3, eoi=4)
P = 4  # 4x4x4 latents, patch 2


def lat(g):
    return torch.randn(4, 4, 4, generator=g)


def task_samples(seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [Sample("i2i", [], lat(g), 0.6, prompt_ids=[5, 6, 7], source_latents=lat(g)),
            Sample("t2i", [8, 9], lat(g), 0.4),
            Sample("vqa", [10, 11], lat(g), 0.0, prompt_ids=[12, 13, 14]),
            Sample("i2i", [], lat(g), 0.3, prompt_ids=[15], source_latents=lat(g),
                   drop_caption=True),
            Sample("i2t", [16, 17, 18], lat(g), 0.0)]


def test_i2i_and_vqa_rows_follow_the_documented_layouts():
    batch = build_batch(task_samples(), IDS, patch_size=2)
    pad = [0] * P
    i2i = [1, 3, *pad, 4, 5, 6, 7, 3, *pad, 4]
    vqa = [1, 3, *pad, 4, 12, 13, 14, 10, 11, 2]
    assert batch.input_ids[0, :len(i2i)].tolist() == i2i
    assert batch.input_ids[2, :len(vqa)].tolist() == vqa
    dropped = [1, 3, *pad, 4, 3, *pad, 4]  # the instruction dropped, the source kept
    assert batch.input_ids[3, :len(dropped)].tolist() == dropped
    # the source (span 1) and target (span 2) of I2I; one image (span 1) elsewhere
    assert batch.span_ids[0, 2:2 + P].eq(1).all() and batch.span_ids[0, 11:11 + P].eq(2).all()
    assert batch.source_mask[0].nonzero().squeeze(1).tolist() == list(range(2, 2 + P))
    assert batch.target_mask[0].nonzero().squeeze(1).tolist() == list(range(11, 11 + P))
    assert (batch.target_mask.sum(1) == P).all()
    assert (batch.image_mask.sum(1) == torch.tensor([2 * P, P, P, 2 * P, P])).all()
    assert not batch.source_mask[[1, 2, 4]].any()
    assert torch.equal(batch.source_latents[0], task_samples()[0].source_latents)
    # text targets: VQA's answer + eos (from the last question token on), I2T's caption + eos
    q_end = 2 + P + 3  # the last question token predicts the first answer token
    assert batch.text_targets[2, q_end:q_end + 3].tolist() == [10, 11, 2]
    assert (batch.text_targets[2] != IGNORE).sum() == 3
    assert (batch.text_targets[[0, 1, 3]] == IGNORE).all()
    assert (batch.text_targets[4] != IGNORE).sum() == 4
    assert batch.dm_weight.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_batches_without_tasks_are_built_as_before(mixed_samples):
    batch = build_batch(mixed_samples(), IDS, patch_size=2)
    assert batch.source_mask is None and batch.source_latents is None
    assert torch.equal(batch.target_mask, batch.image_mask)
    assert torch.equal(batch.span_ids, batch.image_mask.long())


def test_the_source_is_context_it_sees_neither_the_instruction_nor_the_target():
    batch = build_batch(task_samples(), IDS, patch_size=2)
    mask = attention_mask(batch.span_ids, batch.valid)[0, 0]  # row 0: I2I, (L, L)
    source, target = batch.source_mask[0], batch.target_mask[0]
    instruction = torch.zeros_like(source)
    instruction[2 + P + 1:2 + P + 4] = True
    assert not mask[source][:, target | instruction].any()
    assert mask[source][:, source].all()  # bidirectional within the source
    assert mask[target][:, source | instruction | target].all()


def test_only_the_target_image_gets_the_flow_loss(tiny_xfusion):
    model = trained_like(tiny_xfusion("dual_tower")).train()
    samples = [s for s in task_samples() if s.task == "i2i"]
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    batch = model.build_batch(samples, noise=noise)
    loss = model.compute_loss(batch)
    # the loss is the velocity error on the target slots, recomputed from the hidden states
    h, _ = model._forward_batch(batch)
    v = model.velocity(h[batch.target_mask].view(2, P, -1), (4, 4), batch.noisy_latents, batch.t)
    expected = (v - batch.velocity_target).pow(2).mean()
    assert torch.allclose(loss.dm_loss, expected, rtol=1e-5)
    assert loss.ar_loss == 0
    # the source conditions the target: another source changes the loss
    other = [Sample(s.task, s.caption_ids, s.latents, s.t, prompt_ids=s.prompt_ids,
                    source_latents=-s.source_latents) for s in samples]
    assert not torch.isclose(model.compute_loss(model.build_batch(other, noise=noise)).dm_loss,
                             loss.dm_loss)
    # the loss trains the image input: through the target's and the source's tokens
    loss.loss.backward()
    assert model.image_io.patch_embed.weight.grad.abs().sum() > 0


def test_the_source_hidden_states_do_not_depend_on_the_target(tiny_xfusion):
    model = trained_like(tiny_xfusion("dual_tower"))
    samples = [s for s in task_samples() if s.task == "i2i"][:1]
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    hidden = []
    for target in (samples[0].latents, -samples[0].latents):
        s = Sample("i2i", [], target, 0.6, prompt_ids=[5, 6, 7],
                   source_latents=samples[0].source_latents)
        batch = model.build_batch([s], noise=noise)
        with torch.no_grad():
            h, _ = model._forward_batch(batch)
        hidden.append((h[batch.source_mask], h[batch.target_mask]))
    assert torch.allclose(hidden[0][0], hidden[1][0], atol=1e-6)
    assert not torch.allclose(hidden[0][1], hidden[1][1])


@pytest.mark.parametrize("arch", ["dual_tower", "single_tower"])
def test_i2i_sampling_with_kv_cache_equals_recomputing(arch, tiny_xfusion):
    model = trained_like(tiny_xfusion(arch, PIXEL_LATENTS))
    g = torch.Generator().manual_seed(5)
    sources = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    prompts = [[5, 6, 7], [8]]
    cached = sample.generate_images(model, prompts, 3, 2.0, noise=noise, sources=sources)
    full = sample.generate_images(model, prompts, 3, 2.0, noise=noise, sources=sources,
                                  kv_cache=False)
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5)
    other = sample.generate_images(model, prompts, 3, 2.0, noise=noise, sources=-sources)
    assert not torch.allclose(cached, other)  # the source conditions the output
    alone = sample.generate_images(model, prompts[1:], 3, 2.0, noise=noise[1:],
                                   sources=sources[1:])
    assert torch.allclose(cached[1:], alone, atol=1e-5)  # left padding changes nothing


def test_vqa_answers_with_kv_cache_equal_recomputing_and_depend_on_the_question(tiny_xfusion):
    model = trained_like(tiny_xfusion("dual_tower", PIXEL_LATENTS))
    latents = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    questions = [[5, 6, 7, 8], [9]]
    cached = sample.generate_captions(model, latents, 8, questions=questions)
    full = sample.generate_captions(model, latents, 8, questions=questions, kv_cache=False)
    assert cached == full
    alone = sample.generate_captions(model, latents[1:], 8, questions=questions[1:])
    assert alone == cached[1:]
