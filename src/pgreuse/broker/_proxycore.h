/*
 * What the C files of pgreuse.broker._proxycore share: the structs of ProxyCounters and
 * SessionCore, the module state that setup() and the module init fill in, the helpers every part
 * calls, and the functions one file calls in another (_proxycore.c's header says which file holds
 * what).
 *
 * Every name shared across the files starts with pxc_: they are not static, and a bare name such as
 * "lease" or "rbuf" could clash with another library's in the process.
 */
#ifndef PGREUSE_PROXYCORE_H
#define PGREUSE_PROXYCORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

/* Room before the read buffer for a server header cut at the end of the previous read (at most 5
 * bytes, see pgr_scan_server), so the scan sees one contiguous run without a copy of the read. */
#define STASH_ROOM 8
#define RECV (256 * 1024) /* as proxy_fields._RECV */

/* The read buffer the two read callbacks share (_proxyclient.c, _proxybackend.c). */
extern unsigned char pxc_rbuf[STASH_ROOM + RECV];

/* Set by setup(): the Python reference's methods that the C methods outside _proxycore.c call. */
extern PyObject *pxc_py_client_slow, *pxc_py_client_failed, *pxc_py_close, *pxc_py_backend_readable,
    *pxc_py_release_at_idle, *pxc_py_backend_failed, *pxc_py_forward, *pxc_py_flush_to_backend;
/* Set at module init. */
extern PyObject *pxc_empty_bytes;

/* -- ProxyCounters: the totals of pgreuse.broker.proxy.PyProxyStats, as plain integers ---------- */

typedef struct {
    PyObject_HEAD
    long long xacts, queries, received, sent, wait_ns, denied, broken;
} Counters;

extern PyTypeObject pxc_CountersType;

/* -- SessionCore ------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int fd;
    int bfd;
    int tx;
    char closed, session_mode, proxied, unsynced, quitting, want_lease, dirty;
    char c_reading, c_writing, b_writing;
    Py_ssize_t syncs, c_left, b_left;
    long long request_ns;
    Counters *stats;
    PyObject *backend, *bsock, *btls, *request, *rejecting, *c_stash, *b_stash, *to_backend,
        *to_client, *pool, *parking_key, *on_backend;
} Session;

#define OBJECT_FIELDS(X)                                                                           \
    X(backend) X(bsock) X(btls) X(request) X(rejecting) X(c_stash) X(b_stash) X(to_backend)        \
        X(to_client) X(pool) X(parking_key) X(on_backend)

/* The object fields are getsets, not members: the C code reads them without checks, so none may be
 * deleted (a member could be), and those it reads as a given type must have it (the Python methods
 * assign them too, and a wrong type there must be an error, not a crash here). One getter and one
 * setter serve every such field of the three types: the closure says where, and which type. */
typedef struct {
    Py_ssize_t offset;
    PyTypeObject *type; /* NULL: any object */
    const char *name;
} FieldSpec;

#define FIELD_GETSET(name, spec) {name, pxc_field_get, pxc_field_set, NULL, &(spec)}

/* _proxyfields.c: the getter and setter of every FieldSpec, and the SessionCore type, whose
 * methods are in the other files. */
PyObject *pxc_field_get(PyObject *self, void *closure);
int pxc_field_set(PyObject *self, PyObject *value, void *closure);
extern PyTypeObject pxc_SessionType;

/* _proxycore.c: the session's state and its lease. */
int pxc_idle(Session *self);
int pxc_interest(Session *self);
int pxc_lease(Session *self);
int pxc_give_back_clean(Session *self);
PyObject *pxc_Session_idle(Session *self, PyObject *unused);
PyObject *pxc_Session_interest(Session *self, PyObject *unused);
PyObject *pxc_Session_lease(Session *self, PyObject *unused);
PyObject *pxc_Session_granted(Session *self, PyObject *const *args, Py_ssize_t nargs);
/* _lending.h (included by _proxycore.c): the backend a lease would be lent at once, or NULL. */
struct BackendObject *pxc_lendable(PyObject *pool_obj, int *error);

/* _proxyclient.c */
int pxc_send_rest(int fd, const unsigned char *data, Py_ssize_t n, PyObject *rest);
int pxc_flush_to_backend(Session *self);
PyObject *pxc_Session_client_readable(Session *self, PyObject *unused);

/* _proxybackend.c */
PyObject *pxc_Session_backend_readable(Session *self, PyObject *unused);

/* -- helpers ----------------------------------------------------------------------------------- */

static inline int
would_block(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK || err == EINTR;
}

/* The OSError Python's socket methods would raise for errno ``err`` (a new reference; OSError
 * picks the subclass, e.g. ConnectionResetError). */
static inline PyObject *
os_error(int err)
{
    return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

/* The result of a call made for its effect: 0, or -1 with the call's error. */
static inline int
discard(PyObject *result)
{
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* Call the Python reference ``func`` (args[0] is the session). */
static inline int
call_ref(PyObject *func, PyObject *const *args, size_t nargs, PyObject *kwnames)
{
    if (func == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "pgreuse.broker._proxycore.setup() was not called");
        return -1;
    }
    return discard(PyObject_Vectorcall(func, args, nargs, kwnames));
}

/* func(self) or func(self, arg). */
static inline int
call_py(PyObject *func, Session *self, PyObject *arg)
{
    PyObject *args[2] = {(PyObject *)self, arg};

    return call_ref(func, args, arg == NULL ? 1 : 2, NULL);
}

static inline int
backend_failed_text(Session *self, PyObject *why)
{
    int r;

    if (why == NULL)
        return -1;
    r = call_py(pxc_py_backend_failed, self, why);
    Py_DECREF(why);
    return r;
}

/* _backend_failed(f"{what}: {exc}") for errno ``err``. */
static inline int
backend_failed_errno(Session *self, const char *what, int err)
{
    PyObject *exc = os_error(err);

    if (exc == NULL)
        return -1;
    PyObject *why = PyUnicode_FromFormat("%s: %S", what, exc);
    Py_DECREF(exc);
    return backend_failed_text(self, why);
}

static inline int
append(PyObject *bytearray, const unsigned char *data, Py_ssize_t n)
{
    Py_ssize_t old = PyByteArray_GET_SIZE(bytearray);

    if (PyByteArray_Resize(bytearray, old + n) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(bytearray) + old, data, (size_t)n);
    return 0;
}

#endif
