"""Metrics over sign codes against slow python loops and simulations."""

import math

import pytest
import torch

from neuronlib import metrics
from neuronlib.probes.signs import NEGATIVE, NOT_RECORDED, POSITIVE, ZERO

pytestmark = pytest.mark.usefixtures("one_thread")


R, S, K = 6, 9, 5
SIGNED = (POSITIVE, NEGATIVE)
SYMBOLS = {".": NOT_RECORDED, "-": NEGATIVE, "0": ZERO, "+": POSITIVE}


def from_symbols(text):
    """Codes [R] from a string such as "+-0." (one record per character)."""
    return torch.tensor([SYMBOLS[c] for c in text], dtype=torch.uint8)


def random_codes(seed, shape=(R, S, K), weights=(0.1, 0.4, 0.3, 0.2)):
    generator = torch.Generator().manual_seed(seed)
    flat = torch.multinomial(
        torch.tensor(weights), math.prod(shape), replacement=True, generator=generator
    )
    return flat.reshape(shape).to(torch.uint8)


def history(codes, s, k):
    return [int(codes[r, s, k]) for r in range(codes.shape[0])]


def assert_close_nan(got, want, **kwargs):
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(
        got.nan_to_num(-1.0), want.nan_to_num(-1.0).to(got.dtype), **kwargs
    )


SEEDS = [0, 1, 2]


# --- sign consistency, categories, zero share


@pytest.mark.parametrize("seed", SEEDS)
def test_sign_consistency_matches_loop(seed):
    codes = random_codes(seed)
    want = torch.empty(S, K)
    for s in range(S):
        for k in range(K):
            h = history(codes, s, k)
            positive, negative = h.count(POSITIVE), h.count(NEGATIVE)
            total = positive + negative
            want[s, k] = max(positive, negative) / total if total else math.nan
    assert_close_nan(metrics.sign_consistency(codes), want)


@pytest.mark.parametrize("seed", SEEDS)
def test_categories_match_loop(seed):
    codes = random_codes(seed)
    want = torch.empty(S, K, dtype=torch.int8)
    for s in range(S):
        for k in range(K):
            h = history(codes, s, k)
            difference = h.count(POSITIVE) - h.count(NEGATIVE)
            want[s, k] = 1 if difference > 0 else -1 if difference < 0 else 0
    got = metrics.categories(codes)
    assert got.dtype == torch.int8
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", SEEDS)
def test_zero_share_matches_loop(seed):
    codes = random_codes(seed)
    want = torch.empty(S, K)
    for s in range(S):
        for k in range(K):
            h = history(codes, s, k)
            recorded = sum(1 for c in h if c != NOT_RECORDED)
            want[s, k] = h.count(ZERO) / recorded if recorded else math.nan
    assert_close_nan(metrics.zero_share(codes), want)


def test_edge_cases_give_nan_and_zero():
    # one sample, three neurons: never recorded; zero twice; + then -
    codes = torch.stack([from_symbols(".0+"), from_symbols(".0-")])[:, None, :]
    consistency = metrics.sign_consistency(codes)
    assert consistency[0, 0].isnan() and consistency[0, 1].isnan()
    assert consistency[0, 2] == 0.5
    assert metrics.categories(codes).tolist() == [[0, 0, 0]]
    zero = metrics.zero_share(codes)
    assert zero[0, 0].isnan() and zero[0, 1] == 1 and zero[0, 2] == 0


# --- class composition


def test_class_composition_matches_loop():
    generator = torch.Generator().manual_seed(3)
    categories = torch.randint(-1, 2, (40, 4), generator=generator).to(torch.int8)
    labels = torch.randint(0, 3, (40,), generator=generator)  # class 3 is empty
    got = metrics.class_composition(categories, labels, 4)
    assert got.shape == (4, 4, 3)
    for k in range(4):
        for c in range(4):
            members = [s for s in range(40) if labels[s] == c]
            for slot, value in enumerate((1, -1, 0)):
                if not members:
                    assert got[k, c, slot].isnan()
                    continue
                count = sum(1 for s in members if categories[s, k] == value)
                assert got[k, c, slot].item() == pytest.approx(count / len(members))
    torch.testing.assert_close(got[:, :3].sum(-1), torch.ones(4, 3))


def test_class_composition_refuses_bad_input():
    categories = torch.zeros(5, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match="labels"):
        metrics.class_composition(categories, torch.zeros(4), 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metrics.class_composition(categories, torch.tensor([0, 1, 2, 3, 0]), 3)


# --- the control


def exact_expectation(n, p):
    return sum(
        math.comb(n, x) * p**x * (1 - p) ** (n - x) * max(x, n - x) / n
        for x in range(n + 1)
    )


def test_binomial_consistency_matches_exact_sums():
    rates = torch.tensor([0.0, 0.1, 0.5, 0.73, 1.0, math.nan])
    table = metrics.binomial_consistency(rates, 9)
    assert table.shape == (10, 6)
    assert table[0].isnan().all() and table[:, 5].isnan().all()
    for n in range(1, 10):
        for j, p in enumerate(rates[:5].tolist()):
            assert table[n, j].item() == pytest.approx(exact_expectation(n, p))


@pytest.mark.parametrize("n, p", [(1, 0.3), (4, 0.5), (7, 0.62), (20, 0.9)])
def test_binomial_consistency_matches_monte_carlo(n, p):
    generator = torch.Generator().manual_seed(n)
    draws = 200_000
    x = torch.binomial(
        torch.full((draws,), float(n)), torch.full((draws,), p), generator=generator
    )
    share = torch.maximum(x, n - x) / n
    standard_error = share.std().item() / math.sqrt(draws)
    table = metrics.binomial_consistency(torch.tensor([p]), n)
    assert abs(table[n, 0].item() - share.mean().item()) < 5 * standard_error + 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_control_consistency_matches_loop(seed):
    codes = random_codes(seed)
    rates = []
    for k in range(K):
        signs = [c for s in range(S) for c in history(codes, s, k) if c in SIGNED]
        rates.append(signs.count(POSITIVE) / len(signs) if signs else math.nan)
    want = torch.empty(S, K)
    for s in range(S):
        for k in range(K):
            n = sum(1 for c in history(codes, s, k) if c in SIGNED)
            want[s, k] = exact_expectation(n, rates[k]) if n else math.nan
    got = metrics.control_consistency(codes)
    assert got.dtype == torch.float32
    assert_close_nan(got, want)
    rate = metrics.positive_rate(codes)
    torch.testing.assert_close(rate, torch.tensor(rates, dtype=torch.float64))


def independent_codes(seed, records=7, samples=20_000, rates=(0.2, 0.5, 0.85)):
    """Signs drawn independently with a fixed positive rate per neuron; some zeros."""
    generator = torch.Generator().manual_seed(seed)
    shape = (records, samples, len(rates))
    positive = torch.rand(shape, generator=generator) < torch.tensor(rates)
    codes = torch.where(positive, POSITIVE, NEGATIVE).to(torch.uint8)
    zero = torch.rand(shape, generator=generator) < 0.25
    return codes.masked_fill(zero, ZERO)


@pytest.mark.parametrize("method", ["binomial", "shuffle"])
def test_control_equals_consistency_when_signs_are_independent(method):
    codes = independent_codes(0)
    generator = torch.Generator().manual_seed(1)
    observed = metrics.sign_consistency(codes)
    control = metrics.control_consistency(codes, method=method, generator=generator)
    for k in range(codes.shape[2]):
        observed_k = observed[:, k].nanmean().item()
        control_k = control[:, k].nanmean().item()
        assert control_k == pytest.approx(observed_k, abs=0.005)


def test_control_stays_low_when_samples_keep_their_sign():
    generator = torch.Generator().manual_seed(0)
    positive = torch.rand(1, 500, 4, generator=generator) < 0.5
    codes = torch.where(positive, POSITIVE, NEGATIVE).to(torch.uint8).expand(8, -1, -1)
    assert (metrics.sign_consistency(codes) == 1).all()
    for method in ("binomial", "shuffle"):
        control = metrics.control_consistency(codes, method=method, generator=generator)
        assert control.mean() < 0.75


def test_shuffle_keeps_each_records_rates():
    codes = random_codes(0, shape=(5, 300, 3))
    generator = torch.Generator().manual_seed(0)
    seen = {}
    original_randperm = torch.randperm

    def spying_randperm(n, generator=None):
        seen.setdefault("perms", []).append(original_randperm(n, generator=generator))
        return seen["perms"][-1]

    torch.randperm = spying_randperm
    try:
        got = metrics.control_consistency(codes, method="shuffle", generator=generator)
    finally:
        torch.randperm = original_randperm
    assert len(seen["perms"]) == 5
    shuffled = torch.stack([codes[r, p] for r, p in enumerate(seen["perms"])])
    for value in range(4):
        assert torch.equal((shuffled == value).sum(1), (codes == value).sum(1))
    assert_close_nan(got, metrics.sign_consistency(shuffled))


def test_control_refuses_unknown_method():
    with pytest.raises(ValueError, match="'exact'"):
        metrics.control_consistency(random_codes(0), method="exact")


# --- settle record


def settle_reference(h):
    nonzero = [(r, c) for r, c in enumerate(h) if c in SIGNED]
    if not nonzero:
        return -1
    final = nonzero[-1][1]
    settled = nonzero[-1][0]
    for r, c in reversed(nonzero):
        if c != final:
            break
        settled = r
    return settled


@pytest.mark.parametrize("seed", SEEDS)
def test_settle_record_matches_loop(seed):
    codes = random_codes(seed, shape=(8, S, K))
    want = torch.tensor(
        [[settle_reference(history(codes, s, k)) for k in range(K)] for s in range(S)]
    )
    assert torch.equal(metrics.settle_record(codes), want)


def test_settle_record_examples():
    histories = {
        "++++": 0,
        "-+.+0": 1,
        "+-0.++": 4,
        ".0-0-": 2,
        ".00..": -1,
        "+-+--": 3,
    }
    for text, want in histories.items():
        codes = from_symbols(text)[:, None, None]
        assert metrics.settle_record(codes).item() == want, text


# --- input checks


@pytest.mark.parametrize(
    "codes, match",
    [
        (torch.rand(3, 2, 2), "integer"),
        (torch.full((3, 2, 2), 7, dtype=torch.uint8), "0..3"),
        (torch.full((3, 2, 2), -1, dtype=torch.int64), "0..3"),
    ],
    ids=["float", "packed-bytes", "signs"],
)
def test_bad_codes_are_refused(codes, match):
    for function in (
        metrics.sign_consistency,
        metrics.categories,
        metrics.zero_share,
        metrics.control_consistency,
        metrics.settle_record,
    ):
        with pytest.raises(ValueError, match=match):
            function(codes)


def test_metrics_accept_trailing_shapes_and_int_codes():
    codes = random_codes(0).long()
    flat = metrics.sign_consistency(codes.reshape(R, S * K))
    assert_close_nan(flat.reshape(S, K), metrics.sign_consistency(codes))
