/*
 * The slot word: who owns a slot of the shared-memory table, as one aligned 64-bit word changed only
 * by compare-and-swap (DESIGN.md section 4). Included by _slots.c (workers and the broker).
 *
 *   bits  0..7   state (pgreuse.wire.states.SlotState)
 *   bits  8..31  generation, low 24 bits (a new backend in the slot is a new generation)
 *   bits 32..63  holder: 0 = nobody (an IDLE slot any process may claim), 1 = the broker, >= 2 the
 *                id the broker gave one worker process's control channel
 *
 * The layout of the word and of the slot record around it is pgreuse/shm_layout.py's; the constants below
 * must match it (tests/test_slots.py compares them). Every access is a sequentially consistent
 * atomic: a worker that releases a slot and then reads the proxy's queue length, and a broker that
 * publishes the queue length and then looks for an idle slot, must not both miss each other.
 */
#ifndef PGREUSE_SLOTWORD_H
#define PGREUSE_SLOTWORD_H

#include <stdint.h>
#include <time.h>

#define SW_STATE(w) ((unsigned)((w) & 0xFFu))
#define SW_GEN(w) ((unsigned)(((w) >> 8) & 0xFFFFFFu))
#define SW_HOLDER(w) ((uint32_t)((w) >> 32))
#define SW_MAKE(state, gen, holder)                                                                \
    ((uint64_t)((state) & 0xFFu) | ((uint64_t)((gen) & 0xFFFFFFu) << 8) | ((uint64_t)(holder) << 32))

/* SlotState values (wire/states.py) */
#define SW_IDLE 2u
#define SW_LENT 3u

/* Offsets within one slot record (shm_layout._SLOT) */
#define REC_WORD 0
#define REC_PARKING 8
#define REC_HOLDER_PID 12
#define REC_LEASE_START 16
#define REC_LEASES 24
#define REC_USE_NS 32
/* In the record's padding (shm_layout._SLOT skips bytes 50..55): nonzero while the holder keeps the
 * slot for its next transaction ("linger", _slothot.c): when it stopped, in linger_stamp() units.
 * Whoever swaps it to 0 first decides: the holder (it goes on with the backend) or a waiter (it
 * hands the slot to the table's first waiter, as a release would). */
#define REC_LINGER 52

/* Linger (see _slothot.c): a slot is kept for its holder's next transaction while the table has
 * waiters only if the holder came back within LINGER_STEAL_NS last time and has held it for less
 * than LINGER_QUANTUM_NS; a waiter takes a lingering slot that is LINGER_STEAL_NS old. */
#define LINGER_QUANTUM_NS 1000000
#define LINGER_STEAL_NS 200000

static inline uint64_t
sw_load(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

static inline void
sw_store(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}

static inline int
sw_cas(uint64_t *p, uint64_t expected, uint64_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

static inline void
sw_add(uint64_t *p, uint64_t n)
{
    __atomic_fetch_add(p, n, __ATOMIC_SEQ_CST);
}

static inline uint32_t
sw_load32(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

static inline void
sw_store32(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
}

static inline int
sw_cas32(uint32_t *p, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

static inline int64_t
sw_now_ns(void)
{
    /* time.monotonic_ns()'s clock on Linux: the same in every process */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A REC_LINGER stamp for monotonic time ``now`` (units of 1024 ns, never 0; wraps: compare with
 * linger_age, which is negative for a stamp later than ``now``, up to 36 minutes) */
static inline uint32_t
linger_stamp(int64_t now)
{
    uint32_t v = (uint32_t)((uint64_t)now >> 10);
    return v ? v : 1;
}

static inline int64_t
linger_age(uint32_t stamp, int64_t now)
{
    return (int64_t)(int32_t)(linger_stamp(now) - stamp) * 1024;
}

#endif
