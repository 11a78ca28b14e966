"""The KL anchor's term: `token_kl_sum` over chunks of tokens equals the whole-batch formula, value and gradient,
and its memory beyond its input and its gradient does not grow with the number of tokens; the rows it is given
(`target_logits`) and the reference forward that feeds it."""

import json

import pytest
import torch
from helpers import tiny_gpt2
from torch.profiler import ProfilerActivity, profile

from hf_l2.output_anchor import OutputAnchor, token_kl_sum
from hf_l2.target_tokens import target_logits

VOCAB = 1000


def kl_written_out(policy, reference, tau):
    """τ²·Σ_rows Σ_v q·(log q − log p) with q = softmax(z₀/τ), p = softmax(z/τ), all rows at once, in fp32."""
    log_q = torch.log_softmax(reference.float() / tau, -1)
    log_p = torch.log_softmax(policy.float() / tau, -1)
    return (log_q.exp() * (log_q - log_p)).sum() * tau**2


def logits(rows, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(rows, VOCAB, generator=generator)).to(dtype)


def value_and_grad(kl_fn, policy, reference, upstream=1.0):
    policy = policy.detach().requires_grad_()
    value = kl_fn(policy, reference)
    (upstream * value).backward()
    return value.detach(), policy.grad


@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("chunk_rows", [1, 3, 10, 64, None])  # 3 does not divide 10; 64 > N: one chunk
def test_chunks_equal_the_whole_batch_formula(chunk_rows, tau):
    policy, reference = logits(10, 0), logits(10, 1)
    value, grad = value_and_grad(lambda p, r: token_kl_sum(p, r, tau, chunk_rows), policy, reference, 0.7)
    expected, expected_grad = value_and_grad(lambda p, r: kl_written_out(p, r, tau), policy, reference, 0.7)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)
    assert value.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast(dtype):
    policy, reference = logits(7, 0, dtype), logits(7, 1, dtype)
    value, grad = value_and_grad(lambda p, r: token_kl_sum(p, r, 2.0, 3), policy, reference)
    expected, expected_grad = value_and_grad(lambda p, r: kl_written_out(p.float(), r, 2.0), policy, reference)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad.to(dtype))  # the fp32 gradient, rounded once


def test_no_rows():
    value, grad = value_and_grad(lambda p, r: token_kl_sum(p, r, 2.0), logits(0, 0), logits(0, 1))
    assert value.item() == 0 and grad.shape == (0, VOCAB)


def test_the_reference_gets_no_gradient_and_no_grad_calls_work():
    policy, reference = logits(5, 0).requires_grad_(), logits(5, 1).requires_grad_()
    token_kl_sum(policy, reference, 1.0).backward()
    assert reference.grad is None and policy.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(token_kl_sum(policy, reference, 1.0), kl_written_out(policy, reference, 1.0))


def test_a_second_backward_is_refused_rather_than_scaled_twice():
    value = token_kl_sum(logits(5, 0).requires_grad_(), logits(5, 1), 1.0)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def peak_bytes_beyond_the_gradient(kl_fn, rows, tmp_path):
    """Most bytes allocated at once during forward and backward (torch.profiler's CPU allocator record), less the
    input's gradient, which every form returns. "Total Allocated" counts from before the record: the first event's
    own bytes are taken off it."""
    policy, reference = logits(rows, 0).requires_grad_(), logits(rows, 1)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        kl_fn(policy, reference).backward()
    trace = tmp_path / f"{rows}.json"
    prof.export_chrome_trace(str(trace))
    events = [e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    before = events[0]["Total Allocated"] - events[0]["Bytes"]
    peak = max(e["Total Allocated"] for e in events) - before
    return peak - policy.grad.numel() * policy.grad.element_size()


def test_peak_memory_is_bounded_by_the_chunk_not_the_tokens(tmp_path):
    chunk_rows, row_bytes = 4, VOCAB * 4
    chunked = [peak_bytes_beyond_the_gradient(lambda p, r: token_kl_sum(p, r, 2.0, chunk_rows), n, tmp_path)
               for n in (64, 512)]
    whole = [peak_bytes_beyond_the_gradient(lambda p, r: kl_written_out(p, r, 2.0), n, tmp_path) for n in (64, 512)]
    assert max(chunked) <= 8 * chunk_rows * row_bytes, chunked  # a few chunk-sized temporaries
    assert whole[1] > 4 * 512 * row_bytes and whole[1] > 6 * whole[0], whole  # several N × vocab tensors


@pytest.mark.parametrize("case", ["shifted here", "shifted by the collator", "encoder-decoder"])
def test_target_rows_are_the_masked_positions_with_their_gradient(case):
    logits = torch.randn(3, 6, 11, requires_grad=True)
    labels = torch.randint(11, (3, 6))
    labels[0, :2] = labels[2, 4] = -100
    if case == "shifted here":  # position t predicts labels[t + 1]
        rows = target_logits(logits, labels, None, shifts=True)
        expected = logits[:, :-1][labels[:, 1:] != -100]
    elif case == "shifted by the collator":
        rows = target_logits(logits, None, labels, shifts=True)
        expected = logits[labels != -100]
    else:
        rows = target_logits(logits, labels, None, shifts=False)
        expected = logits[labels != -100]
    assert torch.equal(rows, expected)
    upstream = torch.randn_like(rows)
    (got,) = torch.autograd.grad(rows, logits, upstream)
    (want,) = torch.autograd.grad(expected, logits, upstream)
    assert torch.equal(got, want)


def test_the_decoder_only_reference_forward_computes_no_loss():
    model = tiny_gpt2()
    ids = torch.randint(64, (2, 8))
    anchor = OutputAnchor(model, 1.0, 1.0)
    with_labels = anchor.reference_outputs(model, {"input_ids": ids, "labels": ids})
    assert with_labels.loss is None
    torch.testing.assert_close(with_labels.logits, anchor.reference_outputs(model, {"input_ids": ids}).logits)
