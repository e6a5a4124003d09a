"""Keys are namespaced (model, TP rank/size, dtype, layout, salt, PP stage), a page stored by
one backend instance is found by another through the shared service, and a service that is
down or slow turns every call into a miss instead of an error."""

from __future__ import annotations

import signal
import socket
import time

import pytest
import torch

from connectors.sglang.transport import ArenaTransport, HttpTransport
from tests.connectors.sglang.pools import HostPool, make_model, page_indices
from tests.processes import free_port

BASE = {"tp_rank": 0, "tp_size": 2}


@pytest.mark.parametrize(
    "other",
    [
        {"model": "test-org/other-model"},
        {"tp_rank": 1},
        {"tp_size": 4},
        {"dtype": torch.float16},
        {"layout": "layer_first"},
        {"extra": {"salt": "tenant-b"}},
        {"pp_rank": 1, "pp_size": 2},
    ],
    ids=["model", "tp_rank", "tp_size", "dtype", "layout", "salt", "pp"],
)
def test_namespaces_never_collide(service, make_backend, other):
    model = make_model()
    writer, pool = make_backend(service.url, model=model, **BASE)
    keys = [f"collide-{i}" for i in range(3)]
    pool.fill(page_indices(0, 3), seed=10)
    assert writer.batch_set_v1(keys, page_indices(0, 3)) == [True] * 3

    cfg = BASE | other
    pool_b = HostPool(cfg.pop("layout", "page_first"), dtype=cfg.pop("dtype", torch.bfloat16))
    stranger, _ = make_backend(service.url, pool=pool_b, **({"model": model} | cfg))
    assert stranger.batch_exists(keys) == 0
    assert stranger.batch_get_v1(keys, page_indices(8, 3)) == [False] * 3
    assert not pool_b.kv_buffer.any(), "a miss wrote into the host pool"

    twin, _ = make_backend(service.url, model=model, **BASE)
    assert twin.batch_exists(keys) == 3


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_page_stored_by_one_instance_is_read_by_another(service, make_backend, layout):
    model = make_model()
    writer, pool_a = make_backend(service.url, layout, model=model, extra={"zero_copy": "on"})
    keys = [f"shared-{layout}-{i}" for i in range(4)]
    pool_a.fill(page_indices(0, 4), seed=11)
    expected = pool_a.pages(page_indices(0, 4))
    assert writer.batch_set_v1(keys, page_indices(0, 4)) == [True] * 4
    writer.close()

    # A separate engine process would have its own pool and client; this one reads over HTTP.
    reader, pool_b = make_backend(service.url, layout, model=model, extra={"zero_copy": "off"})
    assert reader.batch_exists(keys) == 4
    assert reader.batch_get_v1(keys, page_indices(3, 4)) == [True] * 4
    assert isinstance(reader._bindings["v1"].transport, HttpTransport)
    for want, got in zip(expected, pool_b.pages(page_indices(3, 4)), strict=True):
        assert torch.equal(want, got)


def test_mla_replicas_share_rank_zeros_pages(service, make_backend):
    model = make_model()
    mla = {"model": model, "is_mla_model": True, "tp_size": 2}
    rank0, pool0 = make_backend(service.url, tp_rank=0, **mla)
    rank1, pool1 = make_backend(service.url, tp_rank=1, **mla)
    keys = [f"mla-{i}" for i in range(2)]
    pool1.fill(page_indices(0, 2), seed=12)
    assert rank1.batch_set_v1(keys, page_indices(0, 2)) == [True, True]
    assert rank0.batch_exists(keys) == 0, "a non-writer replica stored pages"

    pool0.fill(page_indices(0, 2), seed=13)
    assert rank0.batch_set_v1(keys, page_indices(0, 2)) == [True, True]
    assert rank1.batch_get_v1(keys, page_indices(4, 2)) == [True, True]
    assert torch.equal(pool1.kv_buffer[:, 16:24], pool0.kv_buffer[:, 0:8])


def _assert_all_misses(backend, pool: HostPool) -> None:
    keys = ["down-0", "down-1"]
    assert backend.batch_exists(keys) == 0
    assert backend.exists(keys[0]) is False
    assert backend.batch_get_v1(keys, page_indices(0, 2)) == [False, False]
    assert backend.batch_set_v1(keys, page_indices(0, 2)) == [False, False]
    assert backend.get(keys[0], pool.get_dummy_flat_data_page()) is None
    assert backend.batch_get(keys, [pool.get_dummy_flat_data_page()] * 2) == [None, None]
    assert backend.set(keys[0], pool.get_data_page(0)) is False


def test_service_down_is_a_miss(make_backend):
    backend, pool = make_backend(f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    _assert_all_misses(backend, pool)
    assert time.monotonic() - t0 < 2.0, "a refused connection must fail fast"


def test_slow_service_is_a_miss(make_backend):
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        backend, pool = make_backend(url, extra={"timeout": 0.2})
        t0 = time.monotonic()
        assert backend.batch_exists(["slow"]) == 0
        assert backend.batch_get_v1(["slow"], page_indices(0, 1)) == [False]
        assert time.monotonic() - t0 < 3.0
        assert not pool.kv_buffer.any()


def test_service_restart_then_hits_again(make_service, make_backend):
    svc = make_service()
    backend, pool = make_backend(svc.url)  # same host: zero copy through the arena
    keys = [f"restart-{i}" for i in range(3)]
    pool.fill(page_indices(0, 3), seed=14)
    expected = pool.pages(page_indices(0, 3))
    assert backend.batch_set_v1(keys, page_indices(0, 3)) == [True] * 3
    assert isinstance(backend._bindings["v1"].transport, ArenaTransport)

    assert svc.stop(signal.SIGTERM) == 0, svc.output()
    _assert_all_misses(backend, pool)

    svc.start()  # same arena path and disk dir: blocks come back from disk
    assert backend.batch_exists(keys) == 3
    assert backend.batch_get_v1(keys, page_indices(8, 3)) == [True] * 3
    for want, got in zip(expected, pool.pages(page_indices(8, 3)), strict=True):
        assert torch.equal(want, got)

    more = [f"restart-more-{i}" for i in range(2)]
    pool.fill(page_indices(4, 2), seed=15)
    assert backend.batch_set_v1(more, page_indices(4, 2)) == [True, True]
    assert backend.batch_get_v1(more, page_indices(12, 2)) == [True, True]
    assert torch.equal(pool.kv_buffer[:, 48:56], pool.kv_buffer[:, 16:24])


def test_backend_started_before_the_service_recovers(make_service, make_backend):
    svc = make_service()
    assert svc.stop(signal.SIGTERM) == 0, svc.output()
    backend, pool = make_backend(svc.url)  # SGLang came up first: every call is a miss
    keys = ["late-0", "late-1"]
    pool.fill(page_indices(0, 2), seed=16)
    assert backend.batch_set_v1(keys, page_indices(0, 2)) == [False, False]
    assert backend.batch_exists(keys) == 0

    svc.start()
    assert backend.batch_set_v1(keys, page_indices(0, 2)) == [True, True]
    assert backend.batch_get_v1(keys, page_indices(4, 2)) == [True, True]
    assert torch.equal(pool.kv_buffer[:, 16:24], pool.kv_buffer[:, 0:8])
