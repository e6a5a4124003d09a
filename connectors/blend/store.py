"""Chunk KV through the cache service: pack a chunk's per-layer K/V into fixed-size blocks,
register it under its chunk key, and find it again from any prompt that contains it.

Chunk bytes go through the service's shared-memory arena when this process can map it (the
service on this host), as prefix blocks do. A save reserves slots for the chunk's blocks
(chained from the chunk key), packs the KV straight into them, commits them with their
checksums and then registers the chunk. A read acquire pins the blocks' slots, each payload is
copied out of its slot and the copy is checked against the block's xxh3 (the bytes used are
the bytes verified), then the lease is released; for a CUDA engine the copy is pinned memory
that moves to the device in one DMA on a side stream (``to_device``). A remote service,
blocks the arena does not hold, or a save the arena had no room for travel as HTTP bodies.

Block payload layout (one block = ``block_tokens`` chunk tokens, the last one zero padded):
``[layer][K, V][token][kv_head][head_dim]`` in the namespace dtype, little-endian. Keys are
stored rotated at the chunk's canonical start, which the chunk index records; the reader
re-rotates them to wherever the chunk lands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import xxhash

from cacheservice.arena import ArenaClient
from cacheservice.errors import BadRequest, ServiceUnavailable
from connectors.blend.chunking import Chunk
from connectors.blend.recompute import ChunkKV
from index.hashing import Namespace, chunk_block_keys, chunk_key, spot_checksum

if TYPE_CHECKING:  # the client module pulls in the whole service; connectors need only a client
    from cacheservice.client import CacheClient

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise BadRequest(f"dtype {self.dtype!r} unsupported: use one of {sorted(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def block_bytes(self) -> int:
        item = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.num_layers * 2 * self.block_tokens * self.kv_heads * self.head_dim * item


def pack(chunk: ChunkKV, layout: KVLayout) -> bytes:
    return pack_blocks(chunk, layout).view(torch.uint8).numpy().tobytes()


def pack_blocks(chunk: ChunkKV, layout: KVLayout) -> torch.Tensor:
    """The chunk's blocks, ``[blocks, block_bytes / item]`` in the payload layout (a new
    tensor)."""
    n, bt = chunk.tokens.shape[0], layout.block_tokens
    nb = -(-n // bt)
    kv = torch.stack([torch.stack((k, v)) for k, v in zip(chunk.keys, chunk.values, strict=True)])
    if kv.shape[1:] != (2, n, layout.kv_heads, layout.head_dim) or kv.shape[0] != layout.num_layers:
        raise BadRequest(f"chunk KV shape {tuple(kv.shape)} does not match the layout {layout}")
    pad = kv.new_zeros((layout.num_layers, 2, nb * bt - n, layout.kv_heads, layout.head_dim))
    kv = torch.cat((kv, pad), dim=2).to(layout.torch_dtype)
    blocks = kv.view(layout.num_layers, 2, nb, bt, -1).permute(2, 0, 1, 3, 4).contiguous()
    return blocks.view(nb, -1)


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def to_device(raw: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``raw`` (host, pinned when it came from ``ChunkStore`` with a CUDA device) on
    ``device``: one contiguous copy on a side stream, which the current stream then waits
    for on the device (the host does not block; the caching host allocator keeps pinned
    memory alive until its copy is done)."""
    if device.type != "cuda":
        return raw.to(device)
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        out = raw.to(device, non_blocking=True)
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    out.record_stream(current)  # its memory is used on the current stream from here on
    return out


def unpack(
    tokens: torch.Tensor,
    start_pos: int,
    data: bytes | bytearray | torch.Tensor,
    layout: KVLayout,
    device: torch.device | None = None,
) -> ChunkKV:
    """Per-layer K/V of a chunk from its blocks' bytes; on ``device`` when given (the bytes
    move once, contiguous, and are permuted there). Tokens stay on the host."""
    n, bt = tokens.shape[0], layout.block_tokens
    nb = -(-n // bt)
    assert len(data) == nb * layout.block_bytes, "caller checked the block count"
    if isinstance(data, torch.Tensor):
        raw = data
    else:
        buf = np.frombuffer(data, dtype=np.uint8)
        raw = torch.from_numpy(buf if buf.flags.writeable else buf.copy())
    if device is not None and device != raw.device:
        raw = to_device(raw, device)
    raw = raw.view(layout.torch_dtype)
    kv = raw.view(nb, layout.num_layers, 2, bt, layout.kv_heads, layout.head_dim)
    kv = kv.permute(1, 2, 0, 3, 4, 5).reshape(layout.num_layers, 2, nb * bt, *kv.shape[-2:])
    kv = kv[:, :, :n]
    return ChunkKV(tokens.clone(), start_pos, list(kv[:, 0].unbind(0)), list(kv[:, 1].unbind(0)))


class ChunkStore:
    """Stores and finds chunk KV for one namespace. Construction registers the namespace and
    raises ServiceUnavailable when the service is down; afterwards a down or slow service
    makes ``save`` return False and ``load`` return misses: the caller recomputes."""

    def __init__(
        self,
        client: CacheClient,
        ns: Namespace,
        layout: KVLayout,
        arena: bool = True,
        device: torch.device | None = None,
    ) -> None:
        """``device``: where loaded chunks go (the engine's KV cache device); on CUDA, blocks
        are copied out of the arena into pinned memory and moved by DMA on a side stream."""
        if ns.block_tokens != layout.block_tokens:
            raise BadRequest("namespace and layout disagree on block_tokens: use one value")
        self.client, self.layout = client, layout
        self.device = device
        info = client.register(ns, layout.block_bytes)
        self.ns_id, self.seed = info.ns, info.seed
        self._arena: ArenaClient | None = None
        path = (info.arena or {}).get("path")
        if arena and path:
            try:
                self._arena = ArenaClient(path)
            except (OSError, ValueError, ServiceUnavailable):
                self._arena = None  # another host's service: HTTP bodies
        self.stats = {"arena_reads": 0, "http_reads": 0, "arena_saves": 0, "http_saves": 0}

    def close(self) -> None:
        if self._arena is not None:
            self._arena.close()

    def key(self, tokens: torch.Tensor) -> bytes:
        return chunk_key(tokens.tolist(), self.seed)

    def save(self, chunk: ChunkKV) -> bool:
        """Store and register ``chunk``; False when the service is down or could not keep it."""
        toks = chunk.tokens.tolist()
        key, n = self.key(chunk.tokens), len(toks)
        keys = chunk_block_keys(toks, self.seed, self.layout.block_tokens)
        blocks = pack_blocks(chunk, self.layout).view(torch.uint8).numpy()
        try:
            if self._arena is not None:
                self._write_slots(key, keys, blocks)
                if self.client.register_chunk(self.ns_id, key, n, chunk.start_pos, keys):
                    self.stats["arena_saves"] += 1
                    return True
            # no arena, or it could not take every block: the body goes through lower tiers
            ok = self.client.register_chunk(self.ns_id, key, n, chunk.start_pos, keys, blocks)
            self.stats["http_saves"] += ok
            return ok
        except ServiceUnavailable:
            return False

    def _write_slots(self, key: bytes, keys: list[bytes], blocks: np.ndarray) -> None:
        """Copy the blocks the service lacks into slots reserved for them and commit them."""
        assert self._arena is not None, "only with a mapped arena"
        res = self.client.reserve(self.ns_id, keys, key, chunk=True)
        if not res.lease:
            return  # every block held already, or no room: register_chunk tells which
        view, n = self._arena.current(), self.layout.block_bytes
        slots = res.slots[: len(keys)]
        sums: list[int | None] = []
        spots: list[int | None] = []
        for i, slot in enumerate(slots):
            if slot is None:
                sums.append(None)
                spots.append(None)
                continue
            dst = np.frombuffer(view.payload(slot, n), dtype=np.uint8)
            np.copyto(dst, blocks[i])
            # the full hash is what readers verify; the service checks only the spots
            sums.append(xxhash.xxh3_64_intdigest(dst))
            spots.append(spot_checksum(dst))
        self.client.commit(res.lease, [s is not None for s in slots], sums, spots)

    def load(
        self, tokens: torch.Tensor, chunks: Sequence[Chunk], strict: bool = False
    ) -> dict[bytes, ChunkKV | None]:
        """Chunk KV for each of ``chunks`` (spans of ``tokens``), None for a miss. A service
        that fails midway gives misses for the rest, or raises ServiceUnavailable if
        ``strict`` (a caller that must tell a failing service from a miss)."""
        out: dict[bytes, ChunkKV | None] = {c.key: None for c in chunks}
        try:
            entries = self.client.lookup_chunks(self.ns_id, [c.key for c in chunks])
            for c, e in zip(chunks, entries, strict=True):
                if e is None or e.num_tokens != c.num_tokens:
                    continue
                data = self._read(e.keys)
                if data is not None:
                    span = tokens[c.start : c.end]
                    out[c.key] = unpack(span, e.start_pos, data, self.layout, self.device)
        except ServiceUnavailable:
            if strict:
                raise
        return out

    def _read(self, keys: list[bytes]) -> bytes | bytearray | torch.Tensor | None:
        """Every block of ``keys``, verified, or None."""
        data = self._read_arena(keys) if self._arena is not None else None
        if data is not None:
            self.stats["arena_reads"] += 1
            return data
        got = self.client.get_blocks(self.ns_id, keys, prefix=True)  # verified by the service
        self.stats["http_reads"] += 1
        return got.data if got.count == len(keys) else None

    def _read_arena(self, keys: list[bytes]) -> bytearray | torch.Tensor | None:
        """None unless every block is in the arena and verifies (the caller then asks over
        HTTP, which reads lower tiers and drops what fails its checksum)."""
        assert self._arena is not None, "only with a mapped arena"
        acq = self.client.acquire(self.ns_id, keys)
        if not acq.lease:
            return None
        try:
            view, n = self._arena.current(), self.layout.block_bytes
            if len(acq.slots) < len(keys) or any(x != n for x in acq.lengths[: len(keys)]):
                return None
            if self.device is not None and self.device.type == "cuda":  # DMA-able as it is
                out = torch.empty(len(keys) * n, dtype=torch.uint8, pin_memory=True)
                dst = memoryview(out.numpy())
            else:
                out = bytearray(len(keys) * n)
                dst = memoryview(out)
            for i, (slot, want) in enumerate(zip(acq.slots, acq.checksums, strict=False)):
                dst[i * n : (i + 1) * n] = view.payload(slot, n)
                if xxhash.xxh3_64_intdigest(dst[i * n : (i + 1) * n]) != want:
                    return None
            return out
        finally:
            self.client.release(acq.lease)
