"""Canonical, length-limited Huffman coding of small alphabets (Huffman 1952, "A Method for the Construction
of Minimum-Redundancy Codes"), as used by Deep Compression (Han et al. 2016, section 4) for cluster
indices and relative index differences.

A codebook is the list of code lengths, one per symbol (0: the symbol does not occur), at most
`MAX_CODE_BITS`; the codes themselves are the canonical ones (shorter codes first, then by symbol), so
the lengths alone define the code and are what a file stores (two symbols per byte). Streams are
packed most significant bit first and padded with zero bits to a whole byte.
"""

from __future__ import annotations

import heapq

import numpy as np

from zoo.errors import ZooError

MAX_CODE_BITS = 15  # longest code; lengths are stored as 4-bit nibbles


def code_lengths(counts: np.ndarray, limit: int = MAX_CODE_BITS) -> np.ndarray:
    """Huffman code lengths (uint8) for symbol counts; frequencies are flattened until no code exceeds `limit`."""
    counts = np.asarray(counts, dtype=np.int64)
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.uint8)
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    c = counts.copy()
    while used.size:
        depth = _huffman_depths({int(s): int(c[s]) for s in used})
        if max(depth.values()) <= limit:
            for s, d in depth.items():
                lengths[s] = d
            return lengths
        c[used] = np.maximum(c[used] // 2, 1)  # flatter frequencies give shorter longest codes
    return lengths


def _huffman_depths(freq: dict[int, int]) -> dict[int, int]:
    """Depth of each symbol in a Huffman tree of these frequencies (ties broken by insertion order)."""
    heap = [(f, i, (s,)) for i, (s, f) in enumerate(sorted(freq.items()))]
    heapq.heapify(heap)
    depth = {s: 0 for s in freq}
    tie = len(heap)
    while len(heap) > 1:
        f1, _, a = heapq.heappop(heap)
        f2, _, b = heapq.heappop(heap)
        for s in a + b:
            depth[s] += 1
        heapq.heappush(heap, (f1 + f2, tie, a + b))
        tie += 1
    return depth


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code (as an int) of each symbol with a nonzero length."""
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths).tolist(), key=lambda s: (int(lengths[s]), s)):
        code <<= int(lengths[s]) - prev
        prev = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def check_lengths(lengths: np.ndarray, count: int, what: str) -> None:
    """Refuse code lengths over the limit, or that no prefix code has (Kraft sum above 1), or none for data."""
    if lengths.size and int(lengths.max()) > MAX_CODE_BITS:
        raise ZooError(f"{what}: a code length of {int(lengths.max())} bits; at most {MAX_CODE_BITS} are allowed")
    kraft = sum(2.0 ** -int(n) for n in lengths if n)
    if kraft > 1.0:
        raise ZooError(f"{what}: the code lengths are not those of a prefix code (Kraft sum {kraft:g} > 1)")
    if count and not lengths.any():
        raise ZooError(f"{what}: {count} symbols are coded but the codebook has no codes")


def pack_lengths(lengths: np.ndarray) -> bytes:
    """Code lengths as 4-bit nibbles, two per byte (high nibble first)."""
    n = lengths.astype(np.uint8)
    if n.size % 2:
        n = np.append(n, np.uint8(0))
    return ((n[0::2] << 4) | n[1::2]).astype(np.uint8).tobytes()


def unpack_lengths(data: bytes, n: int) -> np.ndarray:
    """The first n code lengths of `pack_lengths` bytes."""
    b = np.frombuffer(data, dtype=np.uint8)
    return np.stack([b >> 4, b & 15], axis=1).reshape(-1)[:n].copy()


def encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """The canonical Huffman bit stream of `symbols` (every symbol must have a code), zero-padded to bytes."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b""
    codes, lens = canonical_codes(lengths)[symbols], lengths.astype(np.int64)[symbols]
    if int(lens.min()) == 0:
        raise ZooError("huffman: a symbol to encode has no code")
    shifts = MAX_CODE_BITS - 1 - np.arange(MAX_CODE_BITS)
    left = codes << (MAX_CODE_BITS - lens)  # codes left-aligned in MAX_CODE_BITS bits
    bits = ((left[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    keep = np.arange(MAX_CODE_BITS)[None, :] < lens[:, None]
    return np.packbits(bits[keep]).tobytes()


def decode(data: bytes, lengths: np.ndarray, count: int, what: str) -> np.ndarray:
    """`count` symbols of a stream written by `encode`; ZooError (naming `what`) if the stream is damaged."""
    if count == 0:
        if data:
            raise ZooError(f"{what}: {len(data)} bytes where no symbols are coded")
        return np.zeros(0, dtype=np.int64)
    if count > 8 * len(data):  # every code has at least one bit
        raise ZooError(f"{what}: {len(data)} bytes cannot hold {count} symbols; the stream is truncated")
    width = int(lengths.max())
    table_sym = np.zeros(1 << width, dtype=np.int64)
    table_len = np.zeros(1 << width, dtype=np.int64)  # 0: no code starts with these bits
    codes = canonical_codes(lengths)
    for s in np.flatnonzero(lengths).tolist():
        n = int(lengths[s])
        lo = int(codes[s]) << (width - n)
        table_sym[lo: lo + (1 << (width - n))] = s
        table_len[lo: lo + (1 << (width - n))] = n
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    total = bits.size
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint8)]).astype(np.int64)
    window = np.zeros(total + 1, dtype=np.int64)  # the `width` bits starting at each position, as an int
    for j in range(width):
        window = (window << 1) | padded[j: j + total + 1]
    win, tsym, tlen = window.tolist(), table_sym.tolist(), table_len.tolist()
    out = [0] * count
    pos = 0
    for i in range(count):
        if pos > total:
            break
        v = win[pos]
        n = tlen[v]
        if n == 0:
            raise ZooError(f"{what}: bits at position {pos} match no code of the codebook")
        out[i] = tsym[v]
        pos += n
    if pos > total:
        raise ZooError(f"{what}: the stream ends after {total} bits, before its {count} symbols")
    if (pos + 7) // 8 != len(data) or (total > pos and bits[pos:].any()):
        raise ZooError(f"{what}: {len(data)} bytes hold {count} symbols in {pos} bits; the stream has extra data")
    return np.asarray(out, dtype=np.int64)
