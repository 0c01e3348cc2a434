/*
 * pgreuse._speedups: the proxy's message scanners in C.
 *
 * The references are pgreuse.wire.scan.scan_server_py and scan_client_py; this file must do exactly
 * what they do (the differential tests in tests/wire/test_scan.py feed both the same streams, cut
 * everywhere). The proxy walks every message header the server sends, once per message: for a
 * 1000-row result that is 1000 turns of a Python loop per transaction, and in C it is a few
 * nanoseconds each; a client's Parse/Bind/Describe/Execute/Sync is five.
 *
 * Build is optional (pyproject.toml): without a compiler pgreuse runs the Python scanner, and
 * PGREUSE_PURE_PYTHON=1 selects it even when this module is built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Flags in the result (keep in step with pgreuse.wire.scan). */
#define SAW_PARAMETER_STATUS 1
#define BAD_LENGTH 2
#define UNSOLICITED_READY 4

static PyObject *
scan_server(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start;
    long long pos; /* 64 bits even where Py_ssize_t is 32: pos + 1 + length must not overflow */
    long syncs;
    long tx = -1;
    long flags = 0;

    (void)self;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "scan_server() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    syncs = PyLong_AsLong(args[2]);
    if (syncs == -1 && PyErr_Occurred())
        return NULL;
    if (start < 0) {
        PyErr_Format(PyExc_ValueError, "scan_server(): negative position %zd", start);
        return NULL;
    }
    pos = start;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    {
        const unsigned char *buf = (const unsigned char *)view.buf;
        /* From here on a header plus ReadyForQuery's status byte no longer fit. */
        long long last = (long long)view.len - 6;

        while (pos <= last) {
            const unsigned char *p = buf + pos;
            unsigned char type = p[0];
            int32_t length = (int32_t)(((uint32_t)p[1] << 24) | ((uint32_t)p[2] << 16) |
                                       ((uint32_t)p[3] << 8) | (uint32_t)p[4]);

            if (type == 'Z') {
                tx = p[5];
                if (--syncs < 0) {
                    flags |= UNSOLICITED_READY;
                    break;
                }
            }
            else if (type == 'S') {
                flags |= SAW_PARAMETER_STATUS;
            }
            if (length < 4) {
                flags |= BAD_LENGTH;
                break;
            }
            pos += 1 + (long long)length;
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(Llll)", pos, syncs, tx, flags);
}

/* Keep in step with pgreuse.wire.frames.MAX_FRAME. */
#define MAX_FRAME (64 * 1024 * 1024)

static PyObject *
scan_client(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t n;
    int session_mode;
    long long pos = 0;
    long syncs = 0;
    long unsynced = -1;
    long first = -1;
    int slow = 0;

    (void)self;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "scan_client() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    session_mode = PyObject_IsTrue(args[2]);
    if (session_mode < 0)
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (n < 0 || n > view.len) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "scan_client(): %zd bytes asked of a buffer of %zd", n, view.len);
        return NULL;
    }
    {
        const unsigned char *buf = (const unsigned char *)view.buf;

        if (n < 5)
            slow = 1;
        while (!slow && pos < n) {
            const unsigned char *p = buf + pos;
            unsigned char type;
            int32_t length;
            long long end;

            if (n - pos < 5) {
                slow = 1;
                break;
            }
            type = p[0];
            length = (int32_t)(((uint32_t)p[1] << 24) | ((uint32_t)p[2] << 16) |
                               ((uint32_t)p[3] << 8) | (uint32_t)p[4]);
            end = pos + 1 + (long long)length;
            if (length < 4 || length > MAX_FRAME || end > n || type == 'X') {
                slow = 1;
                break;
            }
            if (type == 'Q' || type == 'S' || type == 'F') {
                syncs++;
                unsynced = 0;
            }
            else if (type != 'd' && type != 'c' && type != 'f' && type != 'H') {
                if (type == 'P' && !session_mode && length > 4 && p[5] != 0) {
                    slow = 1;
                    break;
                }
                unsynced = 1;
            }
            pos = end;
        }
        if (!slow)
            first = buf[0];
    }
    PyBuffer_Release(&view);
    if (slow)
        return Py_BuildValue("(lll)", 0L, 0L, -1L);
    return Py_BuildValue("(lll)", syncs, unsynced, first);
}

static PyMethodDef methods[] = {
    {"scan_client", (PyCFunction)(void (*)(void))scan_client, METH_FASTCALL,
     "scan_client(data, n, session_mode) -> (syncs, unsynced, first): see pgreuse.wire.scan."},
    {"scan_server", (PyCFunction)(void (*)(void))scan_server, METH_FASTCALL,
     "scan_server(data, pos, syncs) -> (pos, syncs, tx, flags): see pgreuse.wire.scan."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pgreuse._speedups", "C versions of pgreuse's hot loops.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
