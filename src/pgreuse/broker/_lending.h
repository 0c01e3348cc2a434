/*
 * The pool's lending fast path for proxy sessions, included by _proxycore.c.
 *
 * The reference is pgreuse.broker.pool.Pool: request() with an idle backend and no queue (its
 * _grant for an in-process holder) or when the request queues (a Waiter, its deadline, the expiry
 * timer, the gauges), and give_back() of a clean backend whose holder read it up to ReadyForQuery
 * 'I' (its _hand_over to an in-process waiter, or its return to the idle stack). These run once
 * per proxied transaction each, and in Python they were the largest part of the broker's remaining
 * CPU per transaction. Here they are the same steps on the same objects, whose fields are struct
 * members (_poolcore.h), for exactly those cases: every other case (a refusal, a worker to serve,
 * a pause, a shutdown, debug logging of transitions, a reset to run) returns 0 before changing
 * anything, and the caller goes to the Python method. What the Python methods do that is not on
 * these paths (arming a timer, opening a backend, a new maximum of the queue) is a call to them.
 *
 * The transitions taken here (IDLE -> LENT; LENT -> RESETTING -> IDLE, neither published, as
 * Pool._transition(publish=False) does) are checked against states.TRANSITIONS by proxy.py at import.
 * Pool._flush_soon's test (no timer armed yet) is inlined in publish_pending, and _arm_expiry's
 * (armed for an earlier deadline) in queue_request: change them together.
 */
#ifndef PGREUSE_LENDING_H
#define PGREUSE_LENDING_H

/* Set by setup(): SlotState members, and interned attribute names. */
static PyObject *st_closed, *st_idle, *st_lent, *st_shared;
static PyObject *a_flush_soon, *a_in_process, *a_dispatch, *a_granted, *a_popleft, *a_append,
    *a_arm_expiry, *a_note_max_pending, *zero;

static int
lending_names(void)
{
#define NAME(var, text)                                                                            \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                          \
        return -1;
    NAME(a_flush_soon, "_flush_soon")
    NAME(a_in_process, "in_process")
    NAME(a_append, "append")
    NAME(a_arm_expiry, "_arm_expiry")
    NAME(a_note_max_pending, "_note_max_pending")
    NAME(a_dispatch, "_dispatch")
    NAME(a_granted, "granted")
    NAME(a_popleft, "popleft")
#undef NAME
    return (zero = PyLong_FromLong(0)) == NULL ? -1 : 0;
}

/* states[key] += delta (Pool._states: slots per state). */
static int
count_state(PyObject *states, PyObject *key, long delta)
{
    PyObject *v = PyDict_GetItemWithError(states, key); /* borrowed */
    long n;

    if (v == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    n = PyLong_AsLong(v);
    if (n == -1 && PyErr_Occurred())
        return -1;
    v = PyLong_FromLong(n + delta);
    if (v == NULL)
        return -1;
    n = PyDict_SetItem(states, key, v);
    Py_DECREF(v);
    return (int)n;
}

/* Pool._transition(b, new, publish=False) from ``old``, a transition known to be allowed. */
static int
move_state(PoolObject *pool, BackendObject *b, PyObject *old, PyObject *new)
{
    if (count_state(pool->states, old, -1) < 0 || count_state(pool->states, new, 1) < 0)
        return -1;
    Py_SETREF(b->state, Py_NewRef(new));
    return 0;
}

/* Pool._flush_soon(): the table is brought up to date within TABLE_LAG. */
static int
publish_pending(PoolObject *pool)
{
    /* no timer yet: Pool._flush_soon arms it */
    return pool->flush_timer == Py_None
               ? discard(PyObject_CallMethodNoArgs((PyObject *)pool, a_flush_soon))
               : 0;
}

/* Pool._publish_soon(b): the record reaches the table within TABLE_LAG. */
static int
publish_soon(PoolObject *pool, BackendObject *b)
{
    if (PySet_Add(pool->lagging, (PyObject *)b) < 0)
        return -1;
    return publish_pending(pool);
}

/* Lease bookkeeping for a new holder (Pool._grant / _hand_over). */
static void
take_lease(BackendObject *b, PyObject *client, PyObject *parking, long long now)
{
    Py_SETREF(b->holder, Py_NewRef(client));
    Py_SETREF(b->parking, Py_NewRef(parking));
    b->lease_started_ns = now;
    b->leases++;
}

/* Pool._note_lease(waited, queued=True): a lease granted after ``waited`` ns in the FIFO. */
static int
note_queued(PoolObject *pool, long long waited)
{
    PyObject *bounds = pool->wait_bounds, *hist = pool->noted_hist, *n;
    Py_ssize_t lo = 0, hi = PyTuple_GET_SIZE(bounds);

    while (lo < hi) { /* bisect_left(WAIT_BOUNDS_NS, waited) */
        Py_ssize_t mid = (lo + hi) / 2;
        long long bound = PyLong_AsLongLong(PyTuple_GET_ITEM(bounds, mid));

        if (bound == -1 && PyErr_Occurred())
            return -1;
        if (bound < waited)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo >= PyList_GET_SIZE(hist)) {
        PyErr_Format(PyExc_IndexError, "Pool._noted_hist has no bucket %zd", lo);
        return -1;
    }
    {
        long long count = PyLong_AsLongLong(PyList_GET_ITEM(hist, lo));

        if ((count == -1 && PyErr_Occurred()) || (n = PyLong_FromLongLong(count + 1)) == NULL)
            return -1;
    }
    if (PyList_SetItem(hist, lo, n) < 0) /* (steals n, drops the old count) */
        return -1;
    pool->noted_leases++;
    pool->noted_waits++;
    pool->noted_wait_ns += waited;
    return 0;
}

static int granted_impl(Session *self, PyObject *b, PyObject *request);
static PyObject *c_granted_descr; /* SessionType's granted, set at module init */

/* The C granted() is the one ``client``'s class has (not an override in Python). */
static int
c_granted(PyObject *client)
{
    return PyObject_TypeCheck(client, &pxc_SessionType) &&
           _PyType_Lookup(Py_TYPE(client), a_granted) == c_granted_descr;
}

/* client.granted(b, request), in C when the client is a C session. */
static int
grant_to(PyObject *client, PyObject *b, PyObject *request)
{
    PyObject *args[3] = {client, b, request};

    if (c_granted(client))
        return granted_impl((Session *)client, b, request);
    return discard(PyObject_VectorcallMethod(a_granted, args, 3, NULL));
}

/* Not paused (``check_paused``), not shutting down, transitions not logged: the checks shared by
 * both paths. */
static int
pool_quiet(PoolObject *pool, int check_paused)
{
    return !pool->closing && !pool->debug && !(check_paused && pool->paused);
}

/* The backend lend_idle would lend now (borrowed), or NULL (*error: -1 if that is an error). Not
 * static: the client's read callback asks it too (_proxyclient.c). */
BackendObject *
pxc_lendable(PyObject *pool_obj, int *error)
{
    PoolObject *pool = AS_POOL(pool_obj);
    BackendObject *b;
    Py_ssize_t n;

    *error = 0;
    if (pool == NULL || !pool_quiet(pool, 1))
        return NULL;
    n = PyObject_Length(pool->waiters);
    if (n != 0) {
        *error = n < 0 ? -1 : 0;
        return NULL;
    }
    n = PyList_GET_SIZE(pool->idle);
    if (n == 0)
        return NULL;
    b = AS_BACKEND(PyList_GET_ITEM(pool->idle, n - 1));
    /* the idle stack holds idle backends only */
    return b != NULL && b->state == st_idle ? b : NULL;
}

/* Pool.request(self, request, parking) when an idle backend is free and nobody waits: 1 if done,
 * 0 if not this case (nothing changed), -1 on error. */
static int
lend_idle(Session *self, PyObject *pool_obj, PyObject *request)
{
    PoolObject *pool = (PoolObject *)pool_obj; /* (lendable checked its type) */
    BackendObject *b;
    Py_ssize_t n;
    int r;

    if ((b = pxc_lendable(pool_obj, &r)) == NULL)
        return r ? -1 : 0;
    n = PyList_GET_SIZE(pool->idle);
    Py_INCREF(b);
    r = PyList_SetSlice(pool->idle, n - 1, n, NULL); /* idle.pop() */
    if (r == 0) {
        take_lease(b, (PyObject *)self, self->parking_key, monotonic_ns());
        r = move_state(pool, b, st_idle, st_lent);
    }
    /* The holder gets its backend and sends its query first: the bookkeeping below is off that
     * query's path (as in Pool._grant). */
    if (r == 0)
        r = grant_to((PyObject *)self, (PyObject *)b, request);
    if (r == 0) {
        pool->noted_leases++;
        r = publish_soon(pool, b);
    }
    Py_DECREF(b);
    return r < 0 ? -1 : 1;
}

/* Pool.request(self, request, parking) when it queues the request (a backend is not free, or
 * others wait, or the pool is paused): 1 if done, 0 if not this case (nothing changed: a refusal
 * to answer, debug logging), -1 on error. */
static int
queue_request(Session *self, PyObject *pool_obj, PyObject *request)
{
    PoolObject *pool = AS_POOL(pool_obj);
    PyTypeObject *type;
    WaiterObject *w;
    Py_ssize_t n, idle;
    int r;

    if (pool == NULL || pool->closing || pool->debug || pool->last_connect_error != Py_None ||
        !PyType_Check(pool->waiter_type))
        return 0;
    type = (PyTypeObject *)pool->waiter_type;
    if (!PyType_IsSubtype(type, &WaiterType))
        return 0;
    n = PyObject_Length(pool->waiters);
    if (n < 0)
        return -1;
    idle = PyList_GET_SIZE(pool->idle);
    if ((idle && n == 0 && !pool->paused) || (pool->max_waiting && n >= pool->max_waiting))
        return 0; /* lent at once (with debug logging), or refused */
    /* Waiter(self, request, parking, now), with its deadline (its fields are all C ones) */
    w = (WaiterObject *)type->tp_new(type, empty_tuple, NULL);
    if (w == NULL)
        return -1;
    Py_SETREF(w->client, Py_NewRef((PyObject *)self));
    Py_SETREF(w->request, Py_NewRef(request));
    Py_SETREF(w->parking, Py_NewRef(self->parking_key));
    w->enqueued_ns = monotonic_ns();
    w->deadline_ns = w->enqueued_ns + pool->wait_timeout_ns;
    r = discard(PyObject_CallMethodOneArg(pool->waiters, a_append, (PyObject *)w));
    if (r == 0 && (pool->expiry == Py_None || w->deadline_ns < pool->expiry_at)) {
        /* Pool._arm_expiry: the timer is not armed for an earlier deadline */
        PyObject *deadline = PyLong_FromLongLong(w->deadline_ns);

        r = deadline == NULL ? -1
                             : discard(PyObject_CallMethodOneArg(pool_obj, a_arm_expiry, deadline));
        Py_XDECREF(deadline);
    }
    Py_DECREF(w);
    if (r < 0)
        return -1;
    if (n + 1 > pool->max_pending &&
        discard(PyObject_CallMethodNoArgs(pool_obj, a_note_max_pending)) < 0)
        return -1;
    if (idle == 0) {
        /* room to open a backend, or backends shared with the workers to take back */
        PyObject *keys[2] = {st_closed, st_shared};
        int k;

        for (k = 0, r = 0; k < 2 && r == 0; k++) {
            PyObject *count = PyDict_GetItemWithError(pool->states, keys[k]); /* borrowed */

            r = count == NULL ? -1 : PyObject_IsTrue(count);
            if (r < 0) {
                if (!PyErr_Occurred())
                    PyErr_SetObject(PyExc_KeyError, keys[k]);
                return -1;
            }
        }
    }
    if (idle || r) /* paused with idle backends, room to open one, or some shared */
        return discard(PyObject_CallMethodNoArgs(pool_obj, a_dispatch)) < 0 ? -1 : 1;
    /* the pending gauge (Pool._flush_soon) */
    return publish_pending(pool) < 0 ? -1 : 1;
}

/* The first waiter of a non-empty queue is in process (a proxy session), and may be handed a
 * backend here: 1, 0 (a worker gets its fd through Pool._grant), or -1. */
static int
first_in_process(PyObject *waiters)
{
    PyObject *first = PySequence_GetItem(waiters, 0);
    WaiterObject *w;
    int r;

    if (first == NULL)
        return -1;
    w = AS_WAITER(first);
    r = w == NULL ? 0 : attr_true(w->client, a_in_process);
    Py_DECREF(first);
    return r;
}

/* Pool._hand_over(b, waiters.popleft(), now): the slot stays LENT, only its holder changes. */
static int
hand_over(PoolObject *pool, BackendObject *b, long long now)
{
    PyObject *popped = PyObject_CallMethodNoArgs(pool->waiters, a_popleft); /* (the one checked) */
    WaiterObject *w;
    Py_ssize_t n;
    int r;

    if (popped == NULL)
        return -1;
    if ((w = AS_WAITER(popped)) == NULL) { /* (first_in_process checked the first one's type) */
        Py_DECREF(popped);
        PyErr_SetString(PyExc_SystemError, "Pool.waiters changed during a handover");
        return -1;
    }
    take_lease(b, w->client, w->parking, now);
    r = grant_to(w->client, (PyObject *)b, w->request);
    if (r == 0)
        r = note_queued(pool, now - w->enqueued_ns);
    Py_DECREF(popped);
    if (r < 0 || publish_soon(pool, b) < 0)
        return -1;
    n = PyObject_Length(pool->waiters);
    if (n > 0) { /* open more backends for those still waiting, if a slot is closed */
        PyObject *closed = PyDict_GetItemWithError(pool->states, st_closed); /* borrowed */
        int any = closed == NULL ? -1 : PyObject_IsTrue(closed);

        if (any < 0) {
            if (!PyErr_Occurred())
                PyErr_SetObject(PyExc_KeyError, st_closed);
            return -1;
        }
        if (any && discard(PyObject_CallMethodNoArgs((PyObject *)pool, a_dispatch)) < 0)
            return -1;
    }
    return n < 0 ? -1 : 0;
}

/* Pool.give_back(b, self, CLEAN, unread_checked=True) when the next holder is an in-process waiter
 * (the handover) or nobody waits (back to the idle stack): 1 if done, 0 if not this case (nothing
 * changed), -1 on error. */
static int
give_back_fast(Session *self, PyObject *pool_obj, PyObject *b_obj)
{
    PoolObject *pool = AS_POOL(pool_obj);
    BackendObject *b = AS_BACKEND(b_obj);
    long long now, used;
    Py_ssize_t n;
    int handover = 0;

    if (pool == NULL || b == NULL || b->holder != (PyObject *)self || b->state != st_lent ||
        !pool_quiet(pool, 0) || pool->reset_every_lease || b->tls != Py_None || !b->watched)
        return 0;
    n = PyObject_Length(pool->waiters);
    if (n < 0)
        return -1;
    if (n > 0) {
        int r = pool->paused ? 0 : first_in_process(pool->waiters);

        if (r <= 0)
            return r;
        handover = 1;
    }
    /* From here on the Python method takes the same steps (Pool._count_use arms the flush timer
     * here; publish_soon below arms the same timer). */
    now = monotonic_ns();
    used = now - b->lease_started_ns;
    b->use_ns += used;
    pool->noted_use_ns += used;
    if (publish_pending(pool) < 0) /* (as Pool._count_use: before the next holder hears of it) */
        return -1;
    if (handover)
        return hand_over(pool, b, now) < 0 ? -1 : 1;
    /* back to the idle stack (Pool._make_idle(lazy=True) with nobody waiting) */
    Py_SETREF(b->holder, Py_NewRef(Py_None));
    Py_SETREF(b->parking, Py_NewRef(zero));
    b->lease_started_ns = 0;
    if (move_state(pool, b, st_lent, st_idle) < 0)
        return -1;
    Py_SETREF(b->on_readable, Py_NewRef(b->idle_watch)); /* the pool's idle watch reads it again */
    if (publish_soon(pool, b) < 0 || PyList_Append(pool->idle, (PyObject *)b) < 0)
        return -1;
    return 1;
}

#endif
