"""Build script of the ring's C helper ``node.ring._chelper`` (cffi API mode).

``pip install -e .`` (setup.py ``cffi_modules``) or ``python node/ring/_cbuild.py``
compiles it in place.  The helper never links libpmem: the persist function is
passed in as a pointer (libpmem is loaded at run time, in ABI mode, by
``node.ring.backend``).  Every exported symbol starts with ``iotring_`` so none can
bind to a libc symbol of the same name.  Byte offsets come from
``node/ring/descriptor.py`` (loaded by path: the build must not import ``node``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from cffi import FFI  # type: ignore[import-untyped]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _descriptor() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_iotring_descriptor", os.path.join(_HERE, "descriptor.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_iotring_descriptor", mod)
    spec.loader.exec_module(mod)
    return mod


# The structs shared by Python (cffi cdef) and C: one text, so the two never disagree.
TYPES = """
typedef struct {
    uintptr_t base;        /* address of the mapping (file header) */
    uint64_t cap;          /* data capacity, power of two */
    uint32_t seed;         /* CRC32C of the ring id */
    uint32_t pid;          /* this producer's pid */
    uint64_t token;        /* this producer's start time */
    int persist_mode;      /* 0 none, 1 void fn(addr,len), 2 int fn(addr,len), 3 msync, 4 power sim */
    uintptr_t persist_fn;
    uint64_t pagesize;
    int cancel;            /* set by close(): waits in this process return */
    uint32_t max_record;   /* largest payload accepted */
    uintptr_t flush_fn;    /* pmem_flush (pmem backend only, else 0): with drain_fn, enables */
    uintptr_t drain_fn;    /* pmem_drain   non-temporal payload stores + header-line flushes */
    uintptr_t sim_base;    /* power simulator (tests only, persist_mode 4): the durable image mapping */
    uint64_t sim_size;     /*   its size (= the ring file's) */
    uint64_t sim_unit;     /*   what one persist makes durable around a range: 64 (pmem) or 4096 (msync) */
    int sim_eio;           /*   nonzero: every persist fails with EIO */
    int sim_nt;            /*   nonzero: every append takes the pmem non-temporal path (model "pmem-nt") */
    uint32_t test_flags;   /* TESTS ONLY: IOTRING_LEGACY_* orderings the power simulator must catch */
} iotring_ctx;

typedef struct {
    uint64_t pos;
    uint32_t pid;
    uint32_t reserved;
    uint64_t token;
} iotring_block;
"""

CDEF = (
    TYPES
    + """
uint32_t iotring_crc32c(uint32_t crc, const uint8_t *buf, size_t len);
int iotring_mutex_init(const iotring_ctx *c);
int64_t iotring_append(const iotring_ctx *c, const char *buf, const uint32_t *lens, uint32_t n,
                       uint64_t *first_pos);
int64_t iotring_append1(const iotring_ctx *c, const char *buf, uint32_t len, uint64_t *first_pos);
int64_t iotring_append_iov(const iotring_ctx *c, const char *const *bufs, const uint32_t *lens, uint32_t n,
                           uint64_t *first_pos);
int64_t iotring_append_packed(const iotring_ctx *c, const char *buf, uint64_t buf_len, const uint32_t *lens,
                              uint32_t n, uint64_t *first_pos);
int64_t iotring_append_partial(const iotring_ctx *c, const char *buf, const uint32_t *lens, uint32_t n,
                               int stage, uint64_t *first_pos);
int iotring_scan(const iotring_ctx *c, uint64_t pos, uint32_t max_records, uint64_t max_bytes, int verify,
                 int first_free, uint64_t *out_pos, uint32_t *out_len, uint32_t *out_n, uint64_t *out_next,
                 iotring_block *blk);
int iotring_resolve(const iotring_ctx *c, uint64_t pos, int force_pad);
int64_t iotring_count(const iotring_ctx *c, uint64_t from, uint64_t to);
int iotring_pop(const iotring_ctx *c, uint64_t to, uint64_t ndata);
int iotring_pop_staged(const iotring_ctx *c, uint64_t to, uint64_t ndata, int stage);
int iotring_wait(const iotring_ctx *c, uint64_t pos, int64_t timeout_ns, int stop_on_claim,
                 iotring_block *blk);
int iotring_recover(const iotring_ctx *c, uint64_t *out_tail, uint64_t *out_count, uint64_t *out_repaired);
uint64_t iotring_load64(const iotring_ctx *c, uint32_t offset);
int iotring_persist(const iotring_ctx *c, uint64_t offset, uint64_t len);
int iotring_msync(uintptr_t addr, uint64_t len);
int iotring_mutex_size(void);
void iotring_reset_waiters(const iotring_ctx *c);
void iotring_wake_all(const iotring_ctx *c);
"""
)

CSRC = r"""
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/futex.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

@TYPES@

@DEFINES@

/* ctx->test_flags (tests only): the orderings before issue 12, kept so the power
   simulator's tests can show it catches them.  Never set by the node. */
#define IOTRING_LEGACY_HEAD 1u     /* pop: producer-visible head stored before the head is persisted */
#define IOTRING_LEGACY_COMMIT 2u   /* append: commit marker + wake before the persist */
#define IOTRING_LEGACY_RESOLVE 4u  /* resolve: commit a dead claim, persist its header only */

#define ALIGN_UP(x) (((x) + (D_RECORD_ALIGNMENT - 1)) & ~(uint64_t)(D_RECORD_ALIGNMENT - 1))
#define LOAD_ACQ(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE_REL(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

_Static_assert(sizeof(pthread_mutex_t) <= D_MUTEX_SPACE, "pthread_mutex_t does not fit the header slot");

/* ------------------------------------------------------------------ CRC32C */
static uint32_t crc_table[256];
static int crc_ready = 0;
static int crc_hw = 0;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : (c >> 1);
        crc_table[i] = c;
    }
#if defined(__x86_64__)
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#endif
    __atomic_store_n(&crc_ready, 1, __ATOMIC_RELEASE);
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t n) {
    while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t crc_hw_run(uint32_t crc, const uint8_t *p, size_t n) {
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) { c = __builtin_ia32_crc32qi((uint32_t)c, *p++); n--; }
    while (n >= 8) { uint64_t v; memcpy(&v, p, 8); c = __builtin_ia32_crc32di(c, v); p += 8; n -= 8; }
    while (n--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

uint32_t iotring_crc32c(uint32_t crc, const uint8_t *buf, size_t len) {
    if (!__atomic_load_n(&crc_ready, __ATOMIC_ACQUIRE)) crc_init();
    crc = ~crc;
#if defined(__x86_64__)
    if (crc_hw) return ~crc_hw_run(crc, buf, len);
#endif
    return ~crc_sw(crc, buf, len);
}

/* ------------------------------------------------------------------ layout helpers */
static inline uint8_t *P(const iotring_ctx *c, uint64_t off) { return (uint8_t *)(c->base + off); }
static inline uint64_t *U64(const iotring_ctx *c, uint64_t off) { return (uint64_t *)(c->base + off); }
static inline uint32_t *U32(const iotring_ctx *c, uint64_t off) { return (uint32_t *)(c->base + off); }
static inline uint8_t *REC(const iotring_ctx *c, uint64_t pos) {
    return P(c, D_DATA_OFFSET + (pos & (c->cap - 1)));
}
static inline uint64_t *R_POS(uint8_t *h) { return (uint64_t *)(h + D_REC_POS_OFFSET); }
static inline uint32_t *R_LEN(uint8_t *h) { return (uint32_t *)(h + D_REC_LENGTH_OFFSET); }
static inline uint16_t *R_TYPE(uint8_t *h) { return (uint16_t *)(h + D_REC_TYPE_OFFSET); }
static inline uint16_t *R_STATE(uint8_t *h) { return (uint16_t *)(h + D_REC_STATE_OFFSET); }
static inline uint32_t *R_CRC(uint8_t *h) { return (uint32_t *)(h + D_REC_CRC_OFFSET); }
static inline uint32_t *R_PID(uint8_t *h) { return (uint32_t *)(h + D_REC_PID_OFFSET); }
static inline uint64_t *R_TOKEN(uint8_t *h) { return (uint64_t *)(h + D_REC_TOKEN_OFFSET); }

/* CRC32C state (pre-inverted) after the header bytes [0,14) + [20,32) of h. */
#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t header_crc_hw(uint32_t seed, const uint8_t *h) {
    uint64_t c = ~seed;
    c = __builtin_ia32_crc32di(c, *(const uint64_t *)(h + D_REC_POS_OFFSET));
    c = __builtin_ia32_crc32si((uint32_t)c, *(const uint32_t *)(h + D_REC_LENGTH_OFFSET));
    c = __builtin_ia32_crc32hi((uint32_t)c, *(const uint16_t *)(h + D_REC_TYPE_OFFSET));
    c = __builtin_ia32_crc32si((uint32_t)c, *(const uint32_t *)(h + D_REC_PID_OFFSET));
    c = __builtin_ia32_crc32di(c, *(const uint64_t *)(h + D_REC_TOKEN_OFFSET));
    return (uint32_t)c;
}
#endif
_Static_assert(D_REC_LENGTH_OFFSET == D_REC_POS_OFFSET + 8 && D_REC_TYPE_OFFSET == D_REC_LENGTH_OFFSET + 4
               && D_REC_STATE_OFFSET == D_REC_TYPE_OFFSET + 2 && D_REC_TOKEN_OFFSET == D_REC_PID_OFFSET + 4
               && D_RECORD_HEADER_LENGTH == D_REC_TOKEN_OFFSET + 8,
               "header_crc_hw follows the record layout");

static uint32_t header_crc(const iotring_ctx *c, const uint8_t *h) {
    if (!__atomic_load_n(&crc_ready, __ATOMIC_ACQUIRE)) crc_init();
#if defined(__x86_64__)
    if (crc_hw) return header_crc_hw(c->seed, h);
#endif
    uint32_t crc = crc_sw(~c->seed, h, D_REC_STATE_OFFSET);
    return crc_sw(crc, h + D_REC_PID_OFFSET, D_RECORD_HEADER_LENGTH - D_REC_PID_OFFSET);
}

static uint32_t record_crc(const iotring_ctx *c, uint8_t *h, int with_payload) {
    uint32_t crc = header_crc(c, h);
    if (with_payload) {
#if defined(__x86_64__)
        if (crc_hw) return ~crc_hw_run(crc, h + D_RECORD_HEADER_LENGTH, *R_LEN(h));
#endif
        crc = crc_sw(crc, h + D_RECORD_HEADER_LENGTH, *R_LEN(h));
    }
    return ~crc;
}

static int persist_range(const iotring_ctx *c, uintptr_t addr, uint64_t len) {
    switch (c->persist_mode) {
    case 0:
        return 0;
    case 1:
        ((void (*)(const void *, size_t))c->persist_fn)((const void *)addr, (size_t)len);
        return 0;
    case 2:
        return ((int (*)(const void *, size_t))c->persist_fn)((const void *)addr, (size_t)len) ? -errno : 0;
    case 3: {
        uintptr_t a = addr & ~(uintptr_t)(c->pagesize - 1);
        return msync((void *)a, (size_t)(len + (addr - a)), MS_SYNC) ? -errno : 0;
    }
    default: {
        /* Power simulator (tests only, node/ring/powersim.py): what a persist makes
           durable -- every whole unit (cache line or page) touching the range -- is
           copied from the live mapping into the durable image. */
        if (c->sim_eio) return -EIO;
        uintptr_t a = addr & ~(uintptr_t)(c->sim_unit - 1);
        uintptr_t e = (addr + len + c->sim_unit - 1) & ~(uintptr_t)(c->sim_unit - 1);
        if (a < c->base) a = c->base;
        if (e > c->base + c->sim_size) e = c->base + c->sim_size;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (e > a) memcpy((void *)(c->sim_base + (a - c->base)), (const void *)a, e - a);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        return 0;
    }
    }
}

int iotring_msync(uintptr_t addr, uint64_t len) {
    return msync((void *)addr, (size_t)len, MS_SYNC) ? -errno : 0;
}

int iotring_persist(const iotring_ctx *c, uint64_t offset, uint64_t len) {
    return persist_range(c, c->base + offset, len);
}

/* Persist the ring positions [from, to) (at most one lap), split at the wrap. */
static int persist_positions(const iotring_ctx *c, uint64_t from, uint64_t to) {
    if (to <= from) return 0;
    uint64_t idx = from & (c->cap - 1), len = to - from;
    if (idx + len <= c->cap) return persist_range(c, (uintptr_t)REC(c, from), len);
    int r = persist_range(c, (uintptr_t)REC(c, from), c->cap - idx);
    int r2 = persist_range(c, (uintptr_t)P(c, D_DATA_OFFSET), len - (c->cap - idx));
    return r ? r : r2;
}

uint64_t iotring_load64(const iotring_ctx *c, uint32_t offset) {
    return __atomic_load_n(U64(c, offset), __ATOMIC_ACQUIRE);
}

int iotring_mutex_size(void) { return (int)sizeof(pthread_mutex_t); }

/* A new consumer (holding the consumer lock) clears a count left by a consumer
   killed inside iotring_wait, so producers stop issuing needless FUTEX_WAKEs. */
void iotring_reset_waiters(const iotring_ctx *c) {
    __atomic_store_n(U32(c, D_WAITERS_OFFSET), 0, __ATOMIC_SEQ_CST);
}

/* ------------------------------------------------------------------ claim mutex */
int iotring_mutex_init(const iotring_ctx *c) {
    pthread_mutexattr_t a;
    int r;
    pthread_mutex_t *m = (pthread_mutex_t *)P(c, D_MUTEX_OFFSET);
    memset(m, 0, D_MUTEX_SPACE);
    if ((r = pthread_mutexattr_init(&a))) return -r;
    if ((r = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED))) return -r;
    if ((r = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST))) return -r;
    r = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return -r;
}

static int claim_lock(const iotring_ctx *c) {
    pthread_mutex_t *m = (pthread_mutex_t *)P(c, D_MUTEX_OFFSET);
    int r = pthread_mutex_lock(m);
    if (r == EOWNERDEAD) {
        /* The previous owner died inside the claim section.  Headers it wrote past
           the published tail are simply overwritten; a published tail is complete. */
        r = pthread_mutex_consistent(m);
    }
    return -r;
}

static void claim_unlock(const iotring_ctx *c) {
    pthread_mutex_unlock((pthread_mutex_t *)P(c, D_MUTEX_OFFSET));
}

static long sys_futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts) {
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

static void wake_consumer(const iotring_ctx *c) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(U32(c, D_WAITERS_OFFSET), __ATOMIC_RELAXED) > 0) {
        __atomic_fetch_add(U32(c, D_FUTEX_OFFSET), 1, __ATOMIC_SEQ_CST);
        sys_futex(U32(c, D_FUTEX_OFFSET), FUTEX_WAKE, INT_MAX, NULL);
    }
}

static void write_pad(const iotring_ctx *c, uint64_t pos, uint64_t bytes) {
    uint8_t *h = REC(c, pos);
    *R_POS(h) = pos;
    *R_LEN(h) = (uint32_t)(bytes - D_RECORD_HEADER_LENGTH);
    *R_TYPE(h) = D_TYPE_PAD;
    *R_PID(h) = c->pid;
    *R_TOKEN(h) = c->token;
    *R_CRC(h) = record_crc(c, h, 0);
    STORE_REL(R_STATE(h), (uint16_t)D_STATE_COMMITTED);
}

/* ------------------------------------------------------------------ append */
/* Under the claim mutex: fit a prefix of the batch (padding at the wrap point), write
   every header in the claimed state (self-identifying), publish the tail.
   Returns how many records were claimed (0: full) or -errno; [*start, *end) is the
   claimed range. */
static int64_t claim(const iotring_ctx *c, const uint32_t *lens, uint32_t n, uint64_t *start_out,
                     uint64_t *end_out, int publish) {
    const uint64_t cap = c->cap, mask = cap - 1;
    int r = claim_lock(c);
    if (r) return r;
    /* The free head, not the head: space is reused only once its release is durable. */
    uint64_t head = LOAD_ACQ(U64(c, D_FREE_HEAD_OFFSET));
    uint64_t start = *U64(c, D_TAIL_OFFSET);
    uint64_t p = start;
    uint32_t k = 0;
    for (; k < n; k++) {
        uint64_t rsz = ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)lens[k]);
        uint64_t idx = p & mask;
        uint64_t pad = (idx + rsz > cap) ? cap - idx : 0;
        if (p + pad + rsz - head > cap) break;
        p += pad + rsz;
    }
    if (k == 0) { claim_unlock(c); return 0; }
    p = start;
    for (uint32_t i = 0; i < k; i++) {
        uint64_t rsz = ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)lens[i]);
        uint64_t idx = p & mask;
        if (idx + rsz > cap) { write_pad(c, p, cap - idx); p += cap - idx; }
        uint8_t *h = REC(c, p);
        __atomic_store_n(R_STATE(h), (uint16_t)D_STATE_CLAIMED, __ATOMIC_RELAXED);
        *R_POS(h) = p;
        *R_LEN(h) = lens[i];
        *R_TYPE(h) = D_TYPE_DATA;
        *R_CRC(h) = 0;
        *R_PID(h) = c->pid;
        *R_TOKEN(h) = c->token;
        p += rsz;
    }
    if (!publish) return 0;  /* test hook only: as if killed here, mutex held */
    __atomic_fetch_add(U64(c, D_APPENDED_OFFSET), k, __ATOMIC_RELAXED);
    STORE_REL(U64(c, D_TAIL_OFFSET), p);
    claim_unlock(c);
    *start_out = start;
    *end_out = p;
    return (int64_t)k;
}

/* ------------------------------------------------------------------ fill (copy + checksum) */
/* The checksums are computed from the source (hot in cache: the caller just built it)
   three records at a time: three independent crc32 chains, since the instruction's
   latency is 3 cycles and its throughput 1 per cycle (one chain ran at a third of
   that).  The payload is then copied once into the ring.  With the pmem backend
   (flush_fn/drain_fn set) the whole cache lines of a payload are written with
   non-temporal stores (they reach the persistence domain at the sfence of
   pmem_drain, as in pmem_memcpy_persist), so only the lines a header shares are
   flushed afterwards: about one line per record instead of every line.
   (A single fused load-crc-store pass was measured slower here: register pressure
   with three lanes, and a store-mode branch per word.) */
typedef struct {
    uint8_t *h;            /* record header in the ring */
    const uint8_t *src;    /* payload source */
    uint32_t len;
    uint32_t crc;          /* running CRC32C state (pre-inverted) */
} lane_t;

static inline int use_nt(const iotring_ctx *c) {
    if (!__atomic_load_n(&crc_ready, __ATOMIC_ACQUIRE)) crc_init();
#if defined(__x86_64__)
    return ((c->persist_mode == 1 && c->flush_fn && c->drain_fn) || (c->persist_mode == 4 && c->sim_nt))
           && crc_hw;
#else
    (void)c;
    return 0;
#endif
}

/* [*a, *b): the whole cache lines of the payload of the record at h (empty if none). */
static inline void nt_span(const uint8_t *h, uint32_t len, uintptr_t *a, uintptr_t *b) {
    uintptr_t d = (uintptr_t)(h + D_RECORD_HEADER_LENGTH);
    *a = (d + D_CACHE_LINE - 1) & ~(uintptr_t)(D_CACHE_LINE - 1);
    *b = (d + len) & ~(uintptr_t)(D_CACHE_LINE - 1);
    if (*b < *a) *b = *a;
}

static void copy_payload(uint8_t *h, const uint8_t *src, uint32_t len, int nt) {
    uint8_t *d = h + D_RECORD_HEADER_LENGTH;
#if defined(__x86_64__)
    if (nt) {
        uintptr_t a, b;
        nt_span(h, len, &a, &b);
        if (b > a) {
            size_t head = a - (uintptr_t)d, mid = b - a;
            memcpy(d, src, head);
            const uint8_t *s = src + head;
            for (size_t o = 0; o < mid; o += 16)
                _mm_stream_si128((__m128i *)(a + o), _mm_loadu_si128((const __m128i *)(s + o)));
            memcpy((uint8_t *)b, s + mid, len - head - mid);
            return;
        }
    }
#else
    (void)nt;
#endif
    memcpy(d, src, len);
}

#if defined(__x86_64__)
/* Checksums m (1..3) payloads from their sources: the common whole-word prefix as
   three interleaved chains, then each lane's remaining words and bytes alone. */
__attribute__((target("sse4.2")))
static void crc_lanes_hw(lane_t *L, int m) {
    uint64_t common = 0;
    if (m == 3) {
        uint32_t shortest = L[0].len < L[1].len ? L[0].len : L[1].len;
        if (L[2].len < shortest) shortest = L[2].len;
        common = shortest / 8;
        const uint8_t *s0 = L[0].src, *s1 = L[1].src, *s2 = L[2].src;
        uint64_t c0 = L[0].crc, c1 = L[1].crc, c2 = L[2].crc;
        for (uint64_t w = 0; w < common; w++) {
            uint64_t v0, v1, v2;
            memcpy(&v0, s0 + 8 * w, 8);
            memcpy(&v1, s1 + 8 * w, 8);
            memcpy(&v2, s2 + 8 * w, 8);
            c0 = __builtin_ia32_crc32di(c0, v0);
            c1 = __builtin_ia32_crc32di(c1, v1);
            c2 = __builtin_ia32_crc32di(c2, v2);
        }
        L[0].crc = (uint32_t)c0;
        L[1].crc = (uint32_t)c1;
        L[2].crc = (uint32_t)c2;
    }
    for (int j = 0; j < m; j++)
        L[j].crc = crc_hw_run(L[j].crc, L[j].src + 8 * common, L[j].len - 8 * common);
}
#endif

static void fill_lanes(lane_t *L, int m, int nt) {
#if defined(__x86_64__)
    if (crc_hw) crc_lanes_hw(L, m);
    else
#endif
    for (int j = 0; j < m; j++) L[j].crc = crc_sw(L[j].crc, L[j].src, L[j].len);
    for (int j = 0; j < m; j++) {
        copy_payload(L[j].h, L[j].src, L[j].len, nt);
        *R_CRC(L[j].h) = ~L[j].crc;
    }
}

/* The commit markers of k claimed records from p (release stores). */
static void commit_all(const iotring_ctx *c, const uint32_t *lens, uint32_t k, uint64_t p) {
    const uint64_t cap = c->cap, mask = cap - 1;
    for (uint32_t i = 0; i < k; i++) {
        uint64_t rsz = ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)lens[i]);
        if ((p & mask) + rsz > cap) p += cap - (p & mask);
        STORE_REL(R_STATE(REC(c, p)), (uint16_t)D_STATE_COMMITTED);
        p += rsz;
    }
}

/* The k claimed records from p become padding (still claimed: commit_all follows). */
static void pad_claims(const iotring_ctx *c, const uint32_t *lens, uint32_t k, uint64_t p) {
    const uint64_t cap = c->cap, mask = cap - 1;
    for (uint32_t i = 0; i < k; i++) {
        uint64_t rsz = ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)lens[i]);
        if ((p & mask) + rsz > cap) p += cap - (p & mask);
        uint8_t *h = REC(c, p);
        *R_TYPE(h) = D_TYPE_PAD;
        *R_CRC(h) = record_crc(c, h, 0);
        p += rsz;
    }
    __atomic_fetch_sub(U64(c, D_APPENDED_OFFSET), k, __ATOMIC_RELAXED);
}

/* Outside the lock: payloads and checksums (stage >= 1), commit markers (stage 2).
   Payload i comes from srcs[i], or (srcs NULL) from src, the payloads back to back.
   Non-temporal stores (nt) are fenced before any commit marker is stored. */
static void fill(const iotring_ctx *c, const uint8_t *src, const uint8_t *const *srcs, const uint32_t *lens,
                 uint32_t k, uint64_t p, int stage, int nt) {
    const uint64_t cap = c->cap, mask = cap - 1;
    if (stage >= 1) {
        lane_t L[3];
        int m = 0;
        uint64_t q = p;
        for (uint32_t i = 0; i < k; i++) {
            uint64_t rsz = ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)lens[i]);
            if ((q & mask) + rsz > cap) q += cap - (q & mask);
            uint8_t *h = REC(c, q);
            L[m].h = h;
            L[m].src = srcs ? srcs[i] : src;
            L[m].len = lens[i];
            L[m].crc = header_crc(c, h);
            if (++m == 3) { fill_lanes(L, m, nt); m = 0; }
            src += lens[i];
            q += rsz;
        }
        if (m) fill_lanes(L, m, nt);
#if defined(__x86_64__)
        if (nt) _mm_sfence();  /* payloads visible before any commit marker */
#endif
    }
    if (stage >= 2) commit_all(c, lens, k, p);
}

/* Persist after an nt fill: flush every cache line written by ordinary stores
   (padding headers, record headers, payload bytes outside whole lines), adjacent
   lines merged into one pmem_flush; then one pmem_drain (sfence), which also drains
   the non-temporal stores. */
typedef struct { uintptr_t from, to; } span_t;

/* pmem_flush of [from, to); in the power simulator, the lines it makes durable (at the
   drain that follows) are copied into the durable image instead. */
static void flush_span(const iotring_ctx *c, uintptr_t from, uintptr_t to) {
    if (c->persist_mode == 4) { persist_range(c, from, to - from); return; }
    ((void (*)(const void *, size_t))c->flush_fn)((const void *)from, to - from);
}

static void span_add(const iotring_ctx *c, span_t *s, uintptr_t from, uintptr_t to) {
    from &= ~(uintptr_t)(D_CACHE_LINE - 1);
    to = (to + D_CACHE_LINE - 1) & ~(uintptr_t)(D_CACHE_LINE - 1);
    if (s->to > s->from && from <= s->to && from >= s->from) { if (to > s->to) s->to = to; return; }
    if (s->to > s->from) flush_span(c, s->from, s->to);
    s->from = from;
    s->to = to;
}

static void persist_nt(const iotring_ctx *c, const uint32_t *lens, uint32_t k, uint64_t p) {
    const uint64_t cap = c->cap, mask = cap - 1;
    span_t s = { 0, 0 };
    for (uint32_t i = 0; i < k; i++) {
        uint64_t rsz = ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)lens[i]);
        if ((p & mask) + rsz > cap) {  /* the padding record's header */
            uintptr_t ph = (uintptr_t)REC(c, p);
            span_add(c, &s, ph, ph + D_RECORD_HEADER_LENGTH);
            p += cap - (p & mask);
        }
        uint8_t *hp = REC(c, p);
        uintptr_t h = (uintptr_t)hp, end = h + D_RECORD_HEADER_LENGTH + lens[i], a, b;
        nt_span(hp, lens[i], &a, &b);
        if (b > a) {   /* the split of copy_payload: [a, b) went non-temporal */
            if (c->persist_mode == 4) persist_range(c, a, b - a);  /* simulator: durable at the drain */
            span_add(c, &s, h, a);
            if (end > b) span_add(c, &s, b, end);
        } else {
            span_add(c, &s, h, end);
        }
        p += rsz;
    }
    if (s.to > s.from) flush_span(c, s.from, s.to);
    if (c->persist_mode == 4) return;  /* the simulator: the non-temporal lines were copied above */
    ((void (*)(void))c->drain_fn)();
}

/* Appends a prefix of the batch: claim, write, ONE persist of the range, then commit
   and wake.  The commit marker is stored only after the persist returned, so a reader
   (which stops at claimed records) never sees a record a power cut could still take
   away.  The marker itself need not be durable: recovery keeps a claimed record whose
   checksum holds.  Returns the number appended (0 when full), -errno (not durable, not
   committed: the claims are settled as a dead producer's would be, see below), or
   IOTRING_TOO_LARGE - i when lens[i] > max_record (nothing appended). */
#define IOTRING_TOO_LARGE (-(int64_t)1 << 40)
#define NT_MIN_BYTES 4096  /* ring bytes of an append below which nt stores are not used */
static int64_t append_impl(const iotring_ctx *c, const uint8_t *buf, const uint8_t *const *srcs,
                           const uint32_t *lens, uint32_t n, uint64_t *first_pos) {
    uint64_t start = 0, end = 0;
    for (uint32_t i = 0; i < n; i++)
        if (lens[i] > c->max_record) return IOTRING_TOO_LARGE - (int64_t)i;
    int64_t k = claim(c, lens, n, &start, &end, 1);
    if (k <= 0) return k;
    /* Small appends (a single short record) keep ordinary stores + one pmem_persist:
       measured faster there (no sfence before the commit, nothing to split). */
    int nt = (end - start >= NT_MIN_BYTES || c->sim_nt) && use_nt(c);
    if (c->test_flags & IOTRING_LEGACY_COMMIT) {  /* tests only: the pre-issue-12 order */
        fill(c, buf, srcs, lens, (uint32_t)k, start, 2, nt);
        wake_consumer(c);
    } else {
        fill(c, buf, srcs, lens, (uint32_t)k, start, 1, nt);
    }
    int r = 0;
    if (nt) persist_nt(c, lens, (uint32_t)k, start);
    else r = persist_positions(c, start, end);
    if (!(c->test_flags & IOTRING_LEGACY_COMMIT)) {
        /* On a persist error the claims become padding (committed, so this live process
           does not block the consumer): a reader never sees a record whose persist
           failed, and the caller gets -errno and must not ack.  If the bytes reached
           the media anyway, recovery may keep them (an unacked record: at-least-once). */
        if (r) pad_claims(c, lens, (uint32_t)k, start);
        commit_all(c, lens, (uint32_t)k, start);
        wake_consumer(c);
    }
    if (r) return r;
    *first_pos = start;
    return k;
}

int64_t iotring_append(const iotring_ctx *c, const char *buf, const uint32_t *lens, uint32_t n,
                       uint64_t *first_pos) {
    return append_impl(c, (const uint8_t *)buf, NULL, lens, n, first_pos);
}

/* As iotring_append, payload i read from bufs[i] (no concatenated copy needed).
   Called by node.ring._gather with the GIL released. */
int64_t iotring_append_iov(const iotring_ctx *c, const char *const *bufs, const uint32_t *lens, uint32_t n,
                           uint64_t *first_pos) {
    return append_impl(c, NULL, (const uint8_t *const *)bufs, lens, n, first_pos);
}

int64_t iotring_append1(const iotring_ctx *c, const char *buf, uint32_t len, uint64_t *first_pos) {
    return iotring_append(c, buf, &len, 1, first_pos);
}

/* As iotring_append, for a caller-built buffer: IOTRING_BAD_LENGTHS unless the
   lengths add up to buf_len exactly. */
#define IOTRING_BAD_LENGTHS (-(int64_t)1 << 41)
int64_t iotring_append_packed(const iotring_ctx *c, const char *buf, uint64_t buf_len, const uint32_t *lens,
                              uint32_t n, uint64_t *first_pos) {
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++) total += lens[i];
    if (total != buf_len) return IOTRING_BAD_LENGTHS;
    return iotring_append(c, buf, lens, n, first_pos);
}

/* TEST HOOK for crash tests: stop at `stage` as a producer killed (or frozen) there
   would leave the ring (-1: holding the claim mutex; 0: headers claimed only; 1:
   payloads + checksums written, not committed, nothing persisted; 2: everything the
   append does before its persist call (with IOTRING_LEGACY_COMMIT that includes the
   commit marker); 3: persisted, not committed).  The caller must die (or, in power
   simulator tests, the power is cut). */
int64_t iotring_append_partial(const iotring_ctx *c, const char *buf, const uint32_t *lens, uint32_t n,
                               int stage, uint64_t *first_pos) {
    uint64_t start = 0, end = 0;
    if (stage < 0) return claim(c, lens, n, &start, &end, 0);  /* -1: dies holding the mutex */
    int64_t k = claim(c, lens, n, &start, &end, 1);
    if (k <= 0) return k;
    int fstage = stage < 1 ? 0 : 1;
    if (stage == 2 && (c->test_flags & IOTRING_LEGACY_COMMIT)) fstage = 2;
    fill(c, (const uint8_t *)buf, NULL, lens, (uint32_t)k, start, fstage, 0);
    if (stage >= 3) {
        int r = persist_positions(c, start, end);
        if (r) return r;
    }
    *first_pos = start;
    return k;
}

/* ------------------------------------------------------------------ consumer */
/* Status codes of iotring_scan. */
#define SCAN_END 0       /* reached the tail */
#define SCAN_LIMIT 1     /* max_records / max_bytes reached */
#define SCAN_BLOCKED 2   /* a claimed, uncommitted record at *out_next (blk filled) */
#define SCAN_CORRUPT 3   /* a header that does not describe the record expected at *out_next */
#define SCAN_BADCRC 4    /* a committed record at *out_next whose checksum fails */

int iotring_scan(const iotring_ctx *c, uint64_t pos, uint32_t max_records, uint64_t max_bytes, int verify,
                 int first_free, uint64_t *out_pos, uint32_t *out_len, uint32_t *out_n, uint64_t *out_next,
                 iotring_block *blk) {
    const uint64_t cap = c->cap, mask = cap - 1;
    uint64_t tail = LOAD_ACQ(U64(c, D_TAIL_OFFSET));
    uint32_t n = 0;
    uint64_t bytes = 0;
    int status = SCAN_END;
    while (pos < tail) {
        uint8_t *h = REC(c, pos);
        uint16_t state = LOAD_ACQ(R_STATE(h));
        if (*R_POS(h) != pos) { status = SCAN_CORRUPT; break; }
        if (state == D_STATE_CLAIMED) {
            blk->pos = pos; blk->pid = *R_PID(h); blk->token = *R_TOKEN(h);
            status = SCAN_BLOCKED;
            break;
        }
        uint16_t type = *R_TYPE(h);
        uint32_t len = *R_LEN(h);
        uint64_t rsz = ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)len);
        if (state != D_STATE_COMMITTED || (pos & mask) + rsz > cap || pos + rsz > tail
            || (type != D_TYPE_DATA && type != D_TYPE_PAD)) { status = SCAN_CORRUPT; break; }
        if (type == D_TYPE_PAD) { pos += rsz; continue; }
        /* max_bytes may be exceeded only by the first record of a read (first_free) */
        if (n >= max_records || ((n > 0 || !first_free) && bytes + len > max_bytes)) {
            status = SCAN_LIMIT;
            break;
        }
        if (verify && record_crc(c, h, 1) != *R_CRC(h)) { status = SCAN_BADCRC; break; }
        out_pos[n] = pos;
        out_len[n] = len;
        n++;
        bytes += len;
        pos += rsz;
    }
    *out_n = n;
    *out_next = pos;
    return status;
}

/* Settle the claimed record at pos whose producer is dead (or a committed record
   whose checksum fails, force_pad=1): deliver it if its checksum holds, else turn it
   into padding.  A delivered record is persisted WHOLE (header and payload: the dead
   producer may have died before its own persist) before its commit marker is stored,
   so the reader sees it only once it is durable.  Returns 1 delivered, 0 padded,
   IOTRING_NOT_A_RECORD, or -errno when the persist failed (a delivered record then
   stays claimed: nothing is shown to the reader). */
#define IOTRING_NOT_A_RECORD (-(1 << 20))
int iotring_resolve(const iotring_ctx *c, uint64_t pos, int force_pad) {
    uint8_t *h = REC(c, pos);
    if (*R_POS(h) != pos) return IOTRING_NOT_A_RECORD;
    uint64_t rsz = ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)*R_LEN(h));
    if ((pos & (c->cap - 1)) + rsz > c->cap) return IOTRING_NOT_A_RECORD;
    int r;
    if (!force_pad && *R_TYPE(h) == D_TYPE_DATA && record_crc(c, h, 1) == *R_CRC(h)) {
        if (c->test_flags & IOTRING_LEGACY_RESOLVE) {  /* tests only: the pre-issue-12 order */
            STORE_REL(R_STATE(h), (uint16_t)D_STATE_COMMITTED);
            persist_range(c, (uintptr_t)h, D_RECORD_HEADER_LENGTH);
            return 1;
        }
        r = persist_range(c, (uintptr_t)h, rsz);
        if (r) return r;
        STORE_REL(R_STATE(h), (uint16_t)D_STATE_COMMITTED);
        return 1;
    }
    if (*R_TYPE(h) == D_TYPE_DATA) __atomic_fetch_sub(U64(c, D_APPENDED_OFFSET), 1, __ATOMIC_RELAXED);
    *R_TYPE(h) = D_TYPE_PAD;
    *R_CRC(h) = record_crc(c, h, 0);
    STORE_REL(R_STATE(h), (uint16_t)D_STATE_COMMITTED);
    /* Not durable yet is harmless (recovery pads a torn claim itself), but an error is
       reported all the same. */
    r = persist_range(c, (uintptr_t)h, D_RECORD_HEADER_LENGTH);
    return r ? r : 0;
}

/* Number of data records in [from, to); -1 if to is not a committed record boundary. */
int64_t iotring_count(const iotring_ctx *c, uint64_t from, uint64_t to) {
    int64_t n = 0;
    uint64_t pos = from;
    while (pos < to) {
        uint8_t *h = REC(c, pos);
        if (*R_POS(h) != pos || LOAD_ACQ(R_STATE(h)) != D_STATE_COMMITTED) return -1;
        if (*R_TYPE(h) == D_TYPE_DATA) n++;
        pos += ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)*R_LEN(h));
    }
    return pos == to ? n : -1;
}

/* Pop: store the head (+ popped), persist that line, and only then publish the free
   head producers claim from.  A power cut before the persist returned finds the old
   head AND no producer has reused the space, so recovery's window [head, head + cap)
   holds only records of the current lap.  On a persist error the free head is not
   moved (the space stays unusable until a later pop persists).  TEST HOOK: stage 1
   stops before the persist (a consumer frozen there). */
int iotring_pop_staged(const iotring_ctx *c, uint64_t to, uint64_t ndata, int stage) {
    __atomic_fetch_add(U64(c, D_POPPED_OFFSET), ndata, __ATOMIC_RELAXED);
    STORE_REL(U64(c, D_HEAD_OFFSET), to);
    if (c->test_flags & IOTRING_LEGACY_HEAD) STORE_REL(U64(c, D_FREE_HEAD_OFFSET), to);
    if (stage == 1) return 0;
    int r = persist_range(c, (uintptr_t)P(c, D_CONSUMER_LINE_OFFSET), D_CACHE_LINE);
    if (r) return r;
    STORE_REL(U64(c, D_FREE_HEAD_OFFSET), to);
    return 0;
}

int iotring_pop(const iotring_ctx *c, uint64_t to, uint64_t ndata) {
    return iotring_pop_staged(c, to, ndata, 0);
}

/* 1: a committed data record is at or after pos (past committed padding);
   2: a claimed record blocks (blk filled); 0: nothing yet. */
static int probe(const iotring_ctx *c, uint64_t pos, iotring_block *blk) {
    uint64_t tail = LOAD_ACQ(U64(c, D_TAIL_OFFSET));
    for (int guard = 0; pos < tail && guard < 4; guard++) {
        uint8_t *h = REC(c, pos);
        uint16_t state = LOAD_ACQ(R_STATE(h));
        if (*R_POS(h) != pos) return 1;      /* let read() report it */
        if (state == D_STATE_CLAIMED) {
            blk->pos = pos; blk->pid = *R_PID(h); blk->token = *R_TOKEN(h);
            return 2;
        }
        if (state != D_STATE_COMMITTED || *R_TYPE(h) != D_TYPE_PAD) return 1;
        pos += ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)*R_LEN(h));
    }
    return pos < tail ? 1 : 0;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Block until probe() says 1 (or 2 with stop_on_claim), or the timeout (0), or
   c->cancel (-ECANCELED).  The futex word is bumped by producers after a commit
   when waiters > 0. */
int iotring_wait(const iotring_ctx *c, uint64_t pos, int64_t timeout_ns, int stop_on_claim,
                 iotring_block *blk) {
    uint32_t *fw = U32(c, D_FUTEX_OFFSET);
    uint32_t *waiters = U32(c, D_WAITERS_OFFSET);
    int64_t deadline = now_ns() + (timeout_ns > 0 ? timeout_ns : 0);
    int r;
    __atomic_fetch_add(waiters, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        if (__atomic_load_n(&c->cancel, __ATOMIC_ACQUIRE)) { r = -ECANCELED; break; }
        uint32_t seq = __atomic_load_n(fw, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        r = probe(c, pos, blk);
        if (r == 1 || (r == 2 && stop_on_claim)) break;
        int64_t left = deadline - now_ns();
        if (left <= 0) { r = 0; break; }
        struct timespec ts = { (time_t)(left / 1000000000LL), (long)(left % 1000000000LL) };
        if (sys_futex(fw, FUTEX_WAIT, seq, &ts) == -1 && errno != EAGAIN && errno != ETIMEDOUT
            && errno != EINTR) {
            /* futex unusable on this mapping: a short sleep poll instead. */
            struct timespec nap = { 0, 1000000L };
            nanosleep(&nap, NULL);
        }
    }
    __atomic_fetch_sub(waiters, 1, __ATOMIC_SEQ_CST);
    return r;
}

/* Wake every waiter (close() after setting c->cancel). */
void iotring_wake_all(const iotring_ctx *c) {
    __atomic_fetch_add(U32(c, D_FUTEX_OFFSET), 1, __ATOMIC_SEQ_CST);
    sys_futex(U32(c, D_FUTEX_OFFSET), FUTEX_WAKE, INT_MAX, NULL);
}

/* ------------------------------------------------------------------ recovery */
/* Caller holds the ring exclusively (no other process has it open). */
static int valid_at(const iotring_ctx *c, uint64_t pos, uint64_t limit, uint64_t *rsz_out) {
    uint8_t *h = REC(c, pos);
    if (*R_POS(h) != pos) return 0;
    uint16_t type = *R_TYPE(h), state = *R_STATE(h);
    if (type != D_TYPE_DATA && type != D_TYPE_PAD) return 0;
    if (state != D_STATE_CLAIMED && state != D_STATE_COMMITTED) return 0;
    uint64_t rsz = ALIGN_UP(D_RECORD_HEADER_LENGTH + (uint64_t)*R_LEN(h));
    if ((pos & (c->cap - 1)) + rsz > c->cap || pos + rsz > limit) return 0;
    if (record_crc(c, h, type == D_TYPE_DATA) != *R_CRC(h)) return 0;
    *rsz_out = rsz;
    return 1;
}

int iotring_recover(const iotring_ctx *c, uint64_t *out_tail, uint64_t *out_count, uint64_t *out_repaired) {
    uint64_t head = *U64(c, D_HEAD_OFFSET);
    if (head & (D_RECORD_ALIGNMENT - 1)) return -EINVAL;
    uint64_t limit = head + c->cap, pos = head, count = 0, repaired = 0, rsz = 0;
    while (pos < limit) {
        if (valid_at(c, pos, limit, &rsz)) {
            uint8_t *h = REC(c, pos);
            if (*R_TYPE(h) == D_TYPE_DATA) count++;
            *R_STATE(h) = D_STATE_COMMITTED;
            pos += rsz;
            continue;
        }
        uint64_t q = pos + D_RECORD_ALIGNMENT;
        while (q < limit && !valid_at(c, q, limit, &rsz)) q += D_RECORD_ALIGNMENT;
        if (q >= limit) break;
        while (pos < q) {   /* the torn gap becomes padding, split at the wrap point */
            uint64_t idx = pos & (c->cap - 1);
            uint64_t seg = q - pos < c->cap - idx ? q - pos : c->cap - idx;
            write_pad(c, pos, seg);
            pos += seg;
            repaired++;
        }
    }
    *U64(c, D_TAIL_OFFSET) = pos;
    *U64(c, D_FREE_HEAD_OFFSET) = head;
    *U64(c, D_EPOCH_OFFSET) += 1;   /* a new incarnation: see "Power loss" in docs/ring.md */
    *U64(c, D_APPENDED_OFFSET) = *U64(c, D_POPPED_OFFSET) + count;
    *U32(c, D_FUTEX_OFFSET) = 0;
    *U32(c, D_WAITERS_OFFSET) = 0;
    int r = iotring_mutex_init(c);
    if (r) return r;
    *out_tail = pos;
    *out_count = count;
    *out_repaired = repaired;
    return persist_range(c, c->base, D_DATA_OFFSET + c->cap);
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "node.ring._chelper",
    CSRC.replace("@TYPES@", TYPES).replace("@DEFINES@", _descriptor().c_defines()),
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wno-unused-function"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    # In-place build from the repository root: python node/ring/_cbuild.py
    import glob
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose=False)
        for old in glob.glob(os.path.join(_HERE, "_chelper.*.so")):
            os.unlink(old)
        shutil.copy2(built, os.path.join(_HERE, os.path.basename(built)))
