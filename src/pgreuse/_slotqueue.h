/*
 * The table's wait queue: where a worker's transaction waits for a backend when none is idle, and
 * where the worker that frees one hands it to the first waiter directly (DESIGN.md section 4,
 * "Waiting in the table"). Included by _slots.c; the Python reference is pgreuse.slots.PySlots.
 *
 * A ring of QR entries after the slot records, and two tickets: ``tail`` (the next to take) and
 * ``head`` (the next to serve). A waiter takes ticket t with a compare-and-swap on ``tail`` (only
 * while fewer than ``cap`` wait), then publishes its entry ring[t % QR] = WAITING(t, holder). Whoever
 * frees a slot while the entry at ``head`` is WAITING CASes it to GRANTED(t, slot), moves ``head``
 * on, stores LENT(holder) in the slot word and wakes the waiter (a futex on the entry's low half):
 * the backend goes from one worker to the next with no broker in between and no idle gap but the
 * wake-up. A waiter that gives up CASes its entry WAITING -> CANCELLED; if that fails it was granted.
 *
 * Entry word: bits 0..7 state, 8..39 value (the holder while WAITING, the slot once GRANTED),
 * 40..63 the ticket's low 24 bits (the stamp: an entry is ticket h's only while it carries h's stamp).
 * A ticket taken but not yet published looks like an empty queue: its waiter, once published, scans
 * the slots for idle ones and hands them to the head (sq_rescue). The releaser stores IDLE and then
 * looks at the head again, the waiter publishes and then scans: with sequentially consistent
 * atomics one of the two sees the other (no lost wake-up).
 */
#ifndef PGREUSE_SLOTQUEUE_H
#define PGREUSE_SLOTQUEUE_H

#include "_slotword.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The queue block (shm: after the slot records; slots.Q_* name the same offsets) */
#define Q_HEAD 0
#define Q_TAIL 8
#define Q_PROXY_OLDEST 16 /* monotonic ns the proxy's oldest waiter queued at; 0: none */
#define Q_TIMEOUT 24      /* --wait-timeout, ns */
#define Q_CAP 32          /* waiters allowed at once (<= QR) */
#define Q_RING 64
#define QR 256 /* ring entries */
#define Q_ENTRY 16 /* word, since_ns */
#define Q_BYTES (Q_RING + QR * Q_ENTRY)

#define QE_FREE 0u
#define QE_WAITING 1u
#define QE_GRANTED 2u
#define QE_CANCELLED 3u
#define QE_STATE(e) ((unsigned)((e) & 0xFFu))
#define QE_VALUE(e) ((uint32_t)((e) >> 8))
#define QE_STAMP(e) ((uint32_t)((e) >> 40))
#define QE_MAKE(state, value, ticket)                                                              \
    ((uint64_t)((state) & 0xFFu) | ((uint64_t)(uint32_t)(value) << 8) |                             \
     (((uint64_t)(ticket) & 0xFFFFFFu) << 40))

/* enqueue / wait results */
#define SQ_FULL -1      /* cap waiters already: go through the proxy */
#define SQ_CANCELLED -2 /* the broker cancelled the wait (pause, shutdown, a stuck ticket) */
#define SQ_TIMEOUT -5   /* --wait-timeout passed */
#define SQ_CONTROL -6   /* the control channel has something to read (the broker's end?) */
#define SQ_LOST -7      /* granted a slot the broker took back before it reached this waiter */

typedef struct {
    char *base;
    ptrdiff_t slots_off, slot_size, n, pending_off, queue_off;
} sq_table;

static inline uint64_t *
sq_word(const sq_table *t, ptrdiff_t i)
{
    return (uint64_t *)(t->base + t->slots_off + i * t->slot_size + REC_WORD);
}

static inline uint64_t *
sq_q(const sq_table *t, ptrdiff_t off)
{
    return (uint64_t *)(t->base + t->queue_off + off);
}

static inline uint64_t *
sq_entry(const sq_table *t, uint64_t ticket)
{
    return sq_q(t, Q_RING + (ptrdiff_t)(ticket % QR) * Q_ENTRY);
}

static inline int
sq_is(uint64_t e, uint64_t ticket, unsigned state)
{
    return QE_STATE(e) == state && QE_STAMP(e) == (uint32_t)(ticket & 0xFFFFFFu);
}

static inline int
sq_published(uint64_t e, uint64_t ticket)
{
    return QE_STATE(e) != QE_FREE && QE_STAMP(e) == (uint32_t)(ticket & 0xFFFFFFu);
}

/* The entry of the first waiter, or 0 when nobody waits at the head (or its waiter has not
 * published yet); *ticket gets the head. */
static inline uint64_t
sq_first(const sq_table *t, uint64_t *ticket)
{
    for (;;) {
        uint64_t h = sw_load(sq_q(t, Q_HEAD));
        uint64_t e = sw_load(sq_entry(t, h));
        if (!sq_published(e, h))
            return 0;
        if (QE_STATE(e) == QE_WAITING) {
            *ticket = h;
            return e;
        }
        sw_cas(sq_q(t, Q_HEAD), h, h + 1); /* granted or cancelled: skip it (anyone may) */
    }
}

static inline void
sq_wake(uint64_t *entry)
{
    /* the low half of the little-endian word: state and the value's low 24 bits */
    syscall(SYS_futex, (uint32_t *)entry, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* Slot i, whose word the caller owns as ``owned``, goes to the first waiter, else back to IDLE.
 * Returns the waiter's holder id, 0 when the slot is idle now, -1 when the word was not ``owned``
 * (the broker took the slot back). */
static inline int64_t
sq_hand_over(const sq_table *t, ptrdiff_t i, uint64_t owned)
{
    uint64_t *word = sq_word(t, i);
    unsigned gen = SW_GEN(owned);
    uint64_t idle = SW_MAKE(SW_IDLE, gen, 0);

    for (;;) {
        uint64_t h, e = sq_first(t, &h);
        if (e) {
            uint32_t who = QE_VALUE(e);
            uint64_t *entry = sq_entry(t, h);
            if (sw_load(word) != owned)
                return -1;
            if (!sw_cas(entry, e, QE_MAKE(QE_GRANTED, (uint32_t)i, h)))
                continue; /* it gave up meanwhile: the next */
            sw_cas(sq_q(t, Q_HEAD), h, h + 1);
            if (!sw_cas(word, owned, SW_MAKE(SW_LENT, gen, who))) {
                sq_wake(entry); /* it finds the slot is not its own (SQ_LOST) */
                return -1;
            }
            sq_wake(entry);
            return who;
        }
        if (!sw_cas(word, owned, idle))
            return -1;
        if (!sq_first(t, &h))
            return 0;
        /* A waiter published as we looked: take the slot back for it, unless someone did. */
        if (!sw_cas(word, idle, owned))
            return 0;
    }
}

/* Take a ticket and publish it: the ticket, SQ_FULL, or SQ_CANCELLED. */
static inline int64_t
sq_enqueue(const sq_table *t, uint32_t holder, int64_t now)
{
    uint64_t ticket, e;
    uint64_t *entry;

    for (;;) {
        uint64_t tail = sw_load(sq_q(t, Q_TAIL));
        uint64_t head = sw_load(sq_q(t, Q_HEAD));
        uint64_t cap = sw_load(sq_q(t, Q_CAP));
        if (cap > QR)
            cap = QR;
        if (tail - head >= cap)
            return SQ_FULL;
        if (sw_cas(sq_q(t, Q_TAIL), tail, tail + 1)) {
            ticket = tail;
            break;
        }
    }
    entry = sq_entry(t, ticket);
    e = sw_load(entry);
    if (sq_published(e, ticket))
        return SQ_CANCELLED; /* the broker skipped this ticket: it waited too long to publish */
    sw_store(entry + 1, (uint64_t)now);
    if (!sw_cas(entry, e, QE_MAKE(QE_WAITING, holder, ticket)))
        return SQ_CANCELLED;
    return (int64_t)(ticket & 0x7FFFFFFFFFFFFFFFull);
}

/* Hand every idle slot to the first waiters (a waiter runs it after it publishes). */
static inline void
sq_rescue(const sq_table *t, uint32_t holder)
{
    ptrdiff_t i;
    uint64_t h;

    for (i = 0; i < t->n; i++) {
        uint64_t w = sw_load(sq_word(t, i));
        uint64_t mine = SW_MAKE(SW_LENT, SW_GEN(w), holder);
        if (!sq_first(t, &h))
            return;
        if (SW_STATE(w) != SW_IDLE || SW_HOLDER(w) != 0 || !sw_cas(sq_word(t, i), w, mine))
            continue;
        sq_hand_over(t, i, mine);
    }
}

/* Give up ticket ``ticket``: 1 if cancelled, 0 if it was granted (or cancelled) first. */
static inline int
sq_cancel(const sq_table *t, uint64_t ticket, uint32_t holder)
{
    return sw_cas(sq_entry(t, ticket), QE_MAKE(QE_WAITING, holder, ticket),
                  QE_MAKE(QE_CANCELLED, 0, ticket));
}

/* Cancel every waiter (holder 0) or one holder's, and wake them: the count cancelled. */
static inline int
sq_cancel_all(const sq_table *t, uint32_t holder)
{
    uint64_t k;
    int n = 0;

    for (k = 0; k < QR; k++) {
        uint64_t *entry = sq_q(t, Q_RING + (ptrdiff_t)k * Q_ENTRY);
        uint64_t e = sw_load(entry);
        if (QE_STATE(e) != QE_WAITING || (holder && QE_VALUE(e) != holder))
            continue;
        if (sw_cas(entry, e, QE_MAKE(QE_CANCELLED, 0, QE_STAMP(e)))) {
            sq_wake(entry);
            n++;
        }
    }
    return n;
}

/* The janitor's remedy for a ticket taken but never published (its process died in between):
 * when ``head`` is still ``ticket``, mark it cancelled and move on. 1 if it did. */
static inline int
sq_skip(const sq_table *t, uint64_t ticket)
{
    uint64_t *entry = sq_entry(t, ticket);
    uint64_t e = sw_load(entry);
    if (sw_load(sq_q(t, Q_HEAD)) != ticket || sw_load(sq_q(t, Q_TAIL)) <= ticket ||
        sq_published(e, ticket))
        return 0;
    if (!sw_cas(entry, e, QE_MAKE(QE_CANCELLED, 0, ticket)))
        return 0;
    sw_cas(sq_q(t, Q_HEAD), ticket, ticket + 1);
    return 1;
}

/* Lingering slots (REC_LINGER, see _slotword.h) of holders that did not come back within
 * LINGER_STEAL_NS go to the table's first waiter, as their release would have: 1 if one did.
 * *next gets when the youngest of the others is due (unchanged if none lingers). */
static inline int
sq_take_lingering(const sq_table *t, int64_t now, int64_t *next)
{
    ptrdiff_t i;
    int took = 0;

    for (i = 0; i < t->n; i++) {
        uint32_t *stamp = (uint32_t *)(t->base + t->slots_off + i * t->slot_size + REC_LINGER);
        uint32_t v = sw_load32(stamp);
        int64_t age;
        if (!v)
            continue;
        age = linger_age(v, now);
        if (age >= LINGER_STEAL_NS) {
            uint64_t w = sw_load(sq_word(t, i));
            /* (the holder swaps the stamp to 0 before it uses the slot again: one of us wins) */
            if (SW_STATE(w) == SW_LENT && sw_cas32(stamp, v, 0) && sq_hand_over(t, i, w) >= 0)
                took = 1;
        } else if (now + LINGER_STEAL_NS - age < *next) {
            *next = now + LINGER_STEAL_NS - age;
        }
    }
    return took;
}

/* Wait for ticket ``ticket`` (call without the GIL): the slot granted (its word then LENT to
 * ``holder``), or SQ_CANCELLED, SQ_TIMEOUT, SQ_CONTROL, SQ_LOST. Wakes every 100 ms to look at the
 * control channel (``control_fd``: readable when the broker died) and at idle slots. */
static inline int64_t
sq_wait(const sq_table *t, uint64_t ticket, uint32_t holder, int64_t deadline, int control_fd)
{
    uint64_t *entry = sq_entry(t, ticket);
    const uint64_t waiting = QE_MAKE(QE_WAITING, holder, ticket);

    for (;;) {
        uint64_t e = sw_load(entry);
        int64_t left;
        if (sq_is(e, ticket, QE_GRANTED)) {
            ptrdiff_t i = (ptrdiff_t)QE_VALUE(e);
            int spins;
            uint64_t h2;
            int64_t due = INT64_MAX;
            /* The next waiter watches the lingering slots now (only the first one sleeps with a
             * timeout for them): wake it if there are any. */
            sq_take_lingering(t, sw_now_ns(), &due);
            if (due != INT64_MAX && sq_first(t, &h2))
                sq_wake(sq_entry(t, h2));
            /* The releaser stores LENT(holder) right after the grant; the broker may have taken
             * the slot back first (a revoked lease, or the releaser died in between: the broker
             * closes what the dead held): then it is not ours. */
            for (spins = 0;; spins++) {
                uint64_t w = sw_load(sq_word(t, i));
                if (SW_HOLDER(w) == holder && SW_STATE(w) == SW_LENT)
                    return i;
                if (SW_HOLDER(w) <= 1 || SW_STATE(w) != SW_LENT || sw_now_ns() > deadline)
                    return SQ_LOST;
                if (spins < 100) {
                    sched_yield();
                } else {
                    struct timespec pause = {0, 50000};
                    nanosleep(&pause, NULL);
                }
            }
        }
        if (e != waiting)
            return SQ_CANCELLED;
        left = deadline - sw_now_ns();
        if (left <= 0) {
            if (sq_cancel(t, ticket, holder))
                return SQ_TIMEOUT;
            continue; /* granted meanwhile */
        }
        if (control_fd >= 0) {
            struct pollfd p = {control_fd, POLLIN, 0};
            if (poll(&p, 1, 0) > 0) {
                if (sq_cancel(t, ticket, holder))
                    return SQ_CONTROL;
                continue;
            }
        }
        {
            struct timespec ts;
            uint64_t h;
            int64_t now = sw_now_ns(), due = INT64_MAX;
            if (sq_take_lingering(t, now, &due))
                continue; /* handed to the first waiter: maybe this one */
            if (left > 100000000)
                left = 100000000;
            if (due - now < left && sq_first(t, &h) && h == ticket)
                left = due - now > 0 ? due - now : 1;
            ts.tv_sec = left / 1000000000;
            ts.tv_nsec = left % 1000000000;
            syscall(SYS_futex, (uint32_t *)entry, FUTEX_WAIT, (uint32_t)waiting, &ts, NULL, 0);
        }
        if (sw_load(entry) == waiting)
            sq_rescue(t, holder); /* (a periodic look: cheap, and it covers the unforeseen) */
    }
}

#endif
