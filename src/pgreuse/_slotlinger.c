/*
 * Linger, the part of pgreuse._slots.Hot that keeps a slot for a connection's next transaction
 * (see the comment below, docs/how-it-works.md, and sq_take_lingering in _slotqueue.h for the
 * waiters' side).
 */
#include "_slothot.h"

#include <fcntl.h>
#include <unistd.h>

/* Linger. Under contention (workers wait in the table), each hand-over of a backend costs a
 * cross-process wake-up: 12 us of kernel time per transaction on the test machine, where a select 1
 * costs some 50 us in all. A connection that came back for its next transaction within
 * LINGER_STEAL_NS last time, and has held the slot for less than LINGER_QUANTUM_NS, keeps it at a
 * clean end instead: its socket is swapped back (libpq's fd is the parking socket again, as after
 * any lease) and the record's REC_LINGER says since when. At its next begin it swaps that stamp to 0
 * and goes on with the same backend, with no claim and no wake-up. If it does not come back within
 * LINGER_STEAL_NS, a waiter (or the broker's janitor) swaps the stamp to 0 first and hands the slot
 * to the table's first waiter, as this release would have (sq_take_lingering). Waiters wait at most
 * LINGER_QUANTUM_NS longer for their turn; nobody waits on an abandoned one longer than
 * LINGER_STEAL_NS. */
static int
may_linger(HotObject *self, int64_t now)
{
    uint64_t ticket;
    SlotsObject *t = self->slots;

    return self->waits && self->gap < LINGER_STEAL_NS && now - self->tenure < LINGER_QUANTUM_NS &&
           sw_load(word_at(t, t->pending_off)) == 0 && sq_first(&t->t, &ticket) &&
           sw_load(sq_word(&t->t, self->slot)) == hot_lent(self);
}

/* Give up the slot this connection lingers on (as a release would): the release's answer (0,
 * the proxy's queue length to poke the broker about, -1 if the broker took it meanwhile), or 0
 * when a waiter took it first or nothing lingers. No Python: it runs in dealloc too. */
long long
hot_unlinger(HotObject *self)
{
    if (!self->lingering || hot_pid != self->owner_pid || self->slots == NULL ||
        !self->slots->has_view)
        return 0; /* (a forked child's copy: the parent's to give up; or cleared by the GC) */
    self->lingering = 0;
    if (!sw_cas32((uint32_t *)(record(self->slots, self->slot) + REC_LINGER), self->linger_mark, 0))
        return 0; /* a waiter took it */
    /* (counted when it began to linger) */
    return slots_release_lent(self->slots, self->slot, hot_lent(self), 0, 0, 0);
}

/* unlinger(): give up a lingering slot now (the connection closes, parks, or goes to the proxy) */
PyObject *
Hot_unlinger(HotObject *self, PyObject *Py_UNUSED(unused))
{
    if (hot_released(self, hot_unlinger(self), 0) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* The next transaction of a connection that lingers: LEASED if it goes on with the same backend,
 * NOTHING if a waiter took it (or the broker) and the usual path takes over, NULL on error. */
PyObject *
hot_resume(HotObject *self, PyObject *conn)
{
    char *rec = record(self->slots, self->slot);
    int64_t now;
    long fd;

    self->lingering = 0;
    if (!sw_cas32((uint32_t *)(rec + REC_LINGER), self->linger_mark, 0))
        return PyLong_FromLong(HOT_NOTHING); /* a waiter took it */
    if (sw_load((uint64_t *)(rec + REC_WORD)) != hot_lent(self)) {
        /* the broker took it back meanwhile: it must hear that the lease is over */
        if (hot_released(self, -1, 0) < 0)
            return NULL;
        return PyLong_FromLong(HOT_NOTHING);
    }
    now = sw_now_ns();
    fd = PyLong_AsLong(PyList_GET_ITEM(self->fds, self->slot));
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (dup3((int)fd, (int)self->fd_number, O_CLOEXEC) < 0) {
        /* it goes on as if it had not lingered: given back (counted when it began to linger) */
        int err = errno;
        if (hot_released(self, slots_release_lent(self->slots, self->slot, hot_lent(self), 0, 0, 0),
                         0) < 0)
            return NULL;
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    *(int64_t *)(rec + REC_LEASE_START) = now;
    self->started = (double)now / 1e9;
    self->waited = 0.0;
    self->bucket = 0;
    if (PyObject_SetAttr(conn, s_held, (PyObject *)self) < 0)
        return NULL;
    return PyLong_FromLong(HOT_LEASED);
}


/* At a clean end (the socket is swapped back): keep the slot for this connection's next transaction
 * if it may (1), or not (0); -1 on error. */
int
hot_linger(HotObject *self, int64_t now)
{
    char *rec;

    if (!may_linger(self, now))
        return 0;
    rec = record(self->slots, self->slot);
    slots_count_lease(self->slots, self->slot, self->bucket, now);
    *(int64_t *)(rec + REC_LEASE_START) = now;
    if (hot_released(self, 0, now) < 0) /* (given back lately, as far as the claim path goes) */
        return -1;
    self->linger_mark = linger_stamp(now);
    self->lingering = 1;
    sw_store32((uint32_t *)(rec + REC_LINGER), self->linger_mark); /* (waiters may take it) */
    return 1;
}
