/*
 * The pool's lending fast path for proxy sessions, included by _proxycore.c.
 *
 * The reference is pgreuse.broker.pool.Pool: request() with an idle backend and no queue (its
 * _grant for an in-process holder), and give_back() of a clean backend whose holder read it up to
 * ReadyForQuery 'I' (its _hand_over to an in-process waiter, or its return to the idle stack). These
 * run once per proxied transaction each, and in Python they were the largest part of the broker's
 * remaining CPU per transaction. Here they are the same steps on the same objects, through their
 * attributes, for exactly those cases: every other case (a queue to join, a worker to serve, a
 * pause, a shutdown, debug logging of transitions, a reset to run) returns 0 before changing
 * anything, and the caller goes to the Python method.
 *
 * The transitions taken here (IDLE -> LENT; LENT -> RESETTING -> IDLE, neither published, as
 * Pool._transition(publish=False) does) are checked against states.TRANSITIONS by proxy.py at import.
 * Pool._flush_soon's test (no timer armed yet) is inlined in publish_soon: change them together.
 */
#ifndef PGREUSE_LENDING_H
#define PGREUSE_LENDING_H

/* Set by setup(): SlotState members, and interned attribute names. */
static PyObject *st_closed, *st_idle, *st_lent;
static PyObject *a_idle, *a_waiters, *a_paused, *a_closing, *a_debug, *a_states, *a_lagging,
    *a_flush_timer, *a_flush_soon, *a_table, *a_note_lease, *a_note_use, *a_config,
    *a_reset_every_lease, *a_holder, *a_parking, *a_lease_started_ns, *a_leases, *a_state,
    *a_use_ns, *a_idle_watch, *a_client, *a_request, *a_enqueued_ns, *a_in_process, *a_dispatch,
    *a_granted;

static int
lending_names(void)
{
#define NAME(var, text)                                                                            \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                          \
        return -1;
    NAME(a_idle, "idle")
    NAME(a_waiters, "waiters")
    NAME(a_paused, "paused")
    NAME(a_closing, "closing")
    NAME(a_debug, "_debug")
    NAME(a_states, "_states")
    NAME(a_lagging, "_lagging")
    NAME(a_flush_timer, "_flush_timer")
    NAME(a_flush_soon, "_flush_soon")
    NAME(a_table, "table")
    NAME(a_note_lease, "note_lease")
    NAME(a_note_use, "note_use")
    NAME(a_config, "config")
    NAME(a_reset_every_lease, "reset_every_lease")
    NAME(a_holder, "holder")
    NAME(a_parking, "parking")
    NAME(a_lease_started_ns, "lease_started_ns")
    NAME(a_leases, "leases")
    NAME(a_state, "state")
    NAME(a_use_ns, "use_ns")
    NAME(a_idle_watch, "idle_watch")
    NAME(a_client, "client")
    NAME(a_request, "request")
    NAME(a_enqueued_ns, "enqueued_ns")
    NAME(a_in_process, "in_process")
    NAME(a_dispatch, "_dispatch")
    NAME(a_granted, "granted")
#undef NAME
    return 0;
}

/* getattr(obj, name) is value (identity): 1, 0, or -1. */
static int
attr_is(PyObject *obj, PyObject *name, PyObject *value)
{
    PyObject *v = PyObject_GetAttr(obj, name);

    if (v == NULL)
        return -1;
    Py_DECREF(v);
    return v == value;
}

static int
set_ll(PyObject *obj, PyObject *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    int r;

    if (v == NULL)
        return -1;
    r = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return r;
}

static int
get_ll(PyObject *obj, PyObject *name, long long *out)
{
    PyObject *v = PyObject_GetAttr(obj, name);

    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
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
move_state(PyObject *pool, PyObject *b, PyObject *old, PyObject *new)
{
    PyObject *states = PyObject_GetAttr(pool, a_states);
    int r;

    if (states == NULL)
        return -1;
    r = (PyDict_Check(states) && count_state(states, old, -1) == 0 &&
         count_state(states, new, 1) == 0)
            ? PyObject_SetAttr(b, a_state, new)
            : -1;
    if (r < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "Pool._states is not a dict");
    Py_DECREF(states);
    return r;
}

/* table.note_lease(waited_ns, queued) / table.note_use(used_ns) */
static int
note(PyObject *pool, PyObject *method, long long ns, PyObject *queued)
{
    PyObject *table = PyObject_GetAttr(pool, a_table);
    PyObject *value;
    int r;

    if (table == NULL)
        return -1;
    value = PyLong_FromLongLong(ns);
    if (value == NULL) {
        Py_DECREF(table);
        return -1;
    }
    {
        PyObject *args[3] = {table, value, queued};
        r = discard(PyObject_VectorcallMethod(method, args, queued == NULL ? 2 : 3, NULL));
    }
    Py_DECREF(value);
    Py_DECREF(table);
    return r;
}

/* Pool._publish_soon(b): the record reaches the table within TABLE_LAG. */
static int
publish_soon(PyObject *pool, PyObject *b)
{
    PyObject *lagging = PyObject_GetAttr(pool, a_lagging);
    int r, armed;

    if (lagging == NULL)
        return -1;
    r = PySet_Add(lagging, b);
    Py_DECREF(lagging);
    if (r < 0)
        return -1;
    armed = attr_is(pool, a_flush_timer, Py_None);
    if (armed < 0)
        return -1;
    /* no timer yet: Pool._flush_soon arms it */
    return armed ? discard(PyObject_CallMethodNoArgs(pool, a_flush_soon)) : 0;
}

/* Lease bookkeeping for a new holder (Pool._grant / _hand_over). */
static int
take_lease(PyObject *b, PyObject *client, PyObject *parking, long long now)
{
    long long leases;

    if (PyObject_SetAttr(b, a_holder, client) < 0 || PyObject_SetAttr(b, a_parking, parking) < 0 ||
        set_ll(b, a_lease_started_ns, now) < 0 || get_ll(b, a_leases, &leases) < 0)
        return -1;
    return set_ll(b, a_leases, leases + 1);
}

static int granted_impl(Session *self, PyObject *b, PyObject *request);
static PyTypeObject SessionType;
static PyObject *c_granted_descr; /* SessionType's granted, set at module init */

/* The C granted() is the one ``client``'s class has (not an override in Python). */
static int
c_granted(PyObject *client)
{
    return PyObject_TypeCheck(client, &SessionType) &&
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

/* The checks shared by both paths: not paused (``check_paused``), not shutting down, transitions
 * not logged. 1 if they hold, 0 if not, -1 on error. */
static int
pool_quiet(PyObject *pool, int check_paused)
{
    int t;

    if ((t = attr_true(pool, a_closing)) != 0)
        return t < 0 ? -1 : 0;
    if ((t = attr_true(pool, a_debug)) != 0)
        return t < 0 ? -1 : 0;
    if (check_paused && (t = attr_true(pool, a_paused)) != 0)
        return t < 0 ? -1 : 0;
    return 1;
}

/* Pool.request(self, request, parking) when an idle backend is free and nobody waits: 1 if done,
 * 0 if not this case (nothing changed), -1 on error. */
static int
lend_idle(Session *self, PyObject *pool, PyObject *request)
{
    PyObject *idle, *waiters, *b;
    Py_ssize_t n;
    int r;

    if ((r = pool_quiet(pool, 1)) <= 0)
        return r;
    waiters = PyObject_GetAttr(pool, a_waiters);
    if (waiters == NULL)
        return -1;
    n = PyObject_Length(waiters);
    Py_DECREF(waiters);
    if (n != 0)
        return n < 0 ? -1 : 0;
    idle = PyObject_GetAttr(pool, a_idle);
    if (idle == NULL)
        return -1;
    if (!PyList_CheckExact(idle) || PyList_GET_SIZE(idle) == 0) {
        Py_DECREF(idle);
        return 0;
    }
    n = PyList_GET_SIZE(idle);
    b = Py_NewRef(PyList_GET_ITEM(idle, n - 1));
    r = attr_is(b, a_state, st_idle); /* the idle stack holds idle backends only */
    if (r <= 0) {
        Py_DECREF(b);
        Py_DECREF(idle);
        return r;
    }
    if (PyList_GET_SIZE(idle) != n || PyList_GET_ITEM(idle, n - 1) != b) { /* (changed meanwhile) */
        Py_DECREF(b);
        Py_DECREF(idle);
        return 0;
    }
    r = PyList_SetSlice(idle, n - 1, n, NULL); /* idle.pop() */
    Py_DECREF(idle);
    if (r == 0)
        r = take_lease(b, (PyObject *)self, self->parking_key, monotonic_ns());
    if (r == 0)
        r = move_state(pool, b, st_idle, st_lent);
    /* The holder gets its backend and sends its query first: the bookkeeping below is off that
     * query's path (as in Pool._grant). */
    if (r == 0)
        r = grant_to((PyObject *)self, b, request);
    if (r == 0)
        r = note(pool, a_note_lease, 0, Py_False);
    if (r == 0)
        r = publish_soon(pool, b);
    Py_DECREF(b);
    return r < 0 ? -1 : 1;
}

/* Pool.give_back(b, self, CLEAN, unread_checked=True) when the next holder is an in-process waiter
 * (the handover) or nobody waits (back to the idle stack): 1 if done, 0 if not this case (nothing
 * changed), -1 on error. */
static int
give_back_fast(Session *self, PyObject *pool, PyObject *b)
{
    PyObject *waiters = NULL, *w = NULL, *config, *tls;
    Py_ssize_t n;
    long long now, started, use_ns;
    int r, handover = 0;

    if ((r = attr_is(b, a_holder, (PyObject *)self)) <= 0 || (r = attr_is(b, a_state, st_lent)) <= 0)
        return r;
    if ((r = pool_quiet(pool, 0)) <= 0)
        return r;
    config = PyObject_GetAttr(pool, a_config);
    if (config == NULL)
        return -1;
    r = attr_true(config, a_reset_every_lease);
    Py_DECREF(config);
    if (r != 0)
        return r < 0 ? -1 : 0;
    tls = PyObject_GetAttr(b, s_tls);
    if (tls == NULL)
        return -1;
    Py_DECREF(tls);
    if (tls != Py_None || (r = attr_true(b, s_watched)) <= 0)
        return tls != Py_None ? 0 : r;
    waiters = PyObject_GetAttr(pool, a_waiters);
    if (waiters == NULL)
        return -1;
    n = PyObject_Length(waiters);
    if (n < 0)
        goto error;
    if (n > 0) {
        /* The first waiter must be in process (a worker gets its fd through Pool._grant). */
        PyObject *client;

        if ((r = attr_true(pool, a_paused)) != 0)
            goto not_this_case;
        w = PySequence_GetItem(waiters, 0);
        if (w == NULL)
            goto error;
        client = PyObject_GetAttr(w, a_client);
        if (client == NULL)
            goto error;
        r = attr_true(client, a_in_process);
        Py_DECREF(client);
        if (r <= 0)
            goto not_this_case;
        handover = 1;
    }
    /* From here on the Python method takes the same steps (Pool._count_use arms the flush timer
     * here; publish_soon below arms the same timer). */
    now = monotonic_ns();
    if (get_ll(b, a_lease_started_ns, &started) < 0 || get_ll(b, a_use_ns, &use_ns) < 0 ||
        set_ll(b, a_use_ns, use_ns + (now - started)) < 0 ||
        note(pool, a_note_use, now - started, NULL) < 0)
        goto error;
    if (handover) { /* Pool._hand_over: the slot stays LENT, only its holder changes */
        PyObject *client = NULL, *parking = NULL, *request = NULL;
        long long enqueued = 0;

        Py_SETREF(w, PyObject_CallMethod(waiters, "popleft", NULL)); /* (the one checked above) */
        r = w == NULL ? -1 : 0;
        if (r == 0 && ((client = PyObject_GetAttr(w, a_client)) == NULL ||
                       (parking = PyObject_GetAttr(w, a_parking)) == NULL ||
                       (request = PyObject_GetAttr(w, a_request)) == NULL ||
                       get_ll(w, a_enqueued_ns, &enqueued) < 0))
            r = -1;
        if (r == 0)
            r = take_lease(b, client, parking, now);
        if (r == 0)
            r = grant_to(client, b, request);
        if (r == 0)
            r = note(pool, a_note_lease, now - enqueued, Py_True);
        if (r == 0)
            r = publish_soon(pool, b);
        Py_XDECREF(client);
        Py_XDECREF(parking);
        Py_XDECREF(request);
        if (r < 0)
            goto error;
        n = PyObject_Length(waiters);
        if (n < 0)
            goto error;
        if (n > 0) { /* open more backends for those still waiting, if a slot is closed */
            PyObject *states = PyObject_GetAttr(pool, a_states);
            PyObject *closed = states == NULL ? NULL : PyObject_GetItem(states, st_closed);
            int any;

            Py_XDECREF(states);
            if (closed == NULL)
                goto error;
            any = PyObject_IsTrue(closed);
            Py_DECREF(closed);
            if (any < 0)
                goto error;
            if (any && discard(PyObject_CallMethodNoArgs(pool, a_dispatch)) < 0)
                goto error;
        }
    }
    else { /* back to the idle stack (Pool._make_idle(lazy=True) with nobody waiting) */
        PyObject *idle, *watch;

        if (PyObject_SetAttr(b, a_holder, Py_None) < 0 || set_ll(b, a_parking, 0) < 0 ||
            set_ll(b, a_lease_started_ns, 0) < 0 || move_state(pool, b, st_lent, st_idle) < 0)
            goto error;
        watch = PyObject_GetAttr(b, a_idle_watch);
        if (watch == NULL)
            goto error;
        r = PyObject_SetAttr(b, s_on_readable, watch); /* the pool's idle watch reads it again */
        Py_DECREF(watch);
        if (r < 0 || publish_soon(pool, b) < 0)
            goto error;
        idle = PyObject_GetAttr(pool, a_idle);
        if (idle == NULL)
            goto error;
        r = PyList_Check(idle) ? PyList_Append(idle, b) : -1;
        if (r < 0 && !PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "Pool.idle is not a list");
        Py_DECREF(idle);
        if (r < 0)
            goto error;
    }
    Py_XDECREF(w);
    Py_DECREF(waiters);
    return 1;
not_this_case:
    Py_XDECREF(w);
    Py_DECREF(waiters);
    return r < 0 ? -1 : 0;
error:
    Py_XDECREF(w);
    Py_DECREF(waiters);
    return -1;
}

#endif
