"""One regression test per defect of issue 12, each shown against its legacy ordering.

Each scenario is run twice where the old behaviour can be switched back on
(``powersim.set_test_flags``): the fixed ring loses nothing at the power cut, the
legacy ordering loses an acked (or seen) record -- so the test would have failed
before the fix, and the simulator demonstrably detects the defect.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import struct
from pathlib import Path

import pytest

from node.ring import Ring, RingNamespaceError, RingPersistError, RingSpaceError, liveness
from node.ring import descriptor as D
from node.ring.liveness import identity
from node.ring.powersim import (
    LEGACY_COMMIT,
    LEGACY_HEAD,
    LEGACY_RESOLVE,
    crash_image,
    fail_persists,
    install_image,
    pop_before_persist,
    set_test_flags,
)

from ._sim import Books, check_cut, parse, payload

CAP = 4096
DROP_UNPERSISTED = 0.0  # the cut keeps nothing that was not persisted


def _cut(path: Path, books: Books) -> list[str]:
    image = crash_image(path, random.Random(1), 64, DROP_UNPERSISTED)
    problems, _ = check_cut(image, path.with_name("scratch.ring"), books)
    return problems


# --------------------------------------------------------------------------- defect 1
@pytest.mark.parametrize("legacy", [False, True], ids=["fixed", "legacy-head-before-persist"])
def test_space_freed_by_a_pop_is_reused_only_once_the_head_is_durable(shm_dir: Path, legacy: bool) -> None:
    path = shm_dir / "r.ring"
    books = Books()
    with Ring.open(path, capacity=CAP, backend="sim") as ring:
        set_test_flags(ring, LEGACY_HEAD if legacy else 0)
        books.max_epoch = ring.epoch
        rid = 1
        while True:  # fill the ring: every record acked
            books.attempted.add(rid)
            if not ring.append(payload(rid, 200)):
                break
            books.ack([rid])
            rid += 1
        reader = ring.reader()
        recs = reader.read(ring.head, max_records=1000)
        books.seen.update({parse(r.payload): r.pos for r in recs})  # type: ignore[misc]
        # The consumer pops everything and is frozen just before persisting the head;
        # a producer tries to reuse the space and ack.
        pop_before_persist(reader, recs[-1].end)
        books.maybe_popped = set(books.acked)
        books.attempted.add(rid)
        reused = ring.append(payload(rid, 200))
        if reused:
            books.ack([rid])
        problems = _cut(path, books)
    if legacy:
        assert reused  # the old order let the producer in ...
        assert any("lost" in p for p in problems), problems  # ... and the cut lost its acked record
    else:
        assert not reused  # full until the pop is durable: back-pressure, not loss
        assert problems == []


def test_a_pop_interrupted_before_publishing_is_finished_by_the_next_consumer_or_empty_read(
    shm_dir: Path,
) -> None:
    path = shm_dir / "r.ring"
    with Ring.open(path, capacity=CAP, backend="sim") as ring:
        while ring.append(payload(1, 200)):
            pass
        reader = ring.reader()
        recs = reader.read(max_records=1000)
        pop_before_persist(reader, recs[-1].end)  # the consumer dies here
        reader.close()
        assert not ring.append(payload(2, 200))  # everything popped, yet full for producers
        reader = ring.reader()  # its replacement
        assert ring.append(payload(2, 200))
        while ring.append(payload(2, 200)):
            pass
        recs = reader.read(max_records=1000)
        pop_before_persist(reader, recs[-1].end)  # the same consumer, stuck once
        assert not ring.append(payload(3, 200))
        assert reader.read() == []  # nothing left to pop: an empty read finishes it
        assert ring.append(payload(3, 200))


# --------------------------------------------------------------------------- defect 2
@pytest.mark.parametrize("legacy", [False, True], ids=["fixed", "legacy-commit-before-persist"])
def test_a_reader_never_sees_a_record_before_its_persist_returned(shm_dir: Path, legacy: bool) -> None:
    path = shm_dir / "r.ring"
    books = Books(attempted={1, 2})
    with Ring.open(path, capacity=CAP, backend="sim") as ring:
        set_test_flags(ring, LEGACY_COMMIT if legacy else 0)
        books.max_epoch = ring.epoch
        assert ring.append(payload(1, 100))
        books.ack([1])
        # A live producer (this process) stopped in its append right before the persist.
        assert ring._append_partial([payload(2, 100)], 2) == 1
        reader = ring.reader()
        for rec in reader.read(ring.head):
            books.seen[parse(rec.payload)] = rec.pos  # type: ignore[index]
        problems = _cut(path, books)
    if legacy:
        assert 2 in books.seen  # committed before persisted: the reader forwarded it ...
        assert any("lost" in p and "seen [2]" in p for p in problems), problems  # ... the cut took it
    else:
        assert list(books.seen) == [1]  # the claim blocks the reader until it is durable
        assert problems == []


def test_a_record_persisted_but_not_committed_is_recovered(shm_dir: Path) -> None:
    path = shm_dir / "r.ring"
    with Ring.open(path, capacity=CAP, backend="sim") as ring:
        assert ring._append_partial([payload(1, 100)], 3) == 1  # persisted, then the power fails
        image = crash_image(path, random.Random(2), 64, DROP_UNPERSISTED)
    install_image(path, image)
    with Ring.open(path, capacity=CAP, backend="sim") as ring:
        assert [parse(r.payload) for r in ring.reader().read()] == [1]


@pytest.mark.parametrize("legacy", [False, True], ids=["fixed", "legacy-resolve-header-only"])
def test_a_settled_dead_claim_is_persisted_whole_before_it_is_delivered(shm_dir: Path, legacy: bool) -> None:
    path = shm_dir / "r.ring"
    books = Books(attempted={1})
    with Ring.open(path, capacity=CAP, backend="sim") as ring, Ring.open(path, backend="sim") as dead:
        pid, token = identity()
        dead._set_identity(pid, token + 1)  # a producer that is gone
        set_test_flags(ring, LEGACY_RESOLVE if legacy else 0)
        books.max_epoch = ring.epoch
        # It died after writing payload and checksum, before its persist and commit.
        assert dead._append_partial([payload(1, 300)], 1) == 1
        reader = ring.reader()
        for rec in reader.read():
            books.seen[parse(rec.payload)] = rec.pos  # type: ignore[index]
        assert reader.settled_dead == 1 and 1 in books.seen  # delivered: its checksum holds
        problems = _cut(path, books)
    if legacy:
        assert any("lost" in p and "seen [1]" in p for p in problems), problems
    else:
        assert problems == []


def test_a_failing_persist_while_settling_a_dead_claim_raises_and_delivers_nothing(shm_dir: Path) -> None:
    path = shm_dir / "r.ring"
    with Ring.open(path, capacity=CAP, backend="sim") as ring, Ring.open(path, backend="sim") as dead:
        pid, token = identity()
        dead._set_identity(pid, token + 1)
        assert dead._append_partial([payload(1, 300)], 1) == 1
        reader = ring.reader()
        fail_persists(ring)
        with pytest.raises(RingPersistError, match="settled record at 0"):
            reader.read()
        fail_persists(ring, False)
        assert [parse(r.payload) for r in reader.read()] == [1]


def test_a_failing_append_persist_raises_delivers_nothing_and_a_failing_pop_persist_frees_nothing(
    shm_dir: Path,
) -> None:
    path = shm_dir / "r.ring"
    with Ring.open(path, capacity=CAP, backend="sim") as ring:
        reader = ring.reader()
        fail_persists(ring)
        with pytest.raises(RingPersistError, match="not durable"):
            ring.append(payload(1, 10))
        fail_persists(ring, False)
        assert reader.read() == [] and ring.depth == 0  # never shown: it became padding
        assert ring.append(payload(2, 10))
        recs = reader.read()
        assert [parse(r.payload) for r in recs] == [2]
        free = ring._load(D.FREE_HEAD_OFFSET)
        fail_persists(ring)
        with pytest.raises(RingPersistError, match="head"):
            reader.pop(recs[-1].end)
        assert ring._load(D.FREE_HEAD_OFFSET) == free < recs[-1].end  # producers may not reuse it yet
        fail_persists(ring, False)
        assert reader.pop(recs[-1].end) == 0  # finishes the failed pop
        assert ring._load(D.FREE_HEAD_OFFSET) == ring.head == recs[-1].end


# --------------------------------------------------------------------------- defect 3
@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(errno.EACCES, "hidepid"),
        OSError(errno.EMFILE, "too many files"),
        OSError(errno.EIO, "x"),
    ],
    ids=["EACCES", "EMFILE", "EIO"],
)
def test_liveness_counts_a_producer_alive_unless_proc_says_it_is_gone(
    monkeypatch: pytest.MonkeyPatch, exc: OSError
) -> None:
    pid, token = identity()

    def refuse(*args: object, **kwargs: object) -> object:
        raise exc

    monkeypatch.setattr(liveness, "open", refuse, raising=False)
    assert liveness.is_alive(pid, token + 1)  # even a mismatching token: nothing was read


@pytest.mark.parametrize(
    "exc", [FileNotFoundError(errno.ENOENT, "gone"), ProcessLookupError(errno.ESRCH, "reaped")]
)
def test_liveness_counts_a_producer_dead_when_its_proc_entry_is_gone(
    monkeypatch: pytest.MonkeyPatch, exc: OSError
) -> None:
    me = identity()

    def refuse(*args: object, **kwargs: object) -> object:
        raise exc

    monkeypatch.setattr(liveness, "open", refuse, raising=False)
    assert not liveness.is_alive(*me)


def test_liveness_dead_on_zombie_or_start_time_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    pid, token = identity()
    assert liveness.is_alive(pid, token) and not liveness.is_alive(pid, token + 1)
    fields = ["Z"] + ["0"] * 18 + [str(token)]
    monkeypatch.setattr(liveness, "_stat_fields", lambda _pid: fields)
    assert not liveness.is_alive(pid, token)


def test_a_claim_whose_producer_cannot_be_checked_is_never_settled(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = shm_dir / "r.ring"
    with Ring.open(path, capacity=CAP, backend="sim") as ring, Ring.open(path, backend="sim") as other:
        pid, token = identity()
        other._set_identity(pid, token + 1)  # would be "dead" -- if /proc could be read
        assert other._append_partial([payload(1, 50)], 0) == 1
        reader = ring.reader()
        real_open = open

        def hidepid(file: object, *args: object, **kwargs: object) -> object:
            if str(file).startswith("/proc/") and str(file).endswith("/stat"):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(liveness, "open", hidepid, raising=False)
        assert reader.read() == [] and reader.settled_dead == 0  # waits, as for a live producer
        monkeypatch.undo()
        reader._liveness.clear()
        assert reader.read() == [] and reader.settled_dead == 1  # now known dead: padded (no checksum)


def test_a_ring_from_another_pid_namespace_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "r.ring"
    Ring.open(path, capacity=CAP, backend="mmap").close()
    with open(path, "r+b") as fh:
        fh.seek(D.PIDNS_OFFSET)
        fh.write(struct.pack("<Q", 4026531836 + 12345))
    with pytest.raises(RingNamespaceError) as exc:
        Ring.open(path, capacity=CAP, backend="mmap")
    here = os.stat("/proc/self/ns/pid").st_ino
    assert exc.value.found == 4026531836 + 12345 and exc.value.expected == here
    assert (
        str(4026531836 + 12345) in str(exc.value)
        and str(here) in str(exc.value)
        and str(path) in str(exc.value)
    )


# --------------------------------------------------------------------------- defect 4
def test_ring_files_are_preallocated_private_and_their_entries_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "r.ring"
    with Ring.open(path, capacity=1 << 16, backend="mmap") as ring:
        ring.reader()
    st = os.stat(path)
    assert st.st_blocks * 512 >= st.st_size == D.file_size(1 << 16)
    for p in (path, Path(f"{path}.lock"), Path(f"{path}.consumer")):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    # the new ring (after its rename), the .lock and the .consumer entries
    assert synced.count(str(tmp_path)) >= 3, synced


def test_a_sparse_ring_file_is_refused_naming_path_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "r.ring"
    Ring.open(path, capacity=1 << 16, backend="mmap").close()
    header = path.read_bytes()[: D.HEADER_SIZE]
    path.unlink()
    with open(path, "wb") as fh:  # same content, but the data area is a hole
        fh.write(header)
        fh.truncate(D.file_size(1 << 16))
    with pytest.raises(RingSpaceError) as exc:
        Ring.open(path, capacity=1 << 16, backend="mmap")
    assert exc.value.needed == D.file_size(1 << 16) and exc.value.allocated < exc.value.needed
    assert str(path) in str(exc.value) and str(D.file_size(1 << 16)) in str(exc.value)


# --------------------------------------------------------------------------- epoch
def test_epoch_changes_at_every_recovery_and_only_then(shm_dir: Path) -> None:
    path = shm_dir / "r.ring"
    with Ring.open(path, capacity=CAP, backend="sim") as first:
        assert first.recovered and isinstance(first.epoch, int)
        e = first.epoch
        with Ring.open(path, backend="sim") as second:  # shared open: no recovery, same epoch
            assert not second.recovered and second.epoch == e
        assert first.append(payload(1, 10))
        image = crash_image(path, random.Random(3), 64, 0.5)
    with Ring.open(path, backend="sim") as again:  # clean restart: recovered, new epoch
        assert again.recovered and again.epoch == e + 1
    install_image(path, image)
    with Ring.open(path, backend="sim") as after_cut:
        assert after_cut.epoch == e + 1  # the image predates the restart above
        assert [parse(r.payload) for r in after_cut.reader().read()] == [1]
