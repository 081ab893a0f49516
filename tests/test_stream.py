"""The shard reader: disjoint assignment, order fixed by seed and epoch, cursors, bad shards."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import tarfile

import numpy as np
import pytest

from llara_dist.data import shards as sh
from llara_dist.data.stream import Reader, ShardSet, _plain_tar_members, read_shard, reader_shards


def synthetic_docs(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [(sh.make_key("syn", i // 3, i % 3), rng.integers(4, 2000, rng.integers(1, 60)).tolist(),
             None if i % 3 == 2 else rng.integers(4, 2000, 20).tolist(), f"doc {i}") for i in range(n)]


@pytest.fixture
def seven_shards(tmp_path, write_test_shards):
    docs = synthetic_docs(40)
    return write_test_shards(tmp_path / "s", docs, 7), docs


def test_reader_shards_disjoint_and_complete():
    for n_shards, n_readers, epoch in [(7, 3, 0), (7, 3, 1), (12, 4, 5), (5, 5, 2)]:
        parts = [reader_shards(n_shards, 0, epoch, g, n_readers) for g in range(n_readers)]
        flat = [s for p in parts for s in p]
        assert sorted(flat) == list(range(n_shards))  # disjoint and complete
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_order_fixed_by_seed_and_epoch(seven_shards):
    folder, _ = seven_shards
    shards = ShardSet.open(str(folder))

    def keys(seed, reader=1, n=25):
        return [d.key for d in itertools.islice(Reader(shards, seed, reader, 2), n)]

    assert keys(3) == keys(3)
    assert keys(3) != keys(4)
    assert reader_shards(7, 3, 0, 0, 1) == reader_shards(7, 3, 0, 0, 1)
    orders = {tuple(reader_shards(7, 3, e, 0, 1)) for e in range(6)}
    assert len(orders) > 1  # the epoch changes the order


def test_every_document_once_per_epoch(seven_shards):
    folder, docs = seven_shards
    shards = ShardSet.open(str(folder))
    for epoch in range(2):
        seen = []
        for g in range(3):
            reader = Reader(shards, 5, g, 3, {"epoch": epoch})
            for d in reader:
                seen.append(d.key)
                if reader.epoch != epoch or reader.index == len(reader_shards(7, 5, epoch, g, 3)):
                    break
        assert sorted(seen) == sorted(k for k, *_ in docs)


def test_reader_cursor_resumes_exactly(seven_shards):
    folder, _ = seven_shards
    shards = ShardSet.open(str(folder))
    straight = [d.key for d in itertools.islice(Reader(shards, 1, 0, 1), 100)]  # crosses two epochs
    for k in (0, 1, 6, 39, 40, 41, 77):
        first = Reader(shards, 1, 0, 1)
        head = [d.key for d in itertools.islice(first, k)]
        cursor = json.loads(json.dumps(first.cursor()))
        tail = [d.key for d in itertools.islice(Reader(shards, 1, 0, 1, cursor), 100 - k)]
        assert head + tail == straight


def test_documents_round_trip(seven_shards):
    folder, docs = seven_shards
    got = {d.key: d for i in range(7) for d in read_shard(str(folder / sh.shard_name(i)))}
    assert len(got) == len(docs)
    for key, ids, nxt, _ in docs:
        assert got[key].ids.tolist() == ids
        assert (got[key].next_set is None) == (nxt is None)
        if nxt is not None:
            assert got[key].next_set.tolist() == sorted(set(nxt))


def test_fast_tar_walk_matches_tarfile(seven_shards):
    folder, _ = seven_shards
    data = (folder / sh.shard_name(0)).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar]
    assert _plain_tar_members(data) == expected


def test_pipe_url_template(seven_shards):
    folder, _ = seven_shards
    shards = ShardSet.open(f"pipe:cat {folder}/{{name}}")
    local = ShardSet.open(str(folder))
    assert shards.fingerprint == local.fingerprint
    # every reader of the manifest (the trainer looks up the tokenizer there) fills the template
    assert sh.read_manifest(f"pipe:cat {folder}/{{name}}") == sh.read_manifest(str(folder))
    assert [d.key for d in itertools.islice(Reader(shards, 0, 0, 2), 30)] == \
           [d.key for d in itertools.islice(Reader(local, 0, 0, 2), 30)]


def test_http_prefix(seven_shards):
    """http(s):// goes through webdataset's gopen (curl), here against a local server."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder, _ = seven_shards
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = ShardSet.open(f"http://127.0.0.1:{server.server_port}/")
        local = ShardSet.open(str(folder))
        assert remote.fingerprint == local.fingerprint
        assert [d.key for d in itertools.islice(Reader(remote, 0, 1, 2), 30)] == \
               [d.key for d in itertools.islice(Reader(local, 0, 1, 2), 30)]
    finally:
        server.shutdown()


def test_too_few_shards_refused(seven_shards):
    folder, _ = seven_shards
    with pytest.raises(ValueError) as e:
        ShardSet.open(str(folder)).check_readers(8, world=4, workers=2)
    msg = str(e.value)
    assert "7 shard(s) for 8 readers" in msg and "world size 4 x 2" in msg and "num_workers" in msg
    # with one reader a rank, fewer workers is no remedy
    with pytest.raises(ValueError) as e:
        ShardSet.open(str(folder)).check_readers(8, world=8, workers=1)
    assert "7 shard(s) for 8 readers" in str(e.value) and "num_workers" not in str(e.value)


def test_malformed_sample_names_shard_and_key(tmp_path, write_test_shards):
    folder = write_test_shards(tmp_path / "bad", synthetic_docs(6), 1)
    path = folder / sh.shard_name(0)
    bad = dict(sh.encode_sample("syn-000000099-00000", [5, 6], None, "x", {}), ids=b"\x01\x02\x03")
    good = [s for s in _samples(path)]
    sh.write_shard(path, good[:2] + [bad] + good[2:5])
    with pytest.raises(ValueError, match=r"shard-000000\.tar.*syn-000000099-00000"):
        read_shard(str(path))


def test_shard_shorter_than_manifest_refused(tmp_path, write_test_shards):
    folder = write_test_shards(tmp_path / "short", synthetic_docs(6), 1)
    path = folder / sh.shard_name(0)
    recorded = json.loads((folder / sh.MANIFEST).read_text())["shards"][0]["sha256"]
    sh.write_shard(path, list(_samples(path))[:4])  # a whole tar, two documents short
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match=f"shard-000000.tar: sha256 {actual} but the manifest says {recorded}"):
        next(iter(Reader(ShardSet.open(str(folder)), 0, 0, 1)))
    manifest = json.loads((folder / sh.MANIFEST).read_text())
    del manifest["shards"][0]["sha256"]  # a manifest without hashes: the document count still tells
    sh.write_manifest(folder, manifest)
    with pytest.raises(ValueError, match="holds 4 documents but the manifest says 6"):
        next(iter(Reader(ShardSet.open(str(folder)), 0, 0, 1)))


def test_reader_without_documents_refused(tmp_path, write_test_shards):
    folder = write_test_shards(tmp_path / "empty", [], 2)
    with pytest.raises(ValueError, match="no documents"):
        next(iter(Reader(ShardSet.open(str(folder)), 0, 1, 2)))


def _samples(path):
    """The raw samples of a shard, to rewrite it."""
    return sh.samples_in(_plain_tar_members(path.read_bytes()), str(path))


def test_unsorted_next_set_is_refused_naming_the_sample():
    from llara_dist.data.shards import decode_sample

    good = {"__key__": "a-1", "ids": np.array([5, 6], "<i4").tobytes(), "next": np.array([2, 9], "<i4").tobytes()}
    assert decode_sample(good, "s.tar").next_set.tolist() == [2, 9]
    for bad in (np.array([9, 2], "<i4").tobytes(), np.array([2, 2], "<i4").tobytes(), b"\x01\x02\x03"):
        with pytest.raises(ValueError, match=r"s.tar: sample 'a-1' has a .next member"):
            decode_sample({**good, "next": bad}, "s.tar")
