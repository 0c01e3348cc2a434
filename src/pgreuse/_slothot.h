/*
 * The Hot object of pgreuse._slots, shared by its two files: _slothot.c (a lease's start and end in
 * the usual case) and _slothottype.c (the type: fields, init, garbage collection, fork).
 */
#ifndef PGREUSE_SLOTHOT_H
#define PGREUSE_SLOTHOT_H

#include "_slotsobj.h"

#define HOT_LEASED -2
#define HOT_NOTHING -1

typedef struct {
    PyObject_HEAD
    /* fixed when the connection binds (the channel's lists are made once, at its Welcome) */
    SlotsObject *slots;
    PyObject *channel, *outbox, *lock, *pgconn;
    PyObject *claim_args[5]; /* holder, start, generations, parking, pid: Slots.claim's */
    PyObject *fds, *full, *pids, *given_back;
    PyObject *baseline, *names, *state_only, *watched;
    PyObject *control_fd_obj, *bounds; /* the control socket's fd; WAIT_BOUNDS_NS (a tuple) */
    int waits;                         /* the channel waits in the table (sync connections) */
    uint32_t holder;                   /* the channel's holder id (claim_args[0]) */
    long control_fd, owner_pid, home;
    long long check_after_ns;
    /* the lease held now: client.held._Held's fields */
    Py_ssize_t slot, bucket;
    long generation, backend_pid, fd_number;
    double started, waited;
    char watched_flag;
    PyObject *span;
    /* linger (see _slothot.c): the slot is kept for this connection's next transaction */
    int lingering;
    uint32_t linger_mark;   /* the REC_LINGER stamp it wrote */
    int64_t tenure;         /* since when it holds the slot without a hand-over */
    int64_t last_end, gap;  /* its last lease's end; how long it then took to begin the next */
} HotObject;

/* The slot word while this connection holds its slot */
static inline uint64_t
hot_lent(const HotObject *self)
{
    return SW_MAKE(SW_LENT, (unsigned long)self->generation & 0xFFFFFFul, self->holder);
}

extern long hot_pid; /* getpid(), kept right across fork() */

/* attribute names, interned once (_slothottype.c) */
extern PyObject *s_dead, *s_outbox, *s_lock, *s_holder, *s_start, *s_gens, *s_pid, *s_fds, *s_full,
    *s_pids, *s_given_back, *s_sock, *s_fileno, *s_gi_code, *s_co_name, *s_status, *s_txn_status,
    *s_pipeline_status, *s_parameter_status, *s_acquire, *s_release, *s_held, *s_session_dirty,
    *s_released, *s_poke_if_room, *s_waits_in_table;

/* _slothot.c */
int hot_released(HotObject *self, long long pending, int64_t now);
PyObject *Hot_begin(HotObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Hot_adopt(HotObject *self, PyObject *const *args, Py_ssize_t nargs);
PyObject *Hot_end(HotObject *self, PyObject *conn);

/* _slotlinger.c */
PyObject *Hot_unlinger(HotObject *self, PyObject *unused);
long long hot_unlinger(HotObject *self);
PyObject *hot_resume(HotObject *self, PyObject *conn);
int hot_linger(HotObject *self, int64_t now);

#endif
