"""Record the sign of the loss gradient at hidden neurons, per sample, during training.

For a hidden neuron, a training sample and a moment of training, the partial derivative
of the loss with respect to the neuron's activation (and to its pre-activation) is
positive, negative or exactly zero. :class:`GradientSignRecorder` records these signs
during ordinary training steps, without any extra forward or backward pass: it hooks
the activation module of each chosen layer (``nn.ReLU``, ``nn.Tanh``, ...), whose input
is the pre-activation and whose output is the activation, and reads the gradients that
backpropagation computes anyway.

Each sign is stored as a two-bit code, four neurons to a byte:

- ``0`` (:data:`NOT_RECORDED`): the sample was not seen during that record's epoch;
- ``1`` (:data:`NEGATIVE`), ``2`` (:data:`ZERO`), ``3`` (:data:`POSITIVE`): the sign
  plus two, so that ``sign = code - 2`` for every recorded entry.

A record is one epoch (every epoch by default; any subset of epochs on request),
so the memory is exactly ``samples * neurons * records / 4`` bytes per layer and
quantity (each sample's row rounded up to whole bytes when the number of neurons
is not a multiple of four). :class:`SignRecord` is the read-only result, which
converts to and from a dictionary of NumPy arrays so that runs can be cached; the
pure functions of :mod:`neuronlib.metrics` turn its codes into sign consistency,
categories and the like.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from neuronlib.models import NONLINEARITY_TYPES
from neuronlib.probes import _encode

logger = logging.getLogger(__name__)

QUANTITIES = ("activation", "pre_activation")
CONV_REDUCTIONS = ("sum", "majority")

NOT_RECORDED = 0
NEGATIVE = 1
ZERO = 2
POSITIVE = 3
CODES_PER_BYTE = 4

# Module types taken as activations when neuronlib.models.hidden_layers cannot name
# the hidden layers of a model (it needs weight layers in a known forward order).
ACTIVATION_TYPES = NONLINEARITY_TYPES

# Modules that can never be "the nonlinearity of a layer": their input is not a
# pre-activation. Naming one is almost always a slip for the module after it.
_NOT_ACTIVATIONS = (
    nn.Linear,
    nn.Bilinear,
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
)

# Modules that keep the neuron axis of what flows through them, so that the width of
# an activation module in an nn.Sequential can be read off the weight layer before.
_WIDTH_PRESERVING = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)

_NO_INDEX_MESSAGE = (
    "batches carry no dataset indices, which the gradient-sign recorder needs to "
    "know which sample each gradient belongs to; use neuronlib.data's Loader "
    "(TensorData.loader) or yield (x, y, index) tuples"
)


# --------------------------------------------------------------------------- codes


def sign_codes(grad: Tensor) -> Tensor:
    """Turn gradient values into two-bit sign codes.

    Args:
        grad: Gradients, any shape.

    Returns:
        ``uint8`` codes of the same shape, the sign plus two: :data:`NEGATIVE` (1),
        :data:`ZERO` (2) or :data:`POSITIVE` (3). A NaN gradient gets :data:`ZERO`
        (``torch.sign`` gives 0 for NaN).
    """
    return (torch.sign(grad) + 2).to(torch.uint8)


def pack_codes(codes: Tensor) -> Tensor:
    """Pack two-bit codes four to a byte along the last axis.

    Neuron ``4 * j + t`` goes to bits ``2t`` and ``2t + 1`` of byte ``j``. When the
    number of neurons is not a multiple of four, the last byte is padded with
    :data:`NOT_RECORDED`.

    Args:
        codes: ``uint8`` codes in ``0..3``, shape ``[..., K]``.

    Returns:
        ``uint8`` bytes, shape ``[..., ceil(K / 4)]``.
    """
    padding = -codes.shape[-1] % CODES_PER_BYTE
    if padding:
        codes = F.pad(codes, (0, padding))
    quads = codes.reshape(*codes.shape[:-1], -1, CODES_PER_BYTE)

    return (
        quads[..., 0]
        | (quads[..., 1] << 2)
        | (quads[..., 2] << 4)
        | (quads[..., 3] << 6)
    )


def unpack_codes(packed: Tensor, num_neurons: int) -> Tensor:
    """Undo :func:`pack_codes`.

    Args:
        packed: ``uint8`` bytes, shape ``[..., ceil(K / 4)]``.
        num_neurons: ``K``, the number of codes to keep.

    Returns:
        ``uint8`` codes in ``0..3``, shape ``[..., K]``.
    """
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    width = packed.shape[-1] * CODES_PER_BYTE
    return codes.reshape(*packed.shape[:-1], width)[..., :num_neurons]


# Dtypes accepted as dataset indices (others are read as a mask or are not indices).
_INDEX_DTYPES = frozenset(
    dtype
    for bits in (8, 16, 32, 64)
    for name in (f"int{bits}", f"uint{bits}")
    if isinstance(dtype := getattr(torch, name, None), torch.dtype)
)

# The compiled find_rows's table when every sample is tracked: rows are indices.
_NO_TABLE = np.empty(0, dtype=np.int64)

# A padding column of the scratch buffer holds this "sign": its code is NOT_RECORDED.
_PAD_SIGN = 2
# Multiplying a 32-bit word whose four bytes are codes below 4 by _GATHER puts code t
# of the word at bits 24 + 2t: of the sixteen partial products, the four wanted ones
# land there, the six from higher bytes overflow past bit 31, and the six from lower
# bytes stay below bit 24 without carrying into it (their sum is below 2**24).
_GATHER = (1 << 24) | (1 << 18) | (1 << 12) | (1 << 6)
_LOW_TWO_BITS = 0x03030303  # the two low bits of each byte of a word
_FLIP_HIGH_BITS = 0b10101010  # xor of every code of a packed byte with 2
_gather_checked: dict[str, bool] = {}


def _codes_of_signs(signs: Tensor) -> Tensor:
    """Turn ``int8`` signs into codes.

    ``(sign & 3) ^ 2`` maps -1, 0, +1 and ``_PAD_SIGN`` (2) to :data:`NEGATIVE`,
    :data:`ZERO`, :data:`POSITIVE` and :data:`NOT_RECORDED`.
    """
    return ((signs & 3) ^ 2).view(torch.uint8)


def _gather_pack(
    signs: Tensor, words: Tensor | None = None, packed: Tensor | None = None
) -> Tensor:
    """:func:`_pack_signs` by multiplication; see :func:`_gather_works`."""
    words = torch.bitwise_and(  # (sign & 3) in every byte
        signs.view(torch.int32), _LOW_TWO_BITS, out=words
    )
    words *= _GATHER  # wraps around: only bits 24 to 31 are kept
    if packed is None:
        packed = torch.empty(words.shape, dtype=torch.uint8, device=words.device)
    torch.bitwise_right_shift(words, 24, out=packed)  # keeps the low byte
    # (sign & 3) ^ 2 is the code, and xor commutes with moving bits.
    packed ^= _FLIP_HIGH_BITS
    return packed


def _gather_works(device: torch.device) -> bool:
    """Whether ``_gather_pack`` gives ``pack_codes``'s bytes on this kind of device.

    It relies on little-endian words and on 32-bit integer multiplication that wraps
    around; both are checked once per device type, on every combination of four
    codes.
    """
    works = _gather_checked.get(device.type)
    if works is None:
        combos = torch.cartesian_prod(*[torch.tensor([-1, 0, 1, _PAD_SIGN])] * 4)
        signs = combos.to(torch.int8).reshape(1, -1)
        want = pack_codes(_codes_of_signs(signs))
        try:
            got = _gather_pack(signs.to(device)).cpu()
            works = sys.byteorder == "little" and torch.equal(got, want)
        except RuntimeError as error:  # an operation the device lacks
            logger.debug("packing by multiplication unavailable: %s", error)
            works = False
        _gather_checked[device.type] = works
    return works


def _pack_signs(
    signs: Tensor, words: Tensor | None = None, packed: Tensor | None = None
) -> Tensor:
    """Pack signs into two-bit codes, four to a byte, as :func:`pack_codes` does.

    This is the recorder's hot path. Where the device allows (see
    :func:`_gather_works`), each 32-bit word of four signs becomes its packed byte
    in four integer passes (mask, multiply, shift, xor) over a quarter as many
    words as signs; otherwise the codes go through :func:`pack_codes`.

    Args:
        signs: ``int8`` ``[N, 4 * J]``, contiguous: -1, 0 or +1, or
            ``_PAD_SIGN`` (2) in columns that pad a layer to whole bytes.
        words: Optional ``int32`` ``[N, J]`` scratch space, reused between calls
            (allocating large temporaries at every batch costs more than
            computing them on the CPU).
        packed: Optional ``uint8`` ``[N, J]`` tensor to write the result to.

    Returns:
        ``uint8`` ``[N, J]``: ``packed`` when it is given.
    """
    if _gather_works(signs.device):
        return _gather_pack(signs, words, packed)
    result = pack_codes(_codes_of_signs(signs))
    return result if packed is None else packed.copy_(result)


def reduce_channels(grad: Tensor, how: str = "sum") -> Tensor:
    """Reduce a convolutional gradient to one value per channel.

    Args:
        grad: Gradients with respect to feature maps, ``[N, C, *spatial]``.
        how: ``"sum"``: the gradient summed over positions, whose sign is that of
            the derivative of the loss with respect to a uniform shift of the
            channel's map. ``"majority"``: the number of positive minus the number
            of negative positions, whose sign is the majority sign among the
            positions with a non-zero gradient (a tie gives zero).

    Returns:
        ``[N, C]`` values whose signs are the channel's signs.
    """
    dims = tuple(range(2, grad.dim()))
    if how == "majority":
        return torch.sign(grad).sum(dims)
    return grad.sum(dims)


# --------------------------------------------------------------------------- reading


class _SignReader:
    """Read access shared by the recorder and the stored record.

    Subclasses set ``layers``, ``quantities``, ``conv_reduce``, ``sample_index``,
    ``neuron_index`` and ``record_epochs`` and implement ``_packed_of``.
    """

    layers: tuple[str, ...]
    quantities: tuple[str, ...]
    conv_reduce: str
    sample_index: Tensor
    neuron_index: dict[str, Tensor]

    record_epochs: list[int]

    def _packed_of(self, layer: str, quantity: str) -> Tensor:
        """``[R, S, ceil(K / 4)]`` packed codes on the CPU; set by subclasses."""
        raise NotImplementedError

    def _check_key(self, layer: str, quantity: str) -> None:
        if layer not in self.layers:
            raise ValueError(
                f"Layer {layer!r} was not recorded; the recorded layers are "
                f"{list(self.layers)}."
            )
        if quantity not in self.quantities:
            raise ValueError(
                f"Quantity {quantity!r} was not recorded; the recorded quantities are "
                f"{list(self.quantities)} (pass quantities= to the recorder to record "
                "others)."
            )

    def packed(self, layer: str, quantity: str = "activation") -> Tensor:
        """Return the packed codes of one layer and quantity.

        Args:
            layer: A recorded layer (the name of its activation module).
            quantity: ``"activation"`` or ``"pre_activation"``.

        Returns:
            ``uint8`` ``[R, S, ceil(K / 4)]`` on the CPU, as stored: ``R`` records,
            ``S`` tracked samples, ``K`` tracked neurons, four codes to a byte (see
            :func:`pack_codes`).

        Raises:
            ValueError: If the layer or the quantity was not recorded.
        """
        self._check_key(layer, quantity)
        return self._packed_of(layer, quantity)

    def codes(
        self,
        layer: str,
        quantity: str = "activation",
        *,
        samples: Tensor | Sequence[int] | None = None,
        neurons: Tensor | Sequence[int] | None = None,
    ) -> Tensor:
        """Return the unpacked sign codes of one layer and quantity.

        Args:
            layer: A recorded layer (the name of its activation module).
            quantity: ``"activation"`` or ``"pre_activation"``.
            samples: Dataset indices of tracked samples to read, in the order
                wanted; None reads every tracked sample (:attr:`sample_index`).
            neurons: Indices of tracked neurons (channels) of ``layer`` to read;
                None reads every tracked one (``neuron_index[layer]``). Only the
                chosen codes are unpacked.

        Returns:
            ``uint8`` ``[R, S, K]`` on the CPU with :data:`NOT_RECORDED` (0),
            :data:`NEGATIVE` (1), :data:`ZERO` (2) or :data:`POSITIVE` (3), for
            ``R`` records, the ``S`` samples and the ``K`` neurons asked for (by
            default rows follow :attr:`sample_index`, columns
            ``neuron_index[layer]``).

        Raises:
            ValueError: If the layer or the quantity was not recorded, or a sample
                or neuron asked for was not tracked.
        """
        packed = self.packed(layer, quantity)
        if samples is not None:
            rows = _positions(
                self.sample_index, samples, "samples", "sample {}", "sample_index"
            )
            packed = packed.index_select(1, rows)
        tracked = self.neuron_index[layer]
        if neurons is None:
            return unpack_codes(packed, int(tracked.numel()))
        columns = _positions(
            tracked,
            neurons,
            "neurons",
            f"neuron {{}} of layer {layer!r}",
            f"neuron_index[{layer!r}]",
        )
        shifts = (2 * (columns % CODES_PER_BYTE)).to(torch.uint8)
        return (packed.index_select(2, columns // CODES_PER_BYTE) >> shifts) & 3

    def signs(
        self,
        layer: str,
        quantity: str = "activation",
        *,
        samples: Tensor | Sequence[int] | None = None,
        neurons: Tensor | Sequence[int] | None = None,
    ) -> Tensor:
        """Return the recorded signs as numbers.

        Args:
            layer: A recorded layer (the name of its activation module).
            quantity: ``"activation"`` or ``"pre_activation"``.
            samples: Tracked samples to read, as in :meth:`codes`.
            neurons: Tracked neurons to read, as in :meth:`codes`.

        Returns:
            ``int8`` ``[R, S, K]``: ``+1``, ``-1`` or ``0``. Not-recorded entries are
            ``0`` as well; :meth:`recorded` tells them apart.

        Raises:
            ValueError: As :meth:`codes`.
        """
        lookup = torch.tensor([0, -1, 0, 1], dtype=torch.int8)
        codes = self.codes(layer, quantity, samples=samples, neurons=neurons)
        return lookup[codes.long()]

    def recorded(
        self,
        layer: str,
        quantity: str = "activation",
        *,
        samples: Tensor | Sequence[int] | None = None,
        neurons: Tensor | Sequence[int] | None = None,
    ) -> Tensor:
        """Return which entries hold a sign.

        Args:
            layer: A recorded layer (the name of its activation module).
            quantity: ``"activation"`` or ``"pre_activation"``.
            samples: Tracked samples to read, as in :meth:`codes`.
            neurons: Tracked neurons to read, as in :meth:`codes`.

        Returns:
            ``bool`` ``[R, S, K]``, False where the sample was not seen in the
            record's epoch.

        Raises:
            ValueError: As :meth:`codes`.
        """
        codes = self.codes(layer, quantity, samples=samples, neurons=neurons)
        return codes != NOT_RECORDED

    @property
    def nbytes(self) -> int:
        """Bytes taken by the packed codes of every layer and quantity."""
        return sum(
            self._packed_of(layer, quantity).nbytes
            for layer in self.layers
            for quantity in self.quantities
        )

    def to_arrays(self, prefix: str = "signs") -> dict[str, np.ndarray]:
        """Convert the record into NumPy arrays, for a cache or an ``.npz`` file.

        Only numbers and strings are stored, so the arrays load back with
        ``np.load(..., allow_pickle=False)``.

        Args:
            prefix: Start of every key, so that several records can share one
                dictionary.

        Returns:
            A flat dictionary of arrays; :meth:`SignRecord.from_arrays` reads it
            back.
        """
        arrays = {
            f"{prefix}.layers": np.array(self.layers, dtype=str),
            f"{prefix}.quantities": np.array(self.quantities, dtype=str),
            f"{prefix}.conv_reduce": np.array(self.conv_reduce, dtype=str),
            f"{prefix}.record_epochs": np.array(self.record_epochs, dtype=np.int64),
            f"{prefix}.sample_index": self.sample_index.cpu().numpy(),
        }
        for i, layer in enumerate(self.layers):
            arrays[f"{prefix}.neuron_index.{i}"] = self.neuron_index[layer].numpy()
            for quantity in self.quantities:
                packed = self._packed_of(layer, quantity)
                arrays[f"{prefix}.packed.{i}.{quantity}"] = packed.numpy()
        return arrays


class SignRecord(_SignReader):
    """The gradient signs recorded by a :class:`GradientSignRecorder`, read-only.

    Obtained from :meth:`GradientSignRecorder.snapshot` or rebuilt from cached arrays
    with :meth:`from_arrays`. Its reading methods (:meth:`codes`, :meth:`signs`,
    :meth:`packed`, :meth:`recorded`, :attr:`nbytes`, :meth:`to_arrays`) are those of
    the recorder.

    Attributes:
        layers: Names of the recorded activation modules.
        quantities: The recorded quantities, among ``"activation"`` and
            ``"pre_activation"``.
        conv_reduce: How positions of a convolutional channel were reduced.
        sample_index: ``[S]`` dataset indices of the tracked samples (row order).
        neuron_index: Per layer, ``[K]`` indices of the tracked neurons (channels
            for a convolutional layer), in column order.
    """

    def __init__(
        self,
        *,
        layers: Sequence[str],
        quantities: Sequence[str],
        conv_reduce: str,
        record_epochs: Sequence[int],
        sample_index: Tensor,
        neuron_index: Mapping[str, Tensor],
        packed: Mapping[tuple[str, str], Tensor],
    ):
        self.layers = tuple(layers)
        self.quantities = tuple(quantities)
        self.conv_reduce = conv_reduce
        self._record_epochs = [int(e) for e in record_epochs]
        self.sample_index = sample_index
        self.neuron_index = dict(neuron_index)
        self._packed = dict(packed)

    @property
    def record_epochs(self) -> list[int]:
        """The epoch (0-based, as ``FitState.epoch``) of each record, in order."""
        return list(self._record_epochs)

    def _packed_of(self, layer: str, quantity: str) -> Tensor:
        return self._packed[(layer, quantity)]

    def __repr__(self) -> str:
        return (
            f"SignRecord(layers={list(self.layers)}, quantities="
            f"{list(self.quantities)}, records={len(self._record_epochs)}, "
            f"samples={self.sample_index.numel()}, nbytes={self.nbytes})"
        )

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, Any], prefix: str = "signs"
    ) -> SignRecord:
        """Rebuild a record from the output of :meth:`to_arrays`.

        Args:
            arrays: The dictionary, possibly with other keys too (they are ignored);
                values may be NumPy arrays or tensors.
            prefix: The prefix given to :meth:`to_arrays`.

        Returns:
            The record.

        Raises:
            ValueError: If a key of the record is missing.
        """

        def get(key: str) -> Any:
            full = f"{prefix}.{key}"
            if full not in arrays:
                raise ValueError(
                    f"The arrays have no {full!r}; pass the dictionary made by "
                    f"to_arrays(prefix={prefix!r}) (or the prefix it was made with)."
                )
            return arrays[full]

        def strings(value: Any) -> list[str]:
            return [str(v) for v in np.asarray(value).reshape(-1)]

        def integers(value: Any) -> Tensor:
            return torch.as_tensor(np.asarray(value), dtype=torch.int64)

        layers = strings(get("layers"))
        quantities = strings(get("quantities"))
        neuron_index = {
            layer: integers(get(f"neuron_index.{i}")) for i, layer in enumerate(layers)
        }
        packed = {
            (layer, quantity): torch.as_tensor(
                np.asarray(get(f"packed.{i}.{quantity}")), dtype=torch.uint8
            )
            for i, layer in enumerate(layers)
            for quantity in quantities
        }

        return cls(
            layers=layers,
            quantities=quantities,
            conv_reduce=strings(get("conv_reduce"))[0],
            record_epochs=integers(get("record_epochs")).tolist(),
            sample_index=integers(get("sample_index")),
            neuron_index=neuron_index,
            packed=packed,
        )


# --------------------------------------------------------------------------- recording


@dataclass(frozen=True)
class _BatchRows:
    """Where the samples of the current batch go.

    ``size`` is the batch size; ``select`` the positions in the batch of tracked
    samples (None when every sample is tracked); ``rows`` their rows in the record,
    and ``rows_array`` the same as a NumPy array for the compiled kernels (None
    off the CPU). ``direct``, where the compiled ``encode`` can take a layer's
    gradient as it comes (every sample and neuron of the batch tracked, a CPU
    record), holds its other arguments: ``(encode, record, rows, codes)``.
    """

    size: int
    select: Tensor | None
    rows: Tensor
    rows_array: np.ndarray | None = None
    direct: tuple | None = None


@dataclass(frozen=True)
class _Segment:
    """Where one layer and quantity sit in the scratch buffer and in a record.

    Columns ``[column, column + num_neurons)`` of the scratch buffer (``column`` a
    multiple of 4) and bytes ``[byte, byte + ceil(num_neurons / 4))`` of a record
    row.
    """

    layer: str
    quantity: str
    num_neurons: int
    column: int
    byte: int

    @property
    def num_bytes(self) -> int:
        return -(-self.num_neurons // CODES_PER_BYTE)


class _Scratch:
    """The buffers of the recorder's hot path, kept from batch to batch.

    Allocating large temporaries at every batch costs about as much as computing
    them on the CPU (fresh pages have to be zeroed by the system), and on a busy
    step every extra operator call costs tens of microseconds; so the tensors and
    the views that the hooks and the packing write to are made once, for the
    largest batch seen (and again only for a larger batch or another device).

    With the compiled kernels (``kernels``, on the CPU), the hooks write straight
    into the record, and the only scratch is ``codes_array``, the kernel's row of
    codes. Otherwise ``signs`` holds one row of signs per sample (``int8``
    ``[rows, 4 * row bytes]``), ``columns`` its part for each layer and quantity,
    ``words`` the packing's scratch, ``sign_out`` the output of ``torch.sign``,
    ``[rows, K]`` for each width, dtype and device of the gradients, and
    ``packed`` the packed codes of the batch, one row per sample, every layer and
    quantity side by side (``uint8`` ``[rows, row bytes]``): the packing turns
    ``signs`` into ``packed``, which one row copy moves into the record.
    """

    def __init__(
        self,
        rows: int,
        segments: Mapping[tuple[str, str], _Segment],
        row_bytes: int,
        device: torch.device,
        kernels: _encode.Kernels | None = None,
    ):
        self.rows = rows
        self.device = device
        self.kernels = kernels
        self.compiled = kernels is not None
        self.sign_out: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}
        if kernels is not None:
            # The compiled kernel writes packed codes straight into the record.
            self.codes_array = np.zeros(row_bytes * CODES_PER_BYTE, dtype=np.uint8)
            return
        self.packed = torch.empty((rows, row_bytes), dtype=torch.uint8, device=device)
        # Columns that pad a layer to whole bytes keep _PAD_SIGN, whose code is
        # NOT_RECORDED; the others are overwritten batch by batch.
        self.signs = torch.full(
            (rows, row_bytes * CODES_PER_BYTE),
            _PAD_SIGN,
            dtype=torch.int8,
            device=device,
        )
        self.columns = {
            key: self.signs[:, segment.column : segment.column + segment.num_neurons]
            for key, segment in segments.items()
        }
        self.words = torch.empty((rows, row_bytes), dtype=torch.int32, device=device)

    def sign_of(self, grad: Tensor) -> Tensor:
        """``torch.sign`` of a ``[n, K]`` gradient, ``n <= rows``, into a kept tensor.

        The gradient is detached first: under ``create_graph=True`` it requires
        grad, and an ``out=`` operation refuses such inputs.
        """
        rows, width = grad.shape
        key = (width, grad.dtype, grad.device)
        out = self.sign_out.get(key)
        if out is None:
            out = torch.empty((self.rows, width), dtype=grad.dtype, device=grad.device)
            self.sign_out[key] = out
        if rows != self.rows:
            out = out[:rows]
        if grad.requires_grad:
            grad = grad.detach()
        return torch.sign(grad, out=out)


class GradientSignRecorder(_SignReader):
    """Record signs of dLoss/dActivation and dLoss/dPre-activation during training.

    The recorder hooks the activation module of each chosen layer. Its input is the
    neurons' pre-activation, its output their activation; during a recorded batch,
    a forward pre-hook and a forward hook attach tensor hooks to these two tensors,
    and backpropagation hands those the gradients of the loss. The recorder keeps
    the sign of each tracked sample's gradient at each tracked neuron, as a two-bit
    code (see :mod:`neuronlib.probes.signs`), in the sample's row of the record.
    No extra forward or backward pass runs.

    The hot path is kept short. On the CPU, with the compiled kernels of
    :mod:`neuronlib.probes._encode` (Numba), each tensor hook makes one pass over its
    gradient that writes the packed codes of the whole batch straight into its bytes of
    the samples' record rows. Elsewhere (on a GPU, or without Numba) each hook writes
    its gradient's signs, one byte each, into an ``int8`` scratch buffer, and four
    integer operations then pack the signs of the whole batch, every layer and quantity
    at once, before one row copy. Both give the same bytes (the kernels are checked
    against torch before they are used). A record is one ``uint8`` tensor ``[S, bytes]``
    that holds, side by side, the packed codes of every layer and quantity;
    :meth:`packed` cuts out one of them. Besides the records, the recorder keeps only
    its scratch: one row of codes with the kernels, about ``2.25 * B * sum(K)`` bytes
    over all layers and quantities plus one gradient-sized tensor per gradient width
    without them.

    It follows the probe protocol of :func:`neuronlib.train.fit`: pass it in
    ``probes=`` and it records on the epochs it is asked to. Batches must carry
    dataset indices (``batch.index``, or the third item of an ``(x, y, index)``
    tuple). A training loop of one's own calls :meth:`start_epoch`,
    :meth:`start_batch` (before the forward pass) and :meth:`end_batch`.

    Example::

        with GradientSignRecorder(model, num_samples=60000) as recorder:
            fit(model, train.loader(128), optimizer=opt, epochs=10,
                probes=[recorder])
        codes = recorder.codes("act1")  # [epochs, samples, neurons]

    Note:
        A mean-reduced loss (the default of ``F.cross_entropy``) divides each
        sample's gradient by the batch size ``B``: the signs are those of the
        sample's own loss gradient, unchanged.

        With batch norm in train mode the samples of a batch are coupled: the
        gradient with respect to one sample's activation also flows through the
        batch mean and variance, so it depends on the other samples of the batch.
        The recorder reports exactly what autograd gives, the gradient of the
        batch's loss with respect to that sample's activation, which is not the
        gradient of the sample's own loss. Without batch norm (or with it in eval
        mode) the two coincide up to the factor ``1 / B``.

        Convolutional layers (``[N, C, H, W]`` activations) get one sign per
        channel. ``conv_reduce="sum"`` (the default) takes the sign of the gradient
        summed over positions. If every position of channel ``c`` is shifted by
        the same small ``e``, the loss changes by ``e`` times that sum, so its
        sign says whether the loss wants the channel's whole map pushed up or
        down: the channel's counterpart of a single neuron's derivative. For the
        pre-activation it is also the per-sample gradient of the channel's bias.
        It is zero when every position is zero (a ReLU channel that is off
        everywhere). ``conv_reduce="majority"`` takes the majority sign among the
        positions with a non-zero gradient; a tie, or no such position, gives
        zero. Activation gradients at positions that a following max-pool does
        not select are exactly zero and do not count.

        In-place activations (``nn.ReLU(inplace=True)``) work: the tensor hook on the
        pre-activation is registered before the module overwrites it, and PyTorch then
        delivers the gradient with respect to the value before the overwrite (except for
        an in-place activation applied to a view of another tensor, such as
        ``act(h[:, :5])``: PyTorch calls no tensor hook there, and the entries stay
        :data:`NOT_RECORDED`). A sample seen twice in a recorded epoch keeps the sign of
        its last visit, and a second backward pass of a batch overwrites the signs of
        the first. Gradients that need grad themselves (``create_graph=True``) are read
        like any other. An activation module must run once per forward pass; a module
        reused at several places of the network is not supported. The backward pass of a
        batch must end before the next batch starts. Reading the record (:meth:`codes`,
        :meth:`snapshot`, ...) in the middle of a batch is fine. ``copy.deepcopy`` of
        the recorder copies its model too, and the copy records that model's training; a
        deep copy of the model alone carries hooks that keep feeding this recorder
        (remove it first).

    Args:
        model: The model to watch.
        layers: Names (as in ``model.named_modules()``) of activation modules. By
            default those of :func:`neuronlib.models.hidden_layers`, or, when it
            cannot name them, every activation-type module (``nn.ReLU``,
            ``nn.Tanh``, ...).
        samples: Dataset indices of the samples to track, ``[S]``, in the row order
            of the record. None tracks every index in ``[0, num_samples)``.
        num_samples: The size of the dataset; required when ``samples`` is None.
        neurons: Indices of the neurons (channels) to track: one sequence for every
            layer, or a mapping from layer name to indices (layers left out keep
            all their neurons). None tracks every neuron.
        epochs: Which epochs (0-based, as ``FitState.epoch``) to record: an
            iterable of epoch numbers or a predicate ``epoch -> bool``. None
            records every epoch.
        conv_reduce: ``"sum"`` or ``"majority"``: how the positions of a
            convolutional channel are reduced to one sign (see the Note).
        quantities: What to record, among ``"activation"`` and
            ``"pre_activation"``.

    Raises:
        ValueError: If a layer is not in the model or is not an activation module,
            if neuron or sample indices are out of range or repeated, if neither
            ``samples`` nor ``num_samples`` is given, or if ``conv_reduce``,
            ``quantities`` or ``epochs`` are invalid.
        TypeError: If ``model`` is not an ``nn.Module``.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        *,
        samples: Tensor | Sequence[int] | None = None,
        num_samples: int | None = None,
        neurons: Mapping[str, Sequence[int]] | Sequence[int] | Tensor | None = None,
        epochs: Iterable[int] | Callable[[int], bool] | None = None,
        conv_reduce: str = "sum",
        quantities: Sequence[str] = QUANTITIES,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module, got {type(model).__name__}; pass the "
                "network to record."
            )
        if conv_reduce not in CONV_REDUCTIONS:
            raise ValueError(
                f"Invalid conv_reduce {conv_reduce!r}; use one of {CONV_REDUCTIONS}."
            )
        self.model = model
        self.conv_reduce = conv_reduce
        self.quantities = _check_quantities(quantities)
        self.layers = _resolve_layers(model, layers)
        self._modules = {name: model.get_submodule(name) for name in self.layers}
        if num_samples is not None:
            num_samples = _as_count(num_samples)
        self.sample_index, self._lookup = _sample_lookup(samples, num_samples)
        self._lookup_array = self._lookup.numpy()  # for the compiled find_rows
        self._num_samples = num_samples
        self._every_index = samples is None  # the look-up table is the identity
        self._wants_epoch = _epoch_schedule(epochs)

        # Width (neurons per sample) of each layer, when it can be read off the
        # model; otherwise it is learnt, and checked, at the first forward pass.
        self._width = {name: _infer_width(model, name) for name in self.layers}
        self._requested = _requested_neurons(neurons, self.layers)
        self.neuron_index: dict[str, Tensor] = {}
        for name in self.layers:
            self._settle_neurons(name, self._width[name])

        self._segments: dict[tuple[str, str], _Segment] | None = None
        self._row_bytes = 0
        self._records: list[Tensor] = []  # one [S, row bytes] uint8 per record
        self._record_words: list[Tensor] = []  # the same, viewed as wider words
        self._record_arrays: list[np.ndarray | None] = []  # as NumPy, on the CPU
        self._record_epochs: list[int] = []
        self._recording = False
        self._batch: _BatchRows | None = None  # armed for the coming forward pass
        self._pending: _BatchRows | None = None  # batch whose signs are staged
        self._written: set[tuple[str, str]] = set()
        self._scratch: _Scratch | None = None
        # Where the model computes, read at each epoch start (reading it off the
        # parameters at every batch would cost more than the recording).
        self._where = (self._device(), self._dtype())
        self._handles: list[RemovableHandle] = []
        self._attached_by_fit = False
        # Per-device copies of the sample look-up table and neuron indices.
        self._device_cache: dict[Any, Tensor] = {}
        self._lookup_view: memoryview | None = None
        self._fix_layout()

    # ------------------------------------------------------------- attach / remove

    def __getstate__(self) -> dict[str, Any]:
        """The recorder's state for ``copy.deepcopy``.

        NumPy views of the records and of the scratch (and a memoryview of the
        sample table) would come out of a copy detached from the tensors they
        view, so they are left out and rebuilt; a batch in flight is not carried
        over (the copy starts disarmed).
        """
        state = self.__dict__.copy()
        state.update(
            _record_arrays=None,
            _scratch=None,
            _lookup_view=None,
            _lookup_array=None,
            _batch=None,
            _pending=None,
            _written=set(),
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lookup_array = self._lookup.numpy()
        self._record_arrays = [
            record.numpy() if record.is_cpu else None for record in self._records
        ]
        if self._handles:
            # A copy of an attached recorder: the copied model carries the
            # original's hooks (functions are shared, not copied, so they would
            # feed the original recorder). The copied handles point into the
            # copied model: take those hooks off and put on the copy's own.
            stale, self._handles = self._handles, []
            for handle in stale:
                handle.remove()
            self.attach()

    @property
    def attached(self) -> bool:
        """Whether the recorder's hooks are on the model."""
        return bool(self._handles)

    def attach(self, model: nn.Module | None = None) -> GradientSignRecorder:
        """Put the hooks on the model (nothing happens if they are already on).

        Args:
            model: For the probe protocol's ``probe.attach(model)``: must be the
                model given to the constructor, or None.

        Returns:
            The recorder itself, so that ``with recorder.attach():`` works.

        Raises:
            ValueError: If ``model`` is another model than the recorder's.
        """
        if model is not None and model is not self.model:
            raise ValueError(
                "This GradientSignRecorder was built for another model; build one "
                "per model: GradientSignRecorder(model, ...)."
            )
        if self._handles:
            return self
        try:
            for name, module in self._modules.items():
                self._handles.append(
                    module.register_forward_pre_hook(self._make_pre_hook(name))
                )
                if "activation" in self.quantities:
                    self._handles.append(
                        module.register_forward_hook(self._make_forward_hook(name))
                    )
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Take every hook off the model; calling it again does nothing.

        The records stay readable, and :meth:`attach` can put the hooks back.
        """
        self._flush()
        self._batch = None
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> GradientSignRecorder:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    # ------------------------------------------------------------- schedule

    @property
    def record_epochs(self) -> list[int]:
        """The epoch (0-based, as ``FitState.epoch``) of each record, in order."""
        return list(self._record_epochs)

    def start_epoch(self, epoch: int) -> None:
        """Begin an epoch: open a new record if the schedule asks for this one.

        A new record starts with every entry :data:`NOT_RECORDED`.

        Args:
            epoch: The epoch number, 0-based.
        """
        self._flush()
        self._batch = None
        self._recording = bool(self._wants_epoch(int(epoch)))
        if not self._recording:
            return

        self._record_epochs.append(int(epoch))
        self._where = (self._device(), self._dtype())
        self._grow(self._where[0])

    def start_batch(self, index: Tensor | Sequence[int] | None) -> None:
        """Arm the recorder for the next forward pass.

        Args:
            index: ``[B]`` dataset indices of the batch's samples, in batch order.
                Indices of samples that are not tracked are ignored.

        Raises:
            ValueError: If ``index`` is None or not one-dimensional, or holds a
                negative index or one beyond ``num_samples`` (the dataset size
                given at construction): such a batch would silently record
                nothing for those samples.
        """
        if index is None:
            raise ValueError(_NO_INDEX_MESSAGE + ".")
        self._flush()
        self._batch = None
        if not self._recording:
            return

        device = self._where[0]
        if not isinstance(index, Tensor) or index.device != device:
            index = torch.as_tensor(index, device=device)
        if index.dim() != 1 or index.dtype not in _INDEX_DTYPES:
            raise ValueError(
                f"Dataset indices must be a 1-D integer tensor [B], got shape "
                f"{tuple(index.shape)} and dtype {index.dtype}; pass batch.index."
            )
        if index.dtype != torch.int64:  # uint8 would index as a mask
            index = index.long()
        count = index.numel()
        if count == 0:
            return
        low, high, rows, found = self._rows_of(index)
        limit = self._num_samples
        if low < 0 or (limit is not None and high >= limit):
            bad = low if low < 0 else high
            raise ValueError(
                f"Batch holds dataset index {bad}, outside [0, {limit or 'inf'}) "
                f"the recorder was built for (num_samples={limit}). Dataset indices "
                "refer to the full split, also for a subset: pass "
                "num_samples=len(full_split) (e.g. 55000 for MNIST's train split) "
                "or samples=subset.index."
            )
        if found == count:  # every sample of the batch is tracked
            self._arm(count, None, rows)
        elif found:
            select = (rows >= 0).nonzero().squeeze(1)
            self._arm(count, select, rows[select])

    def _rows_of(self, index: Tensor) -> tuple[int, int, Tensor, int]:
        """Read a batch's dataset indices (``int64``, not empty).

        Returns:
            ``(low, high, rows, found)``: the smallest and the largest index, the
            record row of each sample (-1 when it is not tracked; rows are only
            meaningful once the range is checked) and how many have a row.
        """
        count = index.numel()
        if index.device.type != "cpu":  # torch operators on the device
            low, high = torch.stack(torch.aminmax(index)).tolist()
            if self._every_index:
                return low, high, index, count
            size = self._lookup.numel()
            lookup = self._on(index.device, ("lookup",), self._lookup)
            rows = lookup[index.clamp(0, size - 1)]
            inside = (index >= 0) & (index < size)
            rows = torch.where(inside, rows, torch.full_like(rows, -1))
            return low, high, rows, int((rows >= 0).sum())

        # On the CPU, where each torch operator (or NumPy reduction) costs tens of
        # microseconds on a training step (everything the recorder touches has
        # been pushed out of the caches): one compiled pass, or Python integers.
        kernels = _encode.kernels()
        if kernels is not None:
            rows_array = np.empty(count, dtype=np.int64)
            table = _NO_TABLE if self._every_index else self._lookup_array
            low, high, found = kernels.find_rows(
                index.contiguous().numpy(), table, rows_array
            )
            return low, high, torch.from_numpy(rows_array), found
        values = index.tolist()
        low, high = min(values), max(values)
        if self._every_index:
            return low, high, index, count
        table = self._lookup_table()
        size = len(table)
        rows_list = [table[i] if 0 <= i < size else -1 for i in values]
        found = sum(row >= 0 for row in rows_list)
        return low, high, torch.tensor(rows_list, dtype=torch.int64), found

    def end_batch(self) -> None:
        """Write the batch's signs into the record and disarm the recorder.

        Later forward passes are not recorded until the next :meth:`start_batch`.
        """
        self._flush()
        self._batch = None

    # ------------------------------------------------------------- probe protocol

    def on_fit_start(self, state: Any) -> None:
        """Attach the hooks if they are not on yet (:meth:`on_fit_end` removes them).

        Args:
            state: ``fit``'s state (unused).
        """
        if not self._handles:
            self.attach()
            self._attached_by_fit = True

    def on_epoch_start(self, state: Any) -> None:
        """Call :meth:`start_epoch` with ``state.epoch``.

        Args:
            state: ``fit``'s state.
        """
        self.start_epoch(state.epoch)

    def on_batch_start(self, state: Any) -> None:
        """Call :meth:`start_batch` with the dataset indices of ``state.batch``.

        Args:
            state: ``fit``'s state.

        Raises:
            ValueError: If the batch carries no dataset indices.
        """
        self.start_batch(_batch_index(state.batch))

    def on_batch_end(self, state: Any) -> None:
        """Call :meth:`end_batch`.

        Args:
            state: ``fit``'s state (unused).
        """
        self.end_batch()

    def on_epoch_end(self, state: Any) -> None:
        """Stop recording until the next epoch starts.

        Args:
            state: ``fit``'s state (unused).
        """
        self.end_batch()
        self._recording = False

    def on_fit_end(self, state: Any) -> None:
        """Stop recording; remove the hooks if :meth:`on_fit_start` put them on.

        Args:
            state: ``fit``'s state (unused).
        """
        self.end_batch()
        self._recording = False
        if self._attached_by_fit:
            self._attached_by_fit = False
            self.remove()

    # ------------------------------------------------------------- reading

    def snapshot(self) -> SignRecord:
        """Copy what has been recorded so far into a read-only :class:`SignRecord`.

        Returns:
            The record, on the CPU.
        """
        return SignRecord(
            layers=self.layers,
            quantities=self.quantities,
            conv_reduce=self.conv_reduce,
            record_epochs=self._record_epochs,
            sample_index=self.sample_index.clone(),
            neuron_index={k: v.clone() for k, v in self.neuron_index.items()},
            packed={
                (layer, quantity): self._packed_of(layer, quantity)  # copies
                for layer in self.layers
                for quantity in self.quantities
            },
        )

    def _packed_of(self, layer: str, quantity: str) -> Tensor:
        # Write what is staged, but keep the batch armed: reading between a
        # forward and a backward pass must not drop the batch's signs.
        self._write_staged()
        if self._segments is None:
            raise RuntimeError(
                f"Layer {layer!r} has not run in a recorded forward pass yet, so its "
                "width is unknown; read the record after training."
            )
        segment = self._segments[(layer, quantity)]
        columns = slice(segment.byte, segment.byte + segment.num_bytes)
        if not self._records:
            shape = (0, self.sample_index.numel(), segment.num_bytes)
            return torch.zeros(shape, dtype=torch.uint8)
        return torch.stack([record[:, columns].cpu() for record in self._records])

    @property
    def nbytes(self) -> int:
        """Bytes taken by the packed codes of every layer and quantity."""
        return sum(record.nbytes for record in self._records)

    # ------------------------------------------------------------- internals

    def __repr__(self) -> str:
        return (
            f"GradientSignRecorder(layers={list(self.layers)}, quantities="
            f"{list(self.quantities)}, samples={self.sample_index.numel()}, "
            f"records={len(self._record_epochs)}, attached={self.attached})"
        )

    def _device(self) -> torch.device:
        """Where the model computes (and where the records are kept)."""
        for tensor in self.model.parameters():
            return tensor.device
        for tensor in self.model.buffers():
            return tensor.device
        return torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        """The model's floating dtype: that of the gradients, as a rule."""
        for tensor in self.model.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.get_default_dtype()

    def _on(self, device: torch.device, key: Any, tensor: Tensor) -> Tensor:
        """``tensor`` on ``device``, copied once per device and key."""
        if tensor.device == device:
            return tensor
        cached = self._device_cache.get((device, key))
        if cached is None or cached.shape != tensor.shape:
            cached = tensor.to(device)
            self._device_cache[(device, key)] = cached
        return cached

    def _lookup_table(self) -> memoryview:
        """The sample look-up table as a memoryview: dataset index -> row (-1)."""
        if self._lookup_view is None:
            self._lookup_view = memoryview(self._lookup_array)
        return self._lookup_view

    def _settle_neurons(self, name: str, width: int | None) -> None:
        """Check requested neurons against the width and fix the neuron index."""
        requested = self._requested[name]
        if width is not None and requested is not None:
            bad = requested[(requested >= width)]
            if bad.numel():
                raise ValueError(
                    f"Neuron index {int(bad[0])} is out of range for layer {name!r}, "
                    f"which has {width} neurons (channels); use indices in "
                    f"[0, {width})."
                )
        if requested is not None:
            self.neuron_index[name] = requested
        elif width is not None:
            self.neuron_index[name] = torch.arange(width)

    def _fix_layout(self) -> None:
        """Place every layer and quantity in the record rows, once widths are known.

        Each layer and quantity gets ``ceil(K / 4)`` bytes of a record row, and
        ``4 * ceil(K / 4)`` columns of the scratch buffer.
        """
        if self._segments is not None:
            return
        if any(name not in self.neuron_index for name in self.layers):
            return

        segments = {}
        column = 0
        for name in self.layers:
            num_neurons = self.neuron_index[name].numel()
            for quantity in self.quantities:
                segment = _Segment(
                    name, quantity, num_neurons, column, column // CODES_PER_BYTE
                )
                segments[(name, quantity)] = segment
                column += segment.num_bytes * CODES_PER_BYTE
        self._segments = segments
        self._row_bytes = column // CODES_PER_BYTE
        # For the hot path: whether every neuron of every layer is tracked
        # (gradients then go to the kernel whole).
        self._every_neuron = all(self._requested[n] is None for n in self.layers)
        self._grow(self._where[0])

    def _grow(self, device: torch.device) -> None:
        """Add one zeroed record per recorded epoch that lacks one."""
        if self._segments is None:
            return
        shape = (self.sample_index.numel(), self._row_bytes)
        # Whole rows are copied as 8-, 4- or 2-byte words where the row length
        # allows: the copy then moves up to 8 times fewer elements.
        word = _word_dtype(self._row_bytes)
        while len(self._records) < len(self._record_epochs):
            record = torch.zeros(shape, dtype=torch.uint8, device=device)
            self._records.append(record)
            self._record_words.append(record.view(word))
            # For the compiled kernels, which write CPU records through NumPy.
            self._record_arrays.append(record.numpy() if record.is_cpu else None)

    def _arm(self, size: int, select: Tensor | None, rows: Tensor) -> None:
        """Arm for a batch: hooks of the coming forward pass record its samples."""
        rows_array = rows.numpy() if rows.device.type == "cpu" else None
        direct = None
        if self._segments is not None:
            scratch = self._prepare_scratch(size)
            record = self._record_arrays[-1]
            if (
                scratch.compiled
                and select is None
                and self._every_neuron
                and record is not None
                and rows_array is not None
            ):
                direct = (
                    scratch.kernels.encode,
                    record,
                    rows_array,
                    scratch.codes_array,
                )
        self._batch = self._pending = _BatchRows(size, select, rows, rows_array, direct)
        self._written = set()

    def _prepare_scratch(self, rows: int) -> _Scratch:
        """The hot path's buffers, with room for ``rows`` samples."""
        scratch = self._scratch
        device = self._where[0]
        kernels = _encode.kernels() if device.type == "cpu" else None
        if (
            scratch is None
            or scratch.rows < rows
            or scratch.device != device
            or scratch.kernels is not kernels
        ):
            scratch = _Scratch(rows, self._segments, self._row_bytes, device, kernels)
            self._scratch = scratch
        return scratch

    def _flush(self) -> None:
        """Write what is staged of the pending batch, then stop recording it."""
        self._write_staged()
        self._pending = None

    def _write_staged(self) -> None:
        """Pack the signs staged since the last write into the current record."""
        batch, written = self._pending, self._written
        self._written = set()
        if batch is None or not written or self._segments is None:
            return

        # Only the torch path stages: the compiled kernels write to the record.
        scratch = self._scratch
        count = batch.rows.numel()
        packed = scratch.packed if count == scratch.rows else scratch.packed[:count]
        signs, words = scratch.signs, scratch.words
        if count != scratch.rows:
            signs, words = signs[:count], words[:count]
        packed = _pack_signs(signs, words, packed)  # [count, row bytes]
        if len(written) == len(self._segments):
            word = self._record_words[-1]
            # index_put_ rather than index_copy_: the same rows written, in about
            # half the time on the CPU.
            word.index_put_((batch.rows,), packed.view(word.dtype))
            return
        record = self._records[-1]
        for key in written:  # some layer or quantity got no gradient
            segment = self._segments[key]
            columns = slice(segment.byte, segment.byte + segment.num_bytes)
            record[:, columns].index_copy_(0, batch.rows, packed[:, columns])

    def _learn_width(self, name: str, tensor: Tensor) -> None:
        """Check the width seen in a forward pass; learn it if it was unknown."""
        if tensor.dim() < 2:
            raise ValueError(
                f"Layer {name!r} got a tensor of shape {tuple(tensor.shape)}; the "
                "recorder needs [B, K] or [B, C, *spatial] with the batch first."
            )
        width = tensor.shape[1]
        known = self._width[name]
        if known is None:
            self._settle_neurons(name, width)
            self._width[name] = width
            self._fix_layout()
        elif known != width:
            raise ValueError(
                f"Layer {name!r} was expected to have {known} neurons but a forward "
                f"pass gave it shape {tuple(tensor.shape)}. The recorder reads axis 1 "
                "as the neurons ([B, K], or [B, C, *spatial] for channels): for "
                "[B, T, K] sequences, move K to axis 1 or flatten T into the batch. "
                "Otherwise the module runs at several places of the network with "
                "different widths, which cannot be recorded: give each place its own "
                "module."
            )

    def _make_pre_hook(self, name: str) -> Callable:
        key = (name, "pre_activation")
        records_pre_activation = "pre_activation" in self.quantities

        def pre_hook(module: nn.Module, args: tuple) -> None:
            batch = self._batch
            if batch is None or not torch.is_grad_enabled():
                return
            if not self.model.training:
                raise RuntimeError(
                    "A forward pass with gradients enabled ran while the model is in "
                    "eval mode, during a batch that the GradientSignRecorder "
                    "records; call model.train() before training steps, or remove "
                    "the recorder (recorder.remove()) before evaluating with "
                    "gradients."
                )
            x = args[0] if args else None
            if not isinstance(x, Tensor) or not x.requires_grad:
                return
            _check_batch_size(name, batch, x)
            self._learn_width(name, x)
            if records_pre_activation:
                x.register_hook(partial(self._stage, key, batch))

        return pre_hook

    def _make_forward_hook(self, name: str) -> Callable:
        key = (name, "activation")

        def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
            batch = self._batch
            if batch is None or not isinstance(output, Tensor):
                return
            if not output.requires_grad:
                return
            _check_batch_size(name, batch, output)
            self._learn_width(name, output)
            output.register_hook(partial(self._stage, key, batch))

        return forward_hook

    def _first_scratch(self, rows: int) -> _Scratch:
        """The hot path's buffers, for a model whose widths were learnt just now."""
        self._fix_layout()
        if self._segments is None:
            missing = [n for n in self.layers if n not in self.neuron_index]
            raise RuntimeError(
                f"Layers {missing} did not run in the forward pass; record only "
                "activation modules that run in every training step."
            )
        return self._prepare_scratch(rows)

    def _stage(self, key: tuple[str, str], batch: _BatchRows, grad: Tensor) -> None:
        """Tensor hook: write the signs of one layer's gradient to scratch."""
        if batch is not self._pending:  # its batch was already written
            return
        direct = batch.direct
        if direct is not None:  # the common case on the CPU: as few steps as can be
            encode, record, rows, codes = direct
            segment = self._segments[key]
            try:
                array = grad.numpy()  # refuses a gradient that needs grad, or a GPU's
                if (
                    array.ndim == 2
                    and array.shape[0] == rows.shape[0]
                    and array.shape[1] == segment.num_neurons
                ):
                    # Raises TypeError for a dtype or layout it was not compiled for.
                    _encode_rows(encode, array, record, rows, segment.byte, codes)
                    return
            except (RuntimeError, TypeError):
                pass  # the general path below converts what needs converting
        scratch = self._scratch
        if scratch is None or scratch.rows < batch.size:
            scratch = self._first_scratch(batch.size)
        segment = self._segments[key]

        if batch.select is not None:
            grad = grad.index_select(0, batch.select)
        if self._requested[segment.layer] is not None:
            neurons = self.neuron_index[segment.layer]
            grad = grad.index_select(1, self._on(grad.device, segment.layer, neurons))
        if grad.dim() > 2:
            grad = reduce_channels(grad, self.conv_reduce)
        if scratch.compiled:  # straight into the record's rows
            _encode_into(scratch, segment, grad, self._record_arrays[-1], batch)
            return
        columns = scratch.columns[key]
        if grad.shape[0] != scratch.rows:
            columns = columns[: grad.shape[0]]
        # Signs, not codes: _pack_signs turns them into codes while packing.
        columns.copy_(scratch.sign_of(grad))
        self._written.add(key)
        if len(self._written) == len(self._segments):
            # The batch's last gradient: pack now, while the buffer is in the
            # cache, rather than after the optimizer step has pushed it out. The
            # batch stays armed, so that a second backward pass of the same batch
            # overwrites these signs, as it would if they were written at its end.
            self._write_staged()


def _check_batch_size(name: str, batch: _BatchRows, tensor: Tensor) -> None:
    """Refuse a forward pass whose batch does not match the batch's indices."""
    if tensor.dim() == 0 or tensor.shape[0] != batch.size:
        raise ValueError(
            f"The batch's dataset index has {batch.size} entries but layer {name!r} "
            f"got a tensor of shape {tuple(tensor.shape)}; pass the indices of the "
            "samples in the forward pass, in the same order."
        )


def _encode_into(
    scratch: _Scratch,
    segment: _Segment,
    grad: Tensor,
    record: np.ndarray,
    batch: _BatchRows,
) -> None:
    """Write the packed codes of ``grad`` [n, K] into the batch's rows of ``record``.

    They go to ``segment``'s bytes of each row.

    The compiled ``encode`` of :mod:`neuronlib.probes._encode` reads C-contiguous
    float32 or float64 CPU arrays; anything else is converted first (a conversion
    to float32 keeps every sign, zero included).
    """
    if grad.requires_grad:  # create_graph=True
        grad = grad.detach()
    # A lazily negated (or conjugated) view, which another hook may hand over, has
    # no NumPy view until it is materialized; for other tensors these are no-ops.
    grad = grad.resolve_neg().resolve_conj()
    if grad.dtype not in _encode.KERNEL_DTYPES:
        grad = grad.float()
    if grad.device.type != "cpu":
        grad = grad.cpu()
    if not grad.is_contiguous():
        grad = grad.contiguous()
    # The kernel does not check bounds (beyond the record's rows): refuse what it
    # could read or write past.
    rows = batch.rows_array
    if (
        grad.dim() != 2
        or grad.shape[1] != segment.num_neurons
        or rows is None
        or rows.shape[0] != grad.shape[0]
    ):
        expected = "?" if rows is None else rows.shape[0]
        raise RuntimeError(
            f"Gradient of shape {tuple(grad.shape)} for {segment.layer!r}: expected "
            f"[{expected}, {segment.num_neurons}], the batch's tracked samples by "
            "the layer's tracked neurons."
        )
    _encode_rows(
        scratch.kernels.encode,
        grad.numpy(),
        record,
        rows,
        segment.byte,
        scratch.codes_array,
    )


def _encode_rows(
    encode: Callable,
    array: np.ndarray,
    record: np.ndarray,
    rows: np.ndarray,
    byte: int,
    codes: np.ndarray,
) -> None:
    """Call the compiled ``encode``; a row out of range (it wrote nothing) raises."""
    stray = encode(array, record, rows, byte, codes)
    if stray >= 0:  # start_batch keeps rows in range: a bug if seen
        raise IndexError(f"Record row {int(rows[stray])} is out of range.")


def _word_dtype(num_bytes: int) -> torch.dtype:
    """The widest integer type whose size divides ``num_bytes``."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        if num_bytes % dtype.itemsize == 0:
            return dtype
    return torch.uint8


# --------------------------------------------------------------------------- checks


def _check_quantities(quantities: Sequence[str]) -> tuple[str, ...]:
    quantities = (quantities,) if isinstance(quantities, str) else tuple(quantities)
    unknown = [q for q in quantities if q not in QUANTITIES]
    if not quantities or unknown or len(set(quantities)) != len(quantities):
        raise ValueError(
            f"Invalid quantities {quantities!r}; pass a non-empty selection without "
            f"repeats from {QUANTITIES}."
        )
    return quantities


def _default_layers(model: nn.Module) -> list[str]:
    try:
        from neuronlib.models import hidden_layers
    except ImportError:  # pragma: no cover - models.py ships with the library
        hidden_layers = None
    if hidden_layers is not None:
        try:
            return list(hidden_layers(model))
        except (ValueError, TypeError, RuntimeError) as error:
            logger.debug("hidden_layers failed (%s); using activation types", error)
    return [n for n, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES)]


def _resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> tuple[str, ...]:
    available = _default_layers(model)
    if layers is None:
        if not available:
            raise ValueError(
                f"{type(model).__name__} has no activation modules to record; pass "
                "layers=[...] with the names of its nonlinearity modules (apply "
                "nonlinearities as modules such as nn.ReLU(), not as F.relu)."
            )
        return tuple(available)

    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    modules = dict(model.named_modules())
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(
            f"Invalid layers {list(layers)}: pass distinct names, for example "
            f"{available}."
        )
    for name in layers:
        if name not in modules or name == "":
            raise ValueError(
                f"Layer {name!r} is not in the model; its hidden layers (activation "
                f"modules) are {available}."
            )
        module = modules[name]
        if isinstance(module, _NOT_ACTIVATIONS) or any(module.children()):
            raise ValueError(
                f"Layer {name!r} is a {type(module).__name__}, not an activation "
                "module; name the nonlinearity whose input is the pre-activation, "
                f"one of {available}."
            )
    return layers


def _as_index(values: Any, what: str) -> Tensor:
    index = torch.as_tensor(values)
    if (
        index.dim() != 1
        or index.numel() == 0
        or index.is_floating_point()
        or index.dtype == torch.bool
    ):
        raise ValueError(
            f"{what} must be a non-empty 1-D sequence of integers, got "
            f"{values!r:.80}; pass for example [0, 1, 2]."
        )
    index = index.long().cpu()
    if (index < 0).any():
        raise ValueError(
            f"{what} has the negative index {int(index[index < 0][0])}; pass indices "
            "counted from 0."
        )
    if torch.unique(index).numel() != index.numel():
        raise ValueError(f"{what} has repeated indices; pass each index once.")
    return index


def _positions(index: Tensor, wanted: Any, name: str, what: str, where: str) -> Tensor:
    """Where each entry of ``wanted`` sits in ``index``, a 1-D tensor of distinct ints.

    Args:
        index: The tracked indices.
        wanted: The indices asked for.
        name: The argument's name, for errors (``"samples"``).
        what: How to name one missing entry, with ``{}`` for its value.
        where: The attribute that lists the tracked indices.

    Raises:
        ValueError: If ``wanted`` is not a 1-D sequence of distinct non-negative
            integers, or holds a value that ``index`` lacks.
    """
    wanted = _as_index(wanted, name)
    order = torch.argsort(index)
    ordered = index[order]
    slots = torch.searchsorted(ordered, wanted).clamp(max=index.numel() - 1)
    found = ordered[slots] == wanted
    if not bool(found.all()):
        missing = what.format(int(wanted[~found][0]))
        raise ValueError(
            f"The {missing} was not tracked, so it has no codes; the "
            f"{index.numel()} tracked ones are in .{where} (choose what to track "
            "when building the recorder: samples=, neurons=)."
        )
    return order[slots]


def _is_integer(value: Any) -> bool:
    """Whether ``value`` is an int or a NumPy integer, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(
        value, bool | np.bool_
    )


def _as_count(value: Any) -> int:
    """``value`` as a Python int: an int, a NumPy integer or a 0-d integer tensor."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = value.item()
    if not _is_integer(value):
        raise ValueError(
            f"Invalid num_samples {value!r}; pass the dataset size, an int."
        )
    return int(value)


def _sample_lookup(
    samples: Tensor | Sequence[int] | None, num_samples: int | None
) -> tuple[Tensor, Tensor]:
    """Tracked dataset indices ``[S]`` and the table dataset index -> row (-1)."""
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"Invalid num_samples {num_samples}; pass the dataset size.")
    if samples is None:
        if num_samples is None:
            raise ValueError(
                "Pass samples= (the dataset indices to track) or num_samples= (the "
                "dataset size, to track every sample), e.g. num_samples=len(train)."
            )
        index = torch.arange(num_samples)
        return index, index.clone()

    index = _as_index(samples, "samples").cpu()
    if num_samples is not None and int(index.max()) >= num_samples:
        raise ValueError(
            f"Sample index {int(index.max())} is out of range for a dataset of "
            f"{num_samples} samples; use indices in [0, {num_samples})."
        )
    size = num_samples if num_samples is not None else int(index.max()) + 1
    lookup = torch.full((size,), -1, dtype=torch.int64)
    lookup[index] = torch.arange(index.numel())
    return index, lookup


def _requested_neurons(
    neurons: Mapping[str, Sequence[int]] | Sequence[int] | Tensor | None,
    layers: Sequence[str],
) -> dict[str, Tensor | None]:
    if neurons is None:
        return dict.fromkeys(layers)
    if isinstance(neurons, Mapping):
        unknown = [k for k in neurons if k not in layers]
        if unknown:
            raise ValueError(
                f"neurons names layers that are not recorded: {unknown}; use the "
                f"recorded layers {list(layers)}."
            )
        return {
            name: _as_index(neurons[name], f"neurons[{name!r}]")
            if name in neurons
            else None
            for name in layers
        }
    index = _as_index(neurons, "neurons")
    return {name: index for name in layers}


def _epoch_schedule(
    epochs: Iterable[int] | Callable[[int], bool] | None,
) -> Callable[[int], bool]:
    if epochs is None:
        return lambda epoch: True
    if callable(epochs):
        return epochs
    chosen = set()
    for epoch in epochs:
        if not _is_integer(epoch):
            raise ValueError(
                f"Invalid epoch {epoch!r} in epochs; pass 0-based epoch numbers "
                "(ints) or a function epoch -> bool."
            )
        if epoch < 0:
            raise ValueError(f"Invalid epoch {epoch} in epochs; epochs count from 0.")
        chosen.add(int(epoch))
    return chosen.__contains__


def _infer_width(model: nn.Module, name: str) -> int | None:
    """Neurons of an activation module in an nn.Sequential, from the layer before.

    Returns None when the width cannot be read off the module tree; it is then
    learnt at the first forward pass.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(parent, nn.Sequential) or type(parent).forward is not (
        nn.Sequential.forward
    ):
        return None

    children = list(parent.named_children())
    position = [n for n, _ in children].index(child)
    for _, module in reversed(children[:position]):
        if isinstance(module, nn.Linear):
            return module.out_features
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.out_channels
        if isinstance(module, nn.modules.batchnorm._NormBase):
            return module.num_features
        if not isinstance(module, (*_WIDTH_PRESERVING, *ACTIVATION_TYPES)):
            return None
    return None


def _batch_index(batch: Any) -> Any:
    """The dataset indices of a batch.

    ``batch.index`` (neuronlib's ``Batch``), ``batch["index"]`` (a mapping) or
    ``batch[2]`` (an ``(x, y, index)`` tuple).
    """
    index = getattr(batch, "index", None)
    if callable(index):  # tuple.index or list.index, not a field
        index = None
    if index is None and isinstance(batch, Mapping):
        index = batch.get("index")
    is_plain_sequence = isinstance(batch, (tuple, list)) and not hasattr(
        type(batch), "_fields"
    )
    if index is None and is_plain_sequence and len(batch) >= 3:
        index = batch[2]
    if index is None:
        raise ValueError(_NO_INDEX_MESSAGE + ".")
    return index
