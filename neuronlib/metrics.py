"""Pure functions over gradient-sign records.

Every function takes sign codes ``[R, S, K]`` (records, samples, neurons) as made by
:meth:`neuronlib.probes.GradientSignRecorder.codes`: ``0`` not recorded, ``1``
negative, ``2`` zero, ``3`` positive (see :mod:`neuronlib.probes.signs`), and reduces
over the records, the first axis. Any trailing shape works in place of ``[S, K]``.

The words used throughout:

- a sample's **non-zero records** at a neuron are the records where the gradient was
  positive or negative (zero and not-recorded entries are left out);
- its **majority sign** is the more frequent sign among them;
- its **sign consistency** is the share of its non-zero records that carry the
  majority sign, between 0.5 and 1;
- the neuron's two **categories** are the samples whose majority sign is positive
  and those whose majority sign is negative.

The functions loop over records, never over samples or neurons, so that no temporary
is larger than one record.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from neuronlib.probes.signs import NEGATIVE, NOT_RECORDED, POSITIVE, ZERO

CONTROL_METHODS = ("binomial", "shuffle")


def _check_codes(codes: Tensor, *, min_dim: int = 1) -> Tensor:
    """Return the codes as a ``uint8`` tensor after checking them."""
    if not isinstance(codes, Tensor):
        codes = torch.as_tensor(codes)
    if codes.dim() < min_dim or codes.is_floating_point() or codes.is_complex():
        raise ValueError(
            f"codes must be an integer tensor [R, S, K] (records first), got dtype "
            f"{codes.dtype} and shape {tuple(codes.shape)}; pass recorder.codes(layer)."
        )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 3):
        raise ValueError(
            f"codes must lie in 0..3, got values from {int(codes.min())} to "
            f"{int(codes.max())}; pass recorder.codes(layer), not packed bytes or "
            "signs."
        )
    return codes.to(torch.uint8)


def _sign_counts(codes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per entry of ``codes[0]``: numbers of positive, negative, zero, recorded."""

    def zeros() -> Tensor:
        return torch.zeros(codes.shape[1:], dtype=torch.int32, device=codes.device)

    positive, negative, zero, recorded = zeros(), zeros(), zeros(), zeros()
    for record in codes:
        positive += record == POSITIVE
        negative += record == NEGATIVE
        zero += record == ZERO
        recorded += record != NOT_RECORDED
    return positive, negative, zero, recorded


def _share(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` as float32, NaN where the denominator is 0."""
    share = numerator.float() / denominator.clamp(min=1).float()
    return share.masked_fill(denominator == 0, math.nan)


def sign_consistency(codes: Tensor) -> Tensor:
    """Share of each sample's non-zero records that carry its majority sign.

    Args:
        codes: Sign codes ``[R, S, K]``.

    Returns:
        float32 ``[S, K]`` in ``[0.5, 1]``: ``max(P, N) / (P + N)`` with ``P`` and
        ``N`` the numbers of positive and negative records; NaN where the sample
        has no non-zero record at the neuron.

    Raises:
        ValueError: If ``codes`` are not integer codes in ``0..3``.
    """
    positive, negative, _, _ = _sign_counts(_check_codes(codes))
    return _share(torch.maximum(positive, negative), positive + negative)


def categories(codes: Tensor) -> Tensor:
    """Each sample's majority sign at each neuron: the neuron's two categories.

    Args:
        codes: Sign codes ``[R, S, K]``.

    Returns:
        int8 ``[S, K]``: ``+1`` where positive records outnumber negative ones,
        ``-1`` where negative ones do, ``0`` on a tie or with no non-zero record.

    Raises:
        ValueError: If ``codes`` are not integer codes in ``0..3``.
    """
    positive, negative, _, _ = _sign_counts(_check_codes(codes))
    return torch.sign(positive - negative).to(torch.int8)


def zero_share(codes: Tensor) -> Tensor:
    """Share of each sample's recorded entries where the gradient was exactly zero.

    For the pre-activation of a ReLU layer these are the records where the ReLU
    was off for the sample (the neuron did not "see" it).

    Args:
        codes: Sign codes ``[R, S, K]``.

    Returns:
        float32 ``[S, K]`` in ``[0, 1]``; NaN where the sample was never recorded.

    Raises:
        ValueError: If ``codes`` are not integer codes in ``0..3``.
    """
    _, _, zero, recorded = _sign_counts(_check_codes(codes))
    return _share(zero, recorded)


def class_composition(categories: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """How each class's samples fall into each neuron's categories.

    Args:
        categories: int ``[S, K]`` from :func:`categories` (+1, -1 or 0).
        labels: int ``[S]`` class of each sample, in ``[0, num_classes)``, in the
            same sample order (``labels = y[recorder.sample_index]``, for a
            ``y`` indexed by dataset index).
        num_classes: ``C``.

    Returns:
        float32 ``[K, C, 3]``: for neuron ``k`` and class ``c``, the shares of the
        class's samples in the positive category (``[..., 0]``), in the negative
        category (``[..., 1]``) and in neither (``[..., 2]``: a tie or no non-zero
        record). The three sum to 1; NaN for a class without samples.

    Raises:
        ValueError: If the shapes do not match or a label is out of range.
    """
    categories = torch.as_tensor(categories)
    labels = torch.as_tensor(labels, device=categories.device)
    if categories.dim() != 2 or labels.shape != categories.shape[:1]:
        raise ValueError(
            f"Expected categories [S, K] and labels [S], got shapes "
            f"{tuple(categories.shape)} and {tuple(labels.shape)}; pass "
            "labels = y[recorder.sample_index]."
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"Labels must lie in [0, {num_classes}), got values from "
            f"{int(labels.min())} to {int(labels.max())}; check num_classes."
        )

    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).float()  # [S, C]
    per_class = onehot.sum(0)  # [C]
    counts = torch.stack(
        [(categories == value).float().T @ onehot for value in (1, -1, 0)], dim=-1
    )  # [K, C, 3]

    shares = counts / per_class.clamp(min=1)[None, :, None]
    return shares.masked_fill((per_class == 0)[None, :, None], math.nan)


def positive_rate(codes: Tensor) -> Tensor:
    """Each neuron's share of positive signs among its non-zero records.

    Pooled over all samples and records: the rate that
    :func:`control_consistency` gives its independent signs.

    Args:
        codes: Sign codes ``[R, S, K]``.

    Returns:
        float64 ``[K]``; NaN for a neuron without any non-zero record.

    Raises:
        ValueError: If ``codes`` are not integer codes in ``0..3`` with at least a
            record and a sample axis.
    """
    positive, negative, _, _ = _sign_counts(_check_codes(codes, min_dim=2))
    return _pooled_rate(positive, negative)


def _pooled_rate(positive: Tensor, negative: Tensor) -> Tensor:
    """Positive share over the sample axis; NaN where a neuron has no sign."""
    return positive.sum(0).double() / (positive + negative).sum(0).double()


def binomial_consistency(rate: Tensor, max_records: int) -> Tensor:
    """Expected sign consistency of independent signs, for each number of records.

    With ``X ~ Binomial(n, p)`` positive signs among ``n`` non-zero records, the
    consistency is ``max(X, n - X) / n`` and its expectation is::

        sum over x = 0..n of  C(n, x) p^x (1 - p)^(n - x) * max(x, n - x) / n

    computed exactly in float64 (through log-probabilities) for ``n = 0..max``.

    Args:
        rate: ``[...]`` positive rates ``p`` in ``[0, 1]`` (NaN allowed).
        max_records: The largest ``n``.

    Returns:
        float64 ``[max_records + 1, ...]``: entry ``[n, ...]`` is the expectation
        for ``n`` records; NaN for ``n = 0`` and where ``p`` is NaN.
    """
    rate = torch.as_tensor(rate, dtype=torch.float64)
    table = torch.full((max_records + 1, *rate.shape), math.nan, dtype=torch.float64)
    x_shape = (-1,) + (1,) * rate.dim()

    for n in range(1, max_records + 1):
        x = torch.arange(n + 1, dtype=torch.float64).reshape(x_shape)
        log_choose = math.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
        # xlogy gives 0 * log(0) = 0, so p = 0 and p = 1 come out right.
        log_pmf = log_choose + torch.xlogy(x, rate) + torch.xlogy(n - x, 1 - rate)
        majority = torch.maximum(x, n - x) / n
        table[n] = (log_pmf.exp() * majority).sum(0)
    return table


def control_consistency(
    codes: Tensor,
    *,
    method: str = "binomial",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The sign consistency that signs without memory of the sample would give.

    The control keeps each neuron's rates of positive and negative signs and
    breaks any link between a sample and its signs over training. Sign
    consistency clearly above it means that samples keep their sign for a reason,
    not because a neuron's signs are mostly of one kind (a neuron pushed up on 90%
    of all entries has a high consistency by chance alone), nor because few
    records make a high share easy (one non-zero record always gives 1).

    ``method="binomial"`` (the default; exact and deterministic): each of a
    sample's ``n`` non-zero records is taken positive with the neuron's pooled
    positive rate ``p`` (:func:`positive_rate`), independently, and the result is
    the expected consistency ``E[max(X, n - X) / n]``, ``X ~ Binomial(n, p)``, with
    the sample's own ``n`` (see :func:`binomial_consistency`).

    ``method="shuffle"``: each record's rows (samples) are permuted, independently
    from record to record, and the consistency of the shuffled codes is returned.
    This keeps each record's exact rates at each neuron (also their drift over
    training), but a sample's number of non-zero records changes with the
    shuffle, and the result is one random draw rather than an expectation, so
    compare distributions, not entries. (Permuting each sample's records instead
    would change nothing: consistency does not depend on the order of records.)

    Args:
        codes: Sign codes ``[R, S, K]``.
        method: ``"binomial"`` or ``"shuffle"``.
        generator: Random numbers for ``"shuffle"``.

    Returns:
        float32 ``[S, K]``; NaN where the sample has no non-zero record at the
        neuron (and, for the binomial control, at neurons without any).

    Raises:
        ValueError: If ``method`` is unknown or ``codes`` are not integer codes in
            ``0..3`` with at least a record and a sample axis.
    """
    if method not in CONTROL_METHODS:
        raise ValueError(f"Invalid method {method!r}; use one of {CONTROL_METHODS}.")
    codes = _check_codes(codes, min_dim=2)

    if method == "shuffle":
        return sign_consistency(shuffle_records(codes, generator=generator))

    positive, negative, _, _ = _sign_counts(codes)
    nonzero = (positive + negative).long().cpu()  # [S, K]
    table = binomial_consistency(_pooled_rate(positive, negative).cpu(), len(codes))
    return table.gather(0, nonzero).float().to(codes.device)


def shuffle_records(
    codes: Tensor, *, generator: torch.Generator | None = None
) -> Tensor:
    """Permute the samples of each record independently: the control's codes.

    Each record keeps exactly its signs at every neuron (so each neuron's rates of
    positive, negative and zero signs, also their drift over training), but a row no
    longer follows one sample through training. Any structure that a measure finds
    in the real codes and not in these comes from samples keeping their signs.

    Args:
        codes: Sign codes ``[R, S, K]`` (records, samples, neurons).
        generator: Random numbers for the permutations.

    Returns:
        Codes ``[R, S, K]`` on the same device.

    Raises:
        ValueError: If ``codes`` has fewer than two dimensions.
    """
    if codes.dim() < 2:
        raise ValueError(
            f"codes must be [R, S, K] (records, samples, ...), got shape "
            f"{tuple(codes.shape)}; pass recorder.codes(layer)."
        )
    num_samples = codes.shape[1]

    shuffled = [
        record[torch.randperm(num_samples, generator=generator).to(codes.device)]
        for record in codes
    ]
    return torch.stack(shuffled) if shuffled else codes.clone()


def settle_record(codes: Tensor) -> Tensor:
    """The record from which each sample's sign never changes again.

    Zero and not-recorded entries are skipped: the sign of a sample at a neuron is
    its last non-zero sign so far. The settle record is the first record of the
    final run of equal non-zero signs, so every non-zero record from there on has
    the final sign, and the one before it (if any) had the other sign.

    Args:
        codes: Sign codes ``[R, S, K]``.

    Returns:
        int64 ``[S, K]`` record indices in ``[0, R)`` (positions in
        ``recorder.record_epochs``, not epoch numbers); ``-1`` where the sample
        has no non-zero record at the neuron.

    Raises:
        ValueError: If ``codes`` are not integer codes in ``0..3``.
    """
    codes = _check_codes(codes)
    shape = codes.shape[1:]
    sign = torch.zeros(shape, dtype=torch.uint8, device=codes.device)
    settled = torch.full(shape, -1, dtype=torch.int64, device=codes.device)

    for r, record in enumerate(codes):
        nonzero = (record == POSITIVE) | (record == NEGATIVE)
        changed = nonzero & (record != sign)
        settled.masked_fill_(changed, r)
        sign = torch.where(nonzero, record, sign)
    return settled
