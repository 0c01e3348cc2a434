/*
 * The Slots object of pgreuse._slots, shared by its two files: _slots.c (the type, the slot words,
 * claim and release) and _slotwait.c (the table's wait queue, see _slotqueue.h).
 */
#ifndef PGREUSE_SLOTSOBJ_H
#define PGREUSE_SLOTSOBJ_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_slotqueue.h"

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    char *base;
    Py_ssize_t slots_off, slot_size, n, pending_off, leases_off, use_ns_off, hist0_off, queue_off;
    sq_table t;
} SlotsObject;

#define CLOSED_GATE (1ull << 32) /* shm.CLOSED_GATE: in ``pending`` while paused or closing */
#define N_BUCKETS 17             /* snapshot.WAIT_BUCKETS and its open-ended bucket */

static inline uint64_t *
word_at(SlotsObject *self, Py_ssize_t off)
{
    return (uint64_t *)(self->base + off);
}

static inline char *
record(SlotsObject *self, Py_ssize_t i)
{
    return self->base + self->slots_off + i * self->slot_size;
}

static inline int
check(SlotsObject *self, Py_ssize_t i)
{
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "the slot table is closed");
        return -1;
    }
    if (i < 0 || i >= self->n) {
        PyErr_Format(PyExc_IndexError, "slot %zd does not exist (the table has %zd)", i, self->n);
        return -1;
    }
    return 0;
}

/* Count the lease of slot ``i`` that ends at ``now`` (its wait in histogram bucket ``bucket``): in
 * its record (the holder's alone until it hands the slot on) and in the pool's counters. */
static inline void
slots_count_lease(SlotsObject *self, Py_ssize_t i, Py_ssize_t bucket, int64_t now)
{
    char *rec = record(self, i);
    int64_t used = now - *(int64_t *)(rec + REC_LEASE_START);

    if (used < 0)
        used = 0;
    *(uint64_t *)(rec + REC_LEASES) += 1;
    *(uint64_t *)(rec + REC_USE_NS) += (uint64_t)used;
    /* the pool's counters are everyone's: atomic adds */
    sw_add(word_at(self, self->leases_off), 1);
    sw_add(word_at(self, self->use_ns_off), (uint64_t)used);
    sw_add(word_at(self, self->hist0_off + bucket * 8), 1);
}

/* The holder gives slot ``i`` (its word ``lent``) on: to the first worker waiting in the table, or
 * back IDLE(0) when nobody waits there or the proxy's oldest waiter came first. The proxy's queue
 * length when it went idle while the proxy has waiters (the caller pokes the broker), 0 when it is
 * idle or granted, -1 when the slot was no longer the holder's. */
static inline long long
slots_give(SlotsObject *self, Py_ssize_t i, uint64_t lent)
{
    uint64_t pending = sw_load(word_at(self, self->pending_off)), ticket, first;

    if (pending) {
        /* FIFO across both queues: the proxy's oldest waiter against the table's first */
        int64_t oldest = (int64_t)sw_load(sq_q(&self->t, Q_PROXY_OLDEST));
        first = sq_first(&self->t, &ticket);
        if (!first || (pending & CLOSED_GATE) || oldest == 0 ||
            oldest <= (int64_t)sw_load(sq_entry(&self->t, ticket) + 1)) {
            if (!sw_cas((uint64_t *)(record(self, i) + REC_WORD), lent,
                        SW_MAKE(SW_IDLE, SW_GEN(lent), 0)))
                return -1;
            return (long long)pending;
        }
    }
    return sq_hand_over(&self->t, i, lent) < 0 ? -1 : 0;
}

/* The holder of slot ``i`` (its word ``lent``) is done with it: count the lease (``count``: it ends
 * at ``now``; 0 for one counted already, when it began to linger), clear the holder's fields of the
 * record (its alone until it hands the slot on), and give the slot on. slots_give's answer, or -1
 * when the word is not ``lent`` any more (the broker took the slot back). */
static inline long long
slots_release_lent(SlotsObject *self, Py_ssize_t i, uint64_t lent, Py_ssize_t bucket, int count,
                   int64_t now)
{
    char *rec = record(self, i);

    if (sw_load((uint64_t *)(rec + REC_WORD)) != lent)
        return -1;
    if (count)
        slots_count_lease(self, i, bucket, now);
    *(uint32_t *)(rec + REC_PARKING) = 0;
    *(uint32_t *)(rec + REC_HOLDER_PID) = 0;
    *(int64_t *)(rec + REC_LEASE_START) = 0;
    return slots_give(self, i, lent);
}

/* Parse a worker's holder id (0 and 1 are nobody and the broker) of an open table: 0, or -1 with
 * the error set. */
static inline int
worker_holder(SlotsObject *self, PyObject *arg, unsigned long *holder)
{
    *holder = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return -1;
    if (!self->has_view) {
        PyErr_SetString(PyExc_ValueError, "the slot table is closed");
        return -1;
    }
    if (*holder < 2 || *holder > 0xFFFFFFFFul) {
        PyErr_Format(PyExc_ValueError, "holder id %lu is not a worker's", *holder);
        return -1;
    }
    return 0;
}

/* _slots.c: claim, release and the fd check, also called by _slothot.c */
PyObject *Slots_claim(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Slots_release(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *check_fds(PyObject *module, PyObject *const *args, Py_ssize_t nargs);

/* _slothot.c: the per-connection hot path (adds the Hot type to the module) */
int hot_add_type(PyObject *module, PyTypeObject *slots_type);

/* _slotwait.c: the wait queue's methods */
PyObject *Slots_hand_over(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Slots_enqueue(SlotsObject *self, PyObject *arg);
PyObject *Slots_rescue(SlotsObject *self, PyObject *arg);
PyObject *Slots_take_lingering(SlotsObject *self, PyObject *unused);
PyObject *Slots_wait(SlotsObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Slots_cancel_waiters(SlotsObject *self, PyObject *arg);
PyObject *Slots_waiting(SlotsObject *self, PyObject *unused);
PyObject *Slots_skip(SlotsObject *self, PyObject *arg);

#endif
